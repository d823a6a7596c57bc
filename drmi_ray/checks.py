"""The checks at the door that look past one setting's bounds: paths and URLs that must exist, a
run folder that must be writable, a checkpoint that must load, a Ray address, a pool's image count.

``option`` is what the user typed (the CLI flag); every message names it and says what to do.
Used by the runs' ``check`` methods (``config.py``) and by the CLI before a run starts. A
setting's own bounds are declared with it (``settings.setting``).
"""

from __future__ import annotations

import os
import re
import uuid

import fsspec

from drmi_ray.data import torchvision_source
from drmi_ray.ingest import list_pool
from drmi_ray.target import load_checkpoint

MAX_SIZE = 4096  # --size: a 4096 x 4096 RGB image is 50 MB decoded
BUNDLED_IMAGES = 5000  # the bundled MNIST digits (drmi_ray.data.bundled_mnist)
TORCHVISION_IMAGES = {"mnist": 60000, "mnist-test": 10000, "cifar10": 50000, "cifar10-test": 10000}


def check_exists(option: str, url: str | None, what: str) -> None:
    """``url`` (a path or fsspec URL) exists; None passes."""
    if url is None:
        return
    if not isinstance(url, str) or not url:
        raise ValueError(f"{option} must be a path or URL of {what}, got {url!r}")
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise ValueError(f"{option} {url} does not exist; give the path or URL of {what}")


def check_out(out: str, option: str = "--out") -> str:
    """Make sure the run folder ``out`` (a path or fsspec URL) can be created and written: create it
    and write and remove a probe file. Returns ``out`` without a trailing slash; a file in its
    place or an unwritable location is a one-line ValueError naming ``option``."""
    if not isinstance(out, str) or not out.strip("/"):
        raise ValueError(f"{option} must be a folder path or fsspec URL, got {out!r}")
    out = out.rstrip("/")
    try:
        fs, path = fsspec.core.url_to_fs(out)
        if fs.isfile(path):
            raise ValueError(f"{option} {out} is a file, not a folder; give a folder path (new or existing)")
        fs.makedirs(path, exist_ok=True)
        probe = f"{path}/.drmi-write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        fs.pipe_file(probe, b"ok")
        fs.rm(probe)
    except OSError as err:  # PermissionError, NotADirectoryError, FileExistsError, ...
        reason = err.strerror or (str(err).splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{option} {out} cannot be created or written ({reason}); "
                         "choose a folder you can write to") from err
    return out


def check_source(option: str, source: str, *, download: bool) -> None:
    """A pool source (see drmi_ray.pools.load_pool) that can be read: a known name, a torchvision
    root that exists (or ``download``), or an existing ImageFolder / Parquet URL."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"{option} must be bundled-mnist, mnist:ROOT, cifar10:ROOT or a URL, got {source!r}")
    if source == "bundled-mnist":
        return
    if named := torchvision_source(source):
        if not download:
            check_exists(option, named[1] or ".", f"the torchvision {named[0]} data (or pass --download)")
        return
    check_exists(option, source, "the pool (an ImageFolder tree or Parquet shards)")


def check_checkpoint(option: str, url: str | None) -> None:
    """``url`` (a path or fsspec URL) is a target checkpoint ``target.load_checkpoint`` reads; None passes."""
    if url is None:
        return
    check_exists(option, url, "a target checkpoint (.pt)")
    try:
        with fsspec.open(url, "rb") as f:
            load_checkpoint(f)
    except (OSError, ValueError):  # not a torch file, pickled objects, keys missing
        raise ValueError(f"{option} {url} is not a target checkpoint (target.load_checkpoint refuses it); "
                         "give a .pt written by drmi run or target.train_target") from None


def check_address(option: str, address: str | None) -> None:
    """A Ray address ``ray.init`` takes: auto, local, HOST:PORT or ray://HOST:PORT; None passes."""
    if address is None or address in ("auto", "local"):
        return
    match = re.fullmatch(r"(ray://)?([\w.-]+|\[[0-9a-fA-F:]+\]):(\d+)", str(address))
    if not match or not 1 <= int(match[3]) <= 65535:
        raise ValueError(f"{option} must be auto, local, HOST:PORT or ray://HOST:PORT, got {address!r}")


def pool_images(source: str) -> int:
    """How many images a pool source (``pools.load_pool``'s forms) holds: known for the named
    sources, the listing's file count (before decoding) for a URL."""
    if source == "bundled-mnist":
        return BUNDLED_IMAGES
    if named := torchvision_source(source):
        return TORCHVISION_IMAGES[named[0]]
    return list_pool(source).n_files


