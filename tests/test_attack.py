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


def test_pgd_is_deterministic_per_seed_the_same_for_uint8_or_float_input_and_stays_in_eps(pair):
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


def test_eps_outside_0_1_a_label_count_mismatch_and_pixels_above_1_are_value_errors(pair):
    with pytest.raises(ValueError, match="eps"):
        AttackConfig(eps=2)
    with pytest.raises(ValueError, match="labels"):
        pgd(pair[1], pair[2][:3], pair[3][:2])
    with pytest.raises(ValueError, match="within"):
        pgd(pair[1], torch.full((1, 1, 28, 28), 2.0), [0])


def _labels_of(model, x: torch.Tensor) -> np.ndarray:
    """argmax of the model's raw logits (eval mode), without drmi_ray's predict."""
    model.eval()
    with torch.no_grad():
        return model(x).argmax(1).numpy()


def test_transfer_counts_equal_an_independent_count_on_a_fixed_batch(pair):
    """The module's definition, counted here with numpy on the 200 test images: among the images
    the target classifies right, those it gets wrong once each is replaced by its PGD example on
    the substitute (true labels), rounded to uint8 grey levels as the target's API receives it;
    substitute_success is the share of those same examples the substitute gets wrong. Only pgd
    is the library's: the rounding, the two models' labels and the counts are written here."""
    target, substitute, images, labels = pair
    config = AttackConfig(steps=20)
    details = transfer(substitute, target, images, labels, config)
    rate = transfer_rate(substitute, target, images, labels, config)

    clean = torch.from_numpy(images[:, None].astype(np.float32) / 255)  # (n, 1, 28, 28) in [0, 1]
    right = _labels_of(target, clean) == labels
    adv = pgd(substitute, images[right], labels[right], config).numpy()
    sent = np.rint(adv[:, 0] * 255).astype(np.uint8)  # the nearest grey level (ties to even, as torch.round)
    seen = torch.from_numpy(sent[:, None].astype(np.float32) / 255)
    target_fooled = _labels_of(target, seen) != labels[right]
    substitute_fooled = _labels_of(substitute, seen) != labels[right]

    assert details["n"] == 200 and details["n_target_correct"] == right.sum()
    assert details["n_transferred"] == target_fooled.sum()
    assert details["transfer_rate"] == rate == target_fooled.sum() / right.sum()
    assert details["substitute_success"] == substitute_fooled.mean() > 0.9
    assert 0 < target_fooled.sum() < right.sum()  # a count that says something: neither none nor all
    assert right.sum() < len(images)  # and the images the target gets wrong were left out
    # a target that is wrong everywhere leaves nothing to transfer to
    wrong = (_labels_of(target, clean[:5]) + 1) % 10
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
