"""PGD on the substitute, transferred to the target.

PGD: Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks" (ICLR 2018).
Distance: L∞. Untargeted: each step ascends the cross-entropy of the substitute against the
given (true) labels, ``x ← Π(x + step_size · sign(∇ₓ CE))``, where Π clips to the eps-ball
around the original image and to ``[0, 1]``.

Arguments (``AttackConfig``), defaults for MNIST as in Madry et al.:
    eps (float): L∞ radius in [0, 1] pixel units. Default 0.3.
    step_size (float): per-step size. Default 0.01.
    steps (int): iterations. Default 40.
    random_start (bool): start from a uniform point of the eps-ball. Default True.
    seed (int): seeds the random start. Default 0.
    batch_size (int): images per forward/backward. Default 128 (on CPU, C3F2 runs ~10% faster
        than at 256, with the same examples bit for bit).

Shapes: images uint8 ``(n, H, W)`` / ``(n, H, W, C)`` or float ``(n, C, H, W)`` in [0, 1];
labels int ``(n,)``. Output: float32 ``(n, C, H, W)`` in [0, 1], ``|adv - x|∞ ≤ eps``.

    adv = pgd(substitute, test_images, test_labels, AttackConfig())
    rate = transfer_rate(substitute, target_model, test_images, test_labels)

``transfer_rate``: among the test images the *target* classifies correctly, the share it
misclassifies once they are replaced by their PGD examples made on the *substitute* (with the
true labels). The target sees the adversarial examples as its API would receive them: rounded
to uint8 grey levels (``as_sent``), so a pixel of an example can lie up to half a level (1/510)
outside the eps-ball of its original: ``|as_sent(adv)/255 - x|∞ ≤ eps + 1/510``. Images
the target already gets wrong are left out; with none left the rate is NaN. The target model
here is the referee's direct load of the checkpoint, not the attacker's queries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from .models import as_float_batch, check_labels, predict
from .settings import SEED_MAX, Checked, setting


@dataclass
class AttackConfig(Checked):
    eps: float = setting(0.3, flag="--eps", help="PGD L-inf radius", least=0, most=1, fix="pixels are in [0, 1]")
    step_size: float = setting(0.01, above=0, most=1)
    steps: int = setting(40, flag="--pgd-steps", help="PGD steps", least=0, most=100_000)
    random_start: bool = setting(True)
    seed: int = setting(0, least=0, most=SEED_MAX)
    batch_size: int = setting(128, most=65_536)

    def to_dict(self) -> dict:
        return asdict(self)


def _pgd_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: AttackConfig,
               gen: torch.Generator) -> torch.Tensor:
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    adv = x.clone()
    if config.random_start:
        noise = torch.rand(x.shape, generator=gen, dtype=x.dtype) * 2 - 1
        adv = (adv + config.eps * noise.to(x.device)).clamp(0, 1)
    for _ in range(config.steps):
        adv.requires_grad_(True)
        loss = loss_fn(model(adv), y)
        (grad,) = torch.autograd.grad(loss, adv)
        with torch.no_grad():
            adv = adv + config.step_size * grad.sign()
            adv = torch.min(torch.max(adv, x - config.eps), x + config.eps).clamp(0, 1)
    return adv.detach()


def pgd(model: nn.Module, images, labels, config: AttackConfig | None = None) -> torch.Tensor:
    """Untargeted L∞ PGD adversarial examples for ``model``; see the module docstring."""
    config = config or AttackConfig()
    x = as_float_batch(images)
    y = torch.from_numpy(check_labels(labels, len(x)))
    was_training = model.training
    requires_grad = [p.requires_grad for p in model.parameters()]
    model.eval()  # dropout off: attack the deterministic model
    model.requires_grad_(False)  # only the images' gradient is used: skip the weights' (same result)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(config.seed)
    out = []
    try:
        for i in range(0, len(x), config.batch_size):
            xb, yb = x[i:i + config.batch_size].to(device), y[i:i + config.batch_size].to(device)
            out.append(_pgd_batch(model, xb, yb, config, gen).cpu())
    finally:
        model.train(was_training)
        for p, r in zip(model.parameters(), requires_grad):
            p.requires_grad_(r)
    return torch.cat(out) if out else x.clone()


def as_sent(adv: torch.Tensor) -> np.ndarray:
    """Float ``(n, C, H, W)`` in [0, 1] -> uint8 ``(n, H, W)`` (one channel) or ``(n, H, W, C)``:
    each pixel rounded to the nearest of the 256 grey levels, as an image API receives it."""
    x = (adv.detach().cpu() * 255).round().to(torch.uint8)
    x = x[:, 0] if x.shape[1] == 1 else x.permute(0, 2, 3, 1)
    return x.contiguous().numpy()


def transfer(substitute: nn.Module, target, images, labels, config: AttackConfig | None = None, *,
             target_labels=None) -> dict:
    """The transfer experiment with its counts.

    ``target``: the target model, or (an outside endpoint) a function that answers uint8 images
    with int labels. ``target_labels``: the target's labels on ``images`` when already known (an
    endpoint is then asked only for the adversarial examples).

    Returns ``{"transfer_rate", "n", "n_target_correct", "n_transferred",
    "substitute_success"}``: ``n_target_correct`` test images the target gets right;
    ``n_transferred`` of them it gets wrong after PGD on the substitute;
    ``substitute_success`` = share of those adversarial examples the substitute itself
    misclassifies (white-box success). Both models see the examples rounded to uint8
    (``as_sent``), as the target's API would receive them.
    """
    config = config or AttackConfig()
    answer = (lambda a: predict(target, a)) if isinstance(target, nn.Module) else target
    x = as_float_batch(images)
    labels = check_labels(labels, len(x))
    if target_labels is None:
        target_labels = predict(target, x) if isinstance(target, nn.Module) else answer(as_sent(x))
    correct = check_labels(target_labels, len(x), name="target_labels") == labels
    out = {"n": int(len(x)), "n_target_correct": int(correct.sum()), "n_transferred": 0,
           "transfer_rate": float("nan"), "substitute_success": float("nan")}
    if not correct.any():
        return out
    adv = as_sent(pgd(substitute, x[torch.from_numpy(correct)], labels[correct], config))
    kept = labels[correct]
    fooled = np.asarray(answer(adv)) != kept
    out.update(n_transferred=int(fooled.sum()), transfer_rate=float(fooled.mean()),
               substitute_success=float((predict(substitute, adv) != kept).mean()))
    return out


def transfer_rate(substitute: nn.Module, target_model: nn.Module, images, labels,
                  config: AttackConfig | None = None) -> float:
    """Share of the target's correctly classified test images that PGD on the substitute flips."""
    return transfer(substitute, target_model, images, labels, config)["transfer_rate"]
