"""Classifiers for the target and the substitute: the model registry, and the plain training
loop both use.

Networks by name (``build_model(name)``, ``TrainConfig.model``): ``MODEL_NAMES``, the built-ins
of ``architectures.py`` (lenet5, c3f2, dnn5, resnet18, resnet152, inception_v3) and any network
added with ``register_model(name, builder)``; a builder is called as
``builder(in_channels=, num_classes=, image_size=)`` and returns an ``nn.Module`` from float
``(n, C, H, W)`` in ``[0, 1]`` to logits ``(n, num_classes)``.

Training (``TrainConfig``, ``train_classifier``) is a plain loop on numpy uint8 images: Adam,
cross-entropy, shuffled mini-batches drawn from a seeded ``torch.Generator``. With ``pool``
(unlabeled images and their target "mass" rows ``(m, classes)``: a soft label times the image's
weight, made by ``spread.pool_targets``) every step also draws a batch of pool images and adds
``-Σ mass · log softmax`` (batch mean) to the loss: the answered images keep every step they
had, the pool is extra. ``augment`` draws a random transform per group of ``AUGMENT_GROUP`` images of every
batch (torchvision's v2 transforms on tensors): ``digits`` small affine moves (±10°, ±10 %
shift, 0.9-1.1 scale), ``photos`` a 4-pixel padded random crop and a horizontal flip, ``auto``
digits for one channel and photos for three. The same loop
(``fit_model``) runs inside the Ray Train workers of ``substitute.py``; given the same seed,
device and thread count it produces the same weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2

from .architectures import C3F2, DNN5, InceptionV3, LeNet5, resnet
from .images import check_images
from .settings import SEED_MAX, Checked, setting

AUGMENTS = ("none", "digits", "photos", "auto")
AUGMENT_GROUP = 8  # images per random transform: one draw per image costs 10x more than the transform

MODEL_NAMES: list[str] = []  # every registered network, in registration order (kept by register_model)
_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, builder: Callable[..., nn.Module]) -> None:
    """Make ``builder`` the network called ``name`` for ``build_model``, ``TrainConfig(model=name)``
    and the CLI's model settings. ``builder(in_channels=, num_classes=, image_size=)`` returns a
    freshly initialised ``nn.Module`` (see the module doc); ``ValueError`` if the name is taken or
    the builder is not callable. Register when a module of the package is imported (as the
    built-ins below): Ray's worker processes import ``drmi_ray`` afresh and know only those."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name: expected a non-empty string, got {name!r}")
    if name in _BUILDERS:
        raise ValueError(f"model {name!r} is already registered")
    if not callable(builder):
        raise ValueError(f"model {name!r}: the builder must be callable, got {type(builder).__name__}")
    _BUILDERS[name] = builder
    MODEL_NAMES.append(name)


register_model("lenet5", LeNet5)
register_model("c3f2", C3F2)
register_model("dnn5", DNN5)
register_model("resnet18", resnet(18))
register_model("resnet152", resnet(152))
register_model("inception_v3", InceptionV3)


def build_model(name: str, *, in_channels: int = 1, num_classes: int = 10,
                image_size: int = 28) -> nn.Module:
    """A freshly initialised classifier (weights from torch's global RNG: seed it first)."""
    if name not in _BUILDERS:
        raise ValueError(f"model: unknown name {name!r}; expected one of {sorted(_BUILDERS)}")
    for arg, value in (("in_channels", in_channels), ("num_classes", num_classes),
                       ("image_size", image_size)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{arg}: expected a positive int, got {value!r}")
    return _BUILDERS[name](in_channels=int(in_channels), num_classes=int(num_classes),
                           image_size=int(image_size))


# --------------------------------------------------------------------------- images -> tensors

def image_geometry(images: np.ndarray) -> tuple[int, int]:
    """``(in_channels, image_size)`` of a validated uint8 batch (square images expected)."""
    h, w = images.shape[1:3]
    if h != w:
        raise ValueError(f"images: expected square images, got {h}x{w}")
    return (1 if images.ndim == 3 else images.shape[3]), h


def to_tensor(images, *, name: str = "images") -> torch.Tensor:
    """uint8 ``(n, H, W)`` / ``(n, H, W, C)`` -> float32 ``(n, C, H, W)`` in ``[0, 1]``."""
    images = check_images(images, name=name)
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0)  # astype: a writable copy
    if x.ndim == 3:
        return x.unsqueeze(1)
    return x.permute(0, 3, 1, 2).contiguous()


def as_float_batch(images, *, name: str = "images") -> torch.Tensor:
    """Accept uint8 images (as ``to_tensor``) or a float tensor/array ``(n, C, H, W)`` in [0, 1]
    (the models' own input, e.g. PGD examples); anything else goes to ``check_images``."""
    is_float = (torch.is_floating_point(images) if torch.is_tensor(images)
                else isinstance(images, np.ndarray) and images.dtype.kind == "f")
    if not is_float or images.ndim != 4:
        return to_tensor(images, name=name)  # uint8, or refused by check_images with its one line
    x = torch.as_tensor(images)
    if x.numel() and (torch.isnan(x).any() or x.min() < 0 or x.max() > 1):
        raise ValueError(f"{name}: float images (n, C, H, W) must be finite and within [0, 1]; "
                         "or pass uint8 pixel values (n, H, W[, C])")
    return x.to(torch.float32)


def check_labels(labels, n: int, *, name: str = "labels", num_classes: int | None = None
                 ) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name}: expected {n} integer labels, got dtype {labels.dtype} "
                         f"shape {labels.shape}")
    if n and (labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes)):
        raise ValueError(f"{name}: labels must lie in [0, {num_classes}), "
                         f"got [{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64)


def check_pool(pool, images: np.ndarray, num_classes: int):
    """None, or ``(pool images uint8 like images, target mass float (m, num_classes))``: finite,
    >= 0; returned as (uint8, float32) arrays."""
    if pool is None:
        return None
    pool_images, mass = pool
    pool_images = check_images(pool_images, name="pool images")
    mass = np.asarray(mass)
    if pool_images.shape[1:] != images.shape[1:]:
        raise ValueError(f"pool images: expected images of shape {images.shape[1:]}, got {pool_images.shape[1:]}")
    if mass.shape != (len(pool_images), num_classes) or mass.dtype.kind != "f" or not np.isfinite(mass).all() \
            or (mass < 0).any():
        raise ValueError(f"pool target mass: expected finite floats >= 0 of shape ({len(pool_images)}, "
                         f"{num_classes}), got dtype {mass.dtype} shape {mass.shape}")
    return pool_images, mass.astype(np.float32)


def pool_tensors(pool):
    """``check_pool``'s arrays as ``fit_model``'s ``pool`` tensors (None stays None)."""
    return None if pool is None else (to_tensor(pool[0], name="pool images"), torch.from_numpy(pool[1]))


# --------------------------------------------------------------------------- training

@dataclass
class TrainConfig(Checked):
    """How a classifier (target or substitute) is trained.

    Defaults: C3F2, Adam lr 1e-3, no weight decay, batch 64, 20 epochs but at least 300
    optimizer steps (so a 50-image substitute still gets 300 updates, and the target's
    ~1,500 images get 20 epochs). On 1,000 bundled digits this reaches 95% held-out
    accuracy in ~20 s on one (shared) CPU core; LeNet-5 with ``lr=2e-3`` reaches 94% in ~3-12 s.
    """

    model: str = setting("c3f2", flag="--substitute", help="substitute architecture (random init)",
                         choices=lambda: MODEL_NAMES)  # the registry as it is now
    epochs: int = setting(20, flag="--epochs", help="substitute training epochs", most=10_000)
    min_steps: int = setting(300, flag="--min-steps", help="substitute optimizer steps at least", least=0,
                             most=10_000_000)
    batch_size: int = setting(64, flag="--train-batch", help="substitute training batch", most=65_536)
    lr: float = setting(1e-3, above=0, most=10)
    weight_decay: float = setting(0.0, least=0, most=10)
    num_classes: int = setting(10, least=2, most=100_000)
    seed: int = setting(0, least=0, most=SEED_MAX)
    augment: str = setting("none", flag="--augment", choices=AUGMENTS,
                           help="substitute training augmentation: digits (small affine moves), photos (crop and "
                                "flip), auto (by channels), none")

    def to_dict(self) -> dict:
        return asdict(self)


def num_steps(n: int, config: TrainConfig) -> int:
    """Total optimizer steps for ``n`` training images under ``config``."""
    per_epoch = math.ceil(n / config.batch_size)
    return max(config.epochs * per_epoch, config.min_steps)


def augmenter(kind: str, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The batch transform of ``TrainConfig.augment`` for float images ``x (n, C, H, W)``; None for "none"."""
    if kind == "auto":
        kind = "digits" if x.shape[1] == 1 else "photos"
    if kind == "none":
        return None
    if kind == "digits":
        move = v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))
    else:
        move = v2.Compose([v2.RandomCrop(x.shape[-2:], padding=4), v2.RandomHorizontalFlip()])
    return lambda batch: torch.cat([move(group) for group in batch.split(AUGMENT_GROUP)])


def fit_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig, *,
              pool: tuple[torch.Tensor, torch.Tensor] | None = None, rank: int = 0, world_size: int = 1,
              on_epoch: Callable[[int, float], None] | None = None) -> nn.Module:
    """Train ``model`` in place on float ``x (n,C,H,W)`` and int64 ``y``; returns it. ``pool``:
    float pool images ``(m,C,H,W)`` and their target mass ``(m, classes)`` (see the module doc).

    Mini-batches come from one seeded permutation per pass over the data, shared by every
    rank; with ``world_size > 1`` each rank takes its slice of each global batch (the model is
    expected to be DDP-wrapped, which averages the gradients). ``on_epoch(epoch, mean_loss)``
    is called after each pass (Ray Train reports from there).
    """
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    n = len(x)
    if n == 0:
        raise ValueError("images: cannot train on an empty set")
    gen = torch.Generator().manual_seed(config.seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    augment = augmenter(config.augment, x)
    if augment is not None:  # torchvision draws its parameters from torch's global generator
        torch.manual_seed(config.seed + 2)
    if pool is not None and len(pool[0]):
        pool_x, pool_mass = pool[0].to(device), pool[1].to(device)
        pool_gen = torch.Generator().manual_seed(config.seed + 3)
    else:
        pool = None
    steps, step, epoch = num_steps(n, config), 0, 0
    model.train()
    while step < steps:
        perm = torch.randperm(n, generator=gen)
        total, count = 0.0, 0
        for start in range(0, n, config.batch_size):
            if step >= steps:
                break
            idx = perm[start:start + config.batch_size][rank::world_size].to(device)
            if len(idx) == 0:  # fewer images than ranks in this batch: still join the allreduce
                idx = perm[start:start + 1].to(device)
            opt.zero_grad(set_to_none=True)
            batch = x[idx] if augment is None else augment(x[idx])
            loss = loss_fn(model(batch), y[idx])
            if pool is not None:
                pick = torch.randint(len(pool_x), (config.batch_size,), generator=pool_gen)[rank::world_size]
                batch = pool_x[pick] if augment is None else augment(pool_x[pick])
                loss = loss - (pool_mass[pick] * torch.log_softmax(model(batch), dim=1)).sum(dim=1).mean()
            loss.backward()
            opt.step()
            total, count, step = total + loss.item() * len(idx), count + len(idx), step + 1
        if on_epoch is not None:
            on_epoch(epoch, total / max(count, 1))
        epoch += 1
    model.eval()
    return model


def train_classifier(images, labels, config: TrainConfig | None = None, *, pool=None,
                     device: str = "cpu") -> nn.Module:
    """Train a fresh ``config.model`` on uint8 images and int labels; returns it in eval mode.
    ``pool``: uint8 pool images and their float target mass (see the module doc), or None.

    Deterministic per ``config.seed`` (same device and torch thread count).
    """
    config = config or TrainConfig()
    images = check_images(images, min_count=1)
    labels = check_labels(labels, len(images), num_classes=config.num_classes)
    pool = check_pool(pool, images, config.num_classes)
    in_channels, size = image_geometry(images)
    torch.manual_seed(config.seed)
    model = build_model(config.model, in_channels=in_channels, num_classes=config.num_classes,
                        image_size=size).to(device)
    return fit_model(model, to_tensor(images), torch.from_numpy(labels), config, pool=pool_tensors(pool))


@torch.no_grad()
def predict_proba(model: nn.Module, images, *, batch_size: int = 512) -> np.ndarray:
    """Softmax probabilities ``(n, classes)`` float32 for uint8 images or float (n,C,H,W)."""
    x = as_float_batch(images)
    model.eval()
    device = next(model.parameters()).device
    out = [torch.softmax(model(x[i:i + batch_size].to(device)), dim=1).cpu()
           for i in range(0, len(x), batch_size)]
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32)


@torch.no_grad()
def predict(model: nn.Module, images, *, batch_size: int = 512) -> np.ndarray:
    """Predicted labels, int64 ``(n,)``, for uint8 images or float (n,C,H,W) in [0, 1]."""
    x = as_float_batch(images)
    model.eval()
    device = next(model.parameters()).device
    out = [model(x[i:i + batch_size].to(device)).argmax(1).cpu()
           for i in range(0, len(x), batch_size)]
    if not out:
        return np.zeros(0, dtype=np.int64)
    return torch.cat(out).numpy().astype(np.int64)
