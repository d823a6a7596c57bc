"""PGD on a substitute and its transfer to a target, on real digits."""

import numpy as np
import pytest
import torch
from torch import nn

from drmi_ray.attack import AttackConfig, _pgd_batch, as_sent, pgd, transfer, transfer_rate
from drmi_ray.models import TrainConfig, predict, to_tensor, train_classifier


@pytest.fixture(scope="module")
def pair(digits, lenet5_target):
    images, labels = digits
    target, perm = lenet5_target
    pool = images[perm[1000:1300]]
    substitute = train_classifier(pool, predict(target, pool), TrainConfig(model="lenet5", seed=1))
    test = perm[4500:4700]
    return target, substitute, images[test], labels[test]


def _loss(model, x, y):
    with torch.no_grad():
        return nn.functional.cross_entropy(model(x), torch.from_numpy(y)).item()


def test_pgd_stays_in_the_ball_and_fools_the_substitute(pair):
    _, substitute, images, labels = pair
    x = to_tensor(images)
    config = AttackConfig()  # eps 0.3, step 0.01, 40 steps, random start
    adv = pgd(substitute, images, labels, config)
    assert adv.shape == x.shape and adv.dtype == torch.float32
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() <= config.eps + 1e-6
    assert _loss(substitute, adv, labels) > _loss(substitute, x, labels) + 1
    clean = predict(substitute, images) == labels
    flipped = predict(substitute, adv) != labels
    assert flipped[clean].mean() > 0.9


def test_pgd_is_deterministic_and_accepts_floats(pair):
    _, substitute, images, labels = pair
    config = AttackConfig(steps=5)
    a = pgd(substitute, images[:20], labels[:20], config)
    b = pgd(substitute, to_tensor(images[:20]), labels[:20], config)
    assert torch.equal(a, b)
    # the weights' gradients are skipped, which changes nothing: the same examples with them on
    assert all(p.requires_grad for p in substitute.parameters())  # and pgd left them on
    ref = _pgd_batch(substitute.eval(), to_tensor(images[:20]), torch.from_numpy(labels[:20]),
                     config, torch.Generator().manual_seed(config.seed))
    assert torch.equal(a, ref)
    c = pgd(substitute, images[:20], labels[:20], AttackConfig(steps=5, seed=1))
    assert not torch.equal(a, c)
    same = pgd(substitute, images[:20], labels[:20], AttackConfig(eps=0.0))
    assert torch.equal(same, to_tensor(images[:20]))
    small = pgd(substitute, images[:20], labels[:20], AttackConfig(eps=0.05, steps=10,
                                                                   random_start=False))
    assert (small - to_tensor(images[:20])).abs().max() <= 0.05 + 1e-6


def test_attack_config_and_input_errors(pair):
    with pytest.raises(ValueError, match="eps"):
        AttackConfig(eps=2)
    with pytest.raises(ValueError, match="labels"):
        pgd(pair[1], pair[2][:3], pair[3][:2])
    with pytest.raises(ValueError, match="within"):
        pgd(pair[1], torch.full((1, 1, 28, 28), 2.0), [0])


def test_transfer_rate_matches_a_direct_recomputation(pair):
    target, substitute, images, labels = pair
    config = AttackConfig(steps=20)
    rate = transfer_rate(substitute, target, images, labels, config)
    assert 0 < rate <= 1
    details = transfer(substitute, target, images, labels, config)
    assert details["transfer_rate"] == rate
    # by hand: keep what the target gets right, attack those on the substitute, count flips
    keep = predict(target, images) == labels
    adv = as_sent(pgd(substitute, images[keep], labels[keep], config))
    direct = (predict(target, adv) != labels[keep]).mean()
    assert rate == pytest.approx(direct)
    assert details["n_target_correct"] == keep.sum()
    assert details["n_transferred"] == round(direct * keep.sum())
    assert details["substitute_success"] > 0.9
    # a target that is wrong everywhere leaves nothing to transfer to
    wrong = (predict(target, images[:5]) + 1) % 10
    assert np.isnan(transfer_rate(substitute, target, images[:5], wrong, config))


class Spy(nn.Module):
    """A model that keeps every batch it is given."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.model(x)


def test_the_target_sees_uint8_grey_levels_within_half_a_level_of_the_ball(pair):
    """The referee gives the target what its API would receive: adversarial examples rounded to
    the 256 grey levels, each pixel at most eps + half a level from its original."""
    target, substitute, images, labels = pair
    spy = Spy(target)
    config = AttackConfig(steps=5)
    transfer(substitute, spy, images, labels, config)
    assert len(spy.seen) == 2  # the clean test images, then the adversarial examples
    for x in spy.seen:
        levels = x * 255
        assert (levels - levels.round()).abs().max() < 1e-3, "the target was given floats between levels"
    x = to_tensor(images)[torch.from_numpy(predict(target, images) == labels)]
    assert (spy.seen[1] - x).abs().max() <= config.eps + 0.5 / 255 + 1e-6
    # as_sent: the nearest level, in the shape of a uint8 image batch
    adv = torch.tensor([[[[0.0, 1 / 510 - 1e-4], [1 / 510 + 1e-4, 1.0]]]])
    assert as_sent(adv).dtype == np.uint8 and as_sent(adv).tolist() == [[[0, 0], [1, 255]]]
    assert as_sent(torch.rand(2, 3, 4, 4)).shape == (2, 4, 4, 3)
