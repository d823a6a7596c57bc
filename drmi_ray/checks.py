"""The checks at the door: each setting's bounds, as one-line ValueErrors.

``option`` is what the user typed (the CLI flag, or the ``config.json`` key when there is no
flag); every message names it and says what to do. Used by the settings' own ``check`` methods
(``config.py``) and by the CLI before a run starts.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import uuid

import fsspec

from drmi_ray.data import TORCHVISION_SOURCES
from drmi_ray.ingest import list_pool
from drmi_ray.models import AUGMENTS, MODEL_NAMES
from drmi_ray.target import load_checkpoint

BUNDLED_IMAGES = 5000  # the bundled MNIST digits (drmi_ray.data.bundled_mnist)
TORCHVISION_IMAGES = {"mnist": 60000, "mnist-test": 10000, "cifar10": 50000, "cifar10-test": 10000}


def check_int(option: str, value, *, minimum: int = 1, maximum: int | None = None, none_ok: bool = False,
              fix: str = "") -> None:
    """``value`` is an int (not a bool) in ``minimum..maximum``, or None when ``none_ok``."""
    if value is None and none_ok:
        return
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        if minimum == 1:
            want = "a positive integer" + (f" up to {maximum:,}" if maximum is not None else "")
        else:
            want = f"an integer in {minimum}..{maximum:,}" if maximum is not None else f"an integer >= {minimum}"
        raise ValueError(f"{option} must be {want}, got {value!r}" + (f"; {fix}" if fix else ""))


def check_number(option: str, value, *, above: float | None = None, at_least: float | None = None,
                 at_most: float | None = None, none_ok: bool = False, fix: str = "") -> None:
    """``value`` is a finite real number (not a bool, NaN or infinity) with ``value > above``, ``>= at_least``,
    ``<= at_most``, or None when ``none_ok``."""
    if value is None and none_ok:
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (above is None or value > above) and (at_least is None or value >= at_least)
    ok = ok and (at_most is None or value <= at_most)
    if not ok:
        lower = f"> {above:g}" if above is not None else f">= {at_least:g}" if at_least is not None else ""
        upper = f"<= {at_most:g}" if at_most is not None else ""
        want = " and ".join(x for x in (lower, upper) if x) or "a number"
        raise ValueError(f"{option} must be a number {want}, got {value!r}" + (f"; {fix}" if fix else ""))


def check_choice(option: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{option} must be one of {', '.join(map(str, choices))}, got {value!r}")


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
    name, sep, root = source.partition(":")
    if sep and name in TORCHVISION_SOURCES:
        if not download:
            check_exists(option, root or ".", f"the torchvision {name} data (or pass --download)")
        return
    check_exists(option, source, "the pool (an ImageFolder tree or Parquet shards)")


SEED_MAX = 2**32 - 1  # seeds: numpy's and torch's common range
MAX_SIZE = 4096  # --size: a 4096 x 4096 RGB image is 50 MB decoded
# the training (models.TrainConfig) and PGD (attack.AttackConfig) settings' bounds: (least, most)
TRAIN_BOUNDS = {"epochs": (1, 10_000), "min_steps": (0, 10_000_000), "batch_size": (1, 65_536),
                "num_classes": (2, 100_000), "seed": (0, SEED_MAX)}
ATTACK_BOUNDS = {"steps": (0, 100_000), "batch_size": (1, 65_536), "seed": (0, SEED_MAX)}
# drmi reduce's flags for them (other fields have no flag)
SUBSTITUTE_FLAGS = {"model": "--substitute", "epochs": "--epochs", "min_steps": "--min-steps",
                    "batch_size": "--train-batch"}
ATTACK_FLAGS = {"eps": "--eps", "steps": "--pgd-steps"}


def check_train(settings: dict, option) -> None:
    """Bounds of a classifier's training settings (``models.TrainConfig`` fields; those absent from
    ``settings`` are not checked). A dict, so the CLI can check its flags before the dataclass,
    which names no flag, refuses them. ``option(field)``: what the user typed for ``field``."""
    if "model" in settings:
        check_choice(option("model"), settings["model"], MODEL_NAMES)
    for name, (least, most) in TRAIN_BOUNDS.items():
        if name in settings:
            check_int(option(name), settings[name], minimum=least, maximum=most)
    if "lr" in settings:
        check_number(option("lr"), settings["lr"], above=0, at_most=10)
    if "weight_decay" in settings:
        check_number(option("weight_decay"), settings["weight_decay"], at_least=0, at_most=10)
    if "augment" in settings:
        check_choice(option("augment"), settings["augment"], AUGMENTS)


def check_attack(settings: dict, option) -> None:
    """Bounds of PGD's settings (``attack.AttackConfig`` fields), as ``check_train``."""
    if "eps" in settings:
        check_number(option("eps"), settings["eps"], at_least=0, at_most=1, fix="pixels are in [0, 1]")
    if "step_size" in settings:
        check_number(option("step_size"), settings["step_size"], above=0, at_most=1)
    for name, (least, most) in ATTACK_BOUNDS.items():
        if name in settings:
            check_int(option(name), settings[name], minimum=least, maximum=most)
    if "random_start" in settings:
        check_bool(option("random_start"), settings["random_start"])


def check_bool(option: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{option} must be true or false, got {value!r}")


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
    name, sep, _ = source.partition(":")
    if sep and name in TORCHVISION_IMAGES:
        return TORCHVISION_IMAGES[name]
    return list_pool(source).n_files


