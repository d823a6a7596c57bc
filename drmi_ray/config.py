"""Configuration as data: one dataclass per stage, gathered in ExperimentConfig.

The CLI builds an ExperimentConfig, and every run folder holds it as ``config.json``, so a run
can be repeated from its own folder (``drmi run --config RUN/config.json``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from drmi_ray.attack import AttackConfig
from drmi_ray.data import MAX_PIXELS, TORCHVISION_SOURCES
from drmi_ray.models import TrainConfig


PROTOCOLS = ("bundled-mnist", "paper-mnist", "paper-cifar10")
BUNDLED_IMAGES = 5000  # the bundled MNIST digits (drmi_ray.data.bundled_mnist)
PAPER_HELD_OUT = 10000  # torchvision MNIST / CIFAR-10 test sets: the paper's pool + test split
TORCHVISION_IMAGES = {"mnist": 60000, "mnist-test": 10000, "cifar10": 50000, "cifar10-test": 10000}


# --------------------------------------------------------------------------- checks at the door
# Used by experiment.check_config and reduce.check_config. ``option`` is what the user typed (the
# CLI flag, or the config.json key when there is no flag); every message is one line with the fix.

def check_int(option: str, value, *, minimum: int = 1, maximum: int | None = None, none_ok: bool = False,
              fix: str = "") -> None:
    """``value`` is an int (not a bool) in ``minimum..maximum``, or None when ``none_ok``."""
    import numbers

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
    import math
    import numbers

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
    import fsspec

    if not isinstance(url, str) or not url:
        raise ValueError(f"{option} must be a path or URL of {what}, got {url!r}")
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise ValueError(f"{option} {url} does not exist; give the path or URL of {what}")


def check_out(out: str, option: str = "--out") -> str:
    """Make sure the run folder ``out`` (a path or fsspec URL) can be created and written: create it
    and write and remove a probe file. Returns ``out`` without a trailing slash; a file in its
    place or an unwritable location is a one-line ValueError naming ``option``."""
    import os
    import uuid

    import fsspec

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
    """A pool source (see drmi_ray.data.load_pool) that can be read: a known name, a torchvision
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
    from drmi_ray.models import MODEL_NAMES

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
        from drmi_ray.models import AUGMENTS

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
    import fsspec

    from drmi_ray.target import load_checkpoint

    check_exists(option, url, "a target checkpoint (.pt)")
    try:
        with fsspec.open(url, "rb") as f:
            load_checkpoint(f)
    except (OSError, ValueError):  # not a torch file, pickled objects, keys missing
        raise ValueError(f"{option} {url} is not a target checkpoint (target.load_checkpoint refuses it); "
                         "give a .pt written by drmi run or target.train_target") from None


def check_address(option: str, address: str | None) -> None:
    """A Ray address ``ray.init`` takes: auto, local, HOST:PORT or ray://HOST:PORT; None passes."""
    import re

    if address is None or address in ("auto", "local"):
        return
    match = re.fullmatch(r"(ray://)?([\w.-]+|\[[0-9a-fA-F:]+\]):(\d+)", str(address))
    if not match or not 1 <= int(match[3]) <= 65535:
        raise ValueError(f"{option} must be auto, local, HOST:PORT or ray://HOST:PORT, got {address!r}")


def pool_images(source: str) -> int:
    """How many images a pool source (``data.load_pool``'s forms) holds: known for the named
    sources, the listing's file count (before decoding) for a URL."""
    if source == "bundled-mnist":
        return BUNDLED_IMAGES
    name, sep, _ = source.partition(":")
    if sep and name in TORCHVISION_IMAGES:
        return TORCHVISION_IMAGES[name]
    from drmi_ray.ingest import list_pool

    return list_pool(source).n_files


@dataclass
class PoolConfig:
    protocol: str = "bundled-mnist"  # settings: apply_protocol below; the split: experiment.load_data
    source: str = "bundled-mnist"  # see drmi_ray.data.load_pool
    target_train: int = 2000  # images the target is trained on (the attacker never sees them)
    pool: int = 2000  # the attacker's unlabeled pool
    test: int = 1000  # held-out truth for accuracy, fidelity and transfer
    split_seed: int = 0
    size: int | None = None  # resize image files to size x size
    download: bool = False


@dataclass
class MIConfig:
    bins: int = 256  # grey levels of the joint histogram (R = 255 in the paper: 256 levels)
    color: str = "flatten"  # "flatten" all channels, or "luminance"


@dataclass
class SelectionConfig:
    methods: tuple[str, ...] = ("drmi", "random")
    budgets: tuple[int, ...] = (50, 100, 200, 400, 600)
    seeds: int = 1  # seeds first_seed..first_seed+seeds-1 per (method, budget) cell
    first_seed: int = 0


@dataclass
class TargetConfig:
    checkpoint: str | None = None  # use this trained target instead of training one
    train: TrainConfig = field(default_factory=lambda: TrainConfig(model="c3f2", epochs=12))
    rate_limit: float | None = None  # images/s the target answers; None = unlimited
    output: str = "label"  # what a query returns: "label", "probs", "top1" or "rounded"
    decimals: int = 2  # output="rounded": decimals kept
    prada_delta: float | None = 0.95  # PRADA detector's Shapiro-Wilk threshold; None = off
    burst: float = 1.0  # images the rate limiter lets through at once (with rate_limit)
    replicas: int = 1  # model replicas behind the target's HTTP API (Ray Serve)
    host: str = "127.0.0.1"  # where Serve's HTTP proxy listens (0.0.0.0: reachable from other nodes)
    port: int | None = None  # Serve's HTTP port, when this run starts Serve; None = a free port


API_KEY_ENV, EVAL_KEY_ENV = "DRMI_API_KEY", "DRMI_EVAL_API_KEY"


@dataclass
class EndpointConfig:
    """An outside prediction endpoint to attack by URL (``--target-url``) in place of a target of
    ours: any Open Inference Protocol v2 server (Triton, KServe, MLServer, ``drmi serve``).

    The API keys are never written to ``config.json``: ``api_key`` (``--api-key``, else
    ``$DRMI_API_KEY``) pays for the attack's queries; ``eval_api_key`` (``--eval-api-key``, else
    ``$DRMI_EVAL_API_KEY``, else the attack's key) pays for the referee's: the test images once
    and each substitute's adversarial examples, at most ``eval_budget`` images in all.
    """

    url: str | None = None  # None: no outside endpoint
    model: str = "target"  # the model's name at the endpoint
    input_name: str | None = None  # the input contract; None: read from the model's metadata
    datatype: str | None = None
    shape: tuple[int, ...] | None = None  # one image's shape, e.g. (784,) or (1, 28, 28)
    output: str | None = None  # the output to ask for; None: the model's only one
    max_batch: int = 64  # images per request
    eval_budget: int | None = None  # the referee's queries at most; None: as many as it needs
    api_key: str | None = field(default=None, repr=False)
    eval_api_key: str | None = field(default=None, repr=False)

    def keys(self) -> tuple[str, str]:
        """The attack's and the referee's API keys; a one-line ValueError when there is none."""
        import os

        key = self.api_key or os.environ.get(API_KEY_ENV)
        if not key:
            raise ValueError(f"--target-url needs an API key: pass --api-key KEY or set {API_KEY_ENV}")
        return key, self.eval_api_key or os.environ.get(EVAL_KEY_ENV) or key

    def client_settings(self, key: str) -> dict:
        """``client.TargetClient``'s arguments for this endpoint with API key ``key``."""
        return {"url": self.url, "key": key, "model": self.model, "max_batch": self.max_batch,
                "input_name": self.input_name, "datatype": self.datatype, "shape": self.shape, "output": self.output}

    def check(self) -> None:
        if self.url is None:
            return
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
            raise ValueError(f"--target-url must be an http:// or https:// base URL, got {self.url!r}")
        if not isinstance(self.model, str) or not self.model or "/" in self.model:
            raise ValueError(f"--target-model must be a model name, got {self.model!r}")
        check_int("--target-max-batch", self.max_batch, maximum=1_000_000)
        check_int("--eval-budget", self.eval_budget, minimum=0, none_ok=True)
        if self.shape is not None:
            if not self.shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in self.shape):
                raise ValueError(f"--target-shape must list one image's positive dims, like 784 or 1,28,28; "
                                 f"got {self.shape!r}")
        self.keys()

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "api_key": None, "eval_api_key": None}


@dataclass
class ExperimentConfig:
    pool: PoolConfig = field(default_factory=PoolConfig)
    mi: MIConfig = field(default_factory=MIConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    substitute: TrainConfig = field(default_factory=lambda: TrainConfig(model="c3f2"))
    # substitutes learn from "answers", the whole "pool" (spread answers) or "auto" (spread.use_pool);
    # "answers" and no augmentation by default: their PGD examples transfer best (README, "Does the pool?")
    learn: str = "answers"
    attack: AttackConfig = field(default_factory=AttackConfig)
    substitute_workers: int = 1  # Ray Train workers per substitute fit; 0 = Train's local mode
    substitute_gpu: bool = False  # fit substitutes on GPUs (each worker takes one)
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)  # attack an outside endpoint instead

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "endpoint": self.endpoint.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "ExperimentConfig":
        def build(kind, values):
            kwargs = {}
            for f in dataclasses.fields(kind):
                if f.name not in values:
                    continue
                value = values[f.name]
                sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
                if dataclasses.is_dataclass(sub):
                    value = build(type(sub), value)
                elif isinstance(value, list):
                    value = tuple(value)
                kwargs[f.name] = value
            unknown = set(values) - {f.name for f in dataclasses.fields(kind)}
            if unknown:
                raise ValueError(f"unknown {kind.__name__} settings {sorted(unknown)}; check the config file")
            return kind(**kwargs)

        return build(cls, data)

    @classmethod
    def load(cls, path: str) -> "ExperimentConfig":
        import fsspec

        with fsspec.open(path, "r") as f:
            return cls.from_dict(json.load(f))


def apply_protocol(config: ExperimentConfig, protocol: str, root: str = "data") -> ExperimentConfig:
    """Settings of the paper's experiments.

    ``bundled-mnist``: the 5,000 bundled digits, split 2,000 / 2,000 / 1,000 (target / pool / test).
    ``paper-mnist``: torchvision MNIST under ``root``; the target trains on the 60k training set,
    the attacker's pool and the test split are disjoint halves of the 10k test set.
    ``paper-cifar10``: the same with CIFAR-10 (50k training set; 5k pool, 5k test) and ResNet18 as
    target and substitute; PGD with eps 8/255, step 2/255, 10 steps.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    r = dataclasses.replace
    if protocol == "bundled-mnist":
        return r(config, pool=r(config.pool, protocol=protocol, source="bundled-mnist"))
    name = "mnist" if protocol == "paper-mnist" else "cifar10"
    config = r(config, pool=r(config.pool, protocol=protocol, source=f"{name}:{root}",
                              target_train=60000 if name == "mnist" else 50000, pool=5000, test=5000))
    if name == "cifar10":
        config.target = r(config.target, train=r(config.target.train, model="resnet18", epochs=30))
        config.substitute = r(config.substitute, model="resnet18")
        config.attack = r(config.attack, eps=8 / 255, step_size=2 / 255, steps=10)
    return config


def quick(config: ExperimentConfig) -> ExperimentConfig:
    """The few-minute version: smaller pool and test set, two budgets, a LeNet-5 target and LeNet-5
    substitutes (a LeNet-5 fit and its PGD take seconds of CPU where C3F2's take half a minute:
    the target trains in 5 s instead of 33 s, to 95% instead of 96% on the test split)."""
    config = dataclasses.replace(config)
    config.pool = dataclasses.replace(config.pool, pool=600, test=500)
    config.selection = dataclasses.replace(config.selection, budgets=(50, 200))
    config.substitute = dataclasses.replace(config.substitute, model="lenet5")
    if config.target.train.model == "c3f2":  # the digits' target (paper-cifar10 keeps its ResNet)
        config.target = dataclasses.replace(config.target, train=dataclasses.replace(config.target.train, model="lenet5"))
    return config


@dataclass
class ReduceConfig:
    """``drmi reduce`` / ``jobs/imagenet.py`` / ``jobs/cifar10.py``: pool -> the K least redundant
    images (``selection.json``), and optionally query/fit/attack with them (``target`` set)."""

    data: str = "bundled-mnist"  # see drmi_ray.data.load_pool: a name or an ImageFolder / Parquet URL
    budget: int = 100  # K, the images selected (and queried, with a target)
    size: int | None = None  # decode image files to size x size (None: their own size, all equal)
    rgb: bool = False  # decode image files as RGB (default grey)
    pool_size: int | None = None  # a seeded random subset of this many images
    download: bool = False  # torchvision sources: download into ROOT
    max_pixels: int = MAX_PIXELS  # larger image files are skipped (decompression bombs)
    batch_files: int = 512  # files per decode unit
    partition: str = "kmeans"  # "kmeans" (label-free), "label" (the pool's own labels) or "none"
    clusters: int | None = None  # k-means clusters (default one per IMAGES_PER_CLUSTER images)
    mi: MIConfig = field(default_factory=MIConfig)
    tile_size: int = 1300  # MI tile side: about one ImageNet class per tile
    max_in_flight: int = 16  # MI tiles in flight per partition
    gpus_per_tile: float = 0.0  # GPUs each MI tile task asks for (0: the CPU kernel)
    store_dtype: str = "float64"  # MI tile store values ("float32" halves the storage)
    parallel_partitions: int = 4  # partitions whose MI is computed at once
    dense_max: int = 20000  # larger partitions are searched by Ray actors reading the tile store
    num_actors: int = 4  # optimizer actors for a partition above dense_max
    seed: int = 0
    # the optional attack with the selection
    target: str | None = None  # a target checkpoint: serve it over HTTP and query it with the selection
    serve_port: int | None = None  # the target's port on 127.0.0.1 when this run starts Ray Serve; None: a free one
    test: str | None = None  # the referee's labelled held-out pool (default: unselected pool images)
    test_size: int = 500
    substitute: TrainConfig = field(default_factory=lambda: TrainConfig(model="resnet18", epochs=10, min_steps=100,
                                                                       batch_size=64))
    learn: str = "answers"  # as ExperimentConfig.learn, the graph from each partition's tile store
    attack: AttackConfig = field(default_factory=AttackConfig)
    substitute_workers: int = 1  # Ray Train workers for the substitute; 0 = Train's local mode
    substitute_gpu: bool = False
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)  # query an outside endpoint instead of target

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "endpoint": self.endpoint.to_dict()}
