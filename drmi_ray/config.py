"""Configuration as data: one dataclass per stage, gathered in ``ExperimentConfig`` (``drmi run``)
and ``ReduceConfig`` (``drmi reduce`` and the jobs).

Each run's settings check themselves (``check``: one-line errors naming the flag, before any work)
and every run folder holds them as ``config.json``, so a run can be repeated from its own folder
(``drmi run --config RUN/config.json``, ``drmi reduce --config RUN/config.json``). The CLI's
flags, their types, defaults and choices (``CHOICES``) come from here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

import fsspec

from drmi_ray.acquisition import METHODS
from drmi_ray.attack import AttackConfig
from drmi_ray.checks import (ATTACK_FLAGS, MAX_SIZE, SEED_MAX, SUBSTITUTE_FLAGS, check_attack, check_bool,
                             check_checkpoint, check_choice, check_exists, check_int, check_number, check_source,
                             check_train, pool_images)
from drmi_ray.data import MAX_PIXELS
from drmi_ray.images import MIN_SIDE
from drmi_ray.matrix import DTYPES
from drmi_ray.mi import COLOR_MODES, LEVELS
from drmi_ray.models import AUGMENTS, MODEL_NAMES, TrainConfig
from drmi_ray.service_protocol import OUTPUTS
from drmi_ray.spread import LEARN_MODES

PROTOCOLS = ("bundled-mnist", "paper-mnist", "paper-cifar10")
PAPER_HELD_OUT = 10000  # torchvision MNIST / CIFAR-10 test sets: the paper's pool + test split
PARTITIONS = ("kmeans", "label", "none")  # drmi reduce: see reduce.partition_pool
# the choices of the settings that have them, by their path in ExperimentConfig or ReduceConfig
CHOICES = {"pool.protocol": PROTOCOLS, "substitute.model": MODEL_NAMES, "substitute.augment": AUGMENTS,
           "mi.color": COLOR_MODES, "target.output": OUTPUTS, "learn": LEARN_MODES, "partition": PARTITIONS,
           "store_dtype": DTYPES}


@dataclass
class PoolConfig:
    protocol: str = "bundled-mnist"  # settings: apply_protocol below; the split: pools.load_data
    source: str = "bundled-mnist"  # see drmi_ray.pools.load_pool
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


class RunSettings:
    """What both runs' settings (``ExperimentConfig``, ``ReduceConfig``) share: dumped to and loaded
    from the run folder's ``config.json`` the same way (``--config``), API keys never written."""

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "endpoint": self.endpoint.to_dict()}

    @classmethod
    def from_dict(cls, data: dict):
        def build(kind, values):
            if not isinstance(values, dict):
                raise ValueError(f"{kind.__name__} settings must be a JSON object, got {type(values).__name__}")
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
    def load(cls, path: str):
        with fsspec.open(path, "r") as f:
            return cls.from_dict(json.load(f))


@dataclass
class ExperimentConfig(RunSettings):
    pool: PoolConfig = field(default_factory=PoolConfig)
    mi: MIConfig = field(default_factory=MIConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    substitute: TrainConfig = field(default_factory=lambda: TrainConfig(model="c3f2"))
    # substitutes learn from "answers", the whole "pool" (spread answers) or "auto" (spread.use_pool);
    # "answers" and no augmentation by default: C3F2 substitutes gain nothing from the pool, LeNet-5 ones
    # do (README, "Does the selection beat random? Does the pool?")
    learn: str = "answers"
    attack: AttackConfig = field(default_factory=AttackConfig)
    substitute_workers: int = 1  # Ray Train workers per substitute fit; 0 = Train's local mode
    substitute_gpu: bool = False  # fit substitutes on GPUs (each worker takes one)
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)  # attack an outside endpoint instead

    def check(self) -> None:
        """Refuse a configuration that cannot run, before any work is done (no Ray, no image decoded;
        a pool URL is listed to bound the splits by its image count).

        Each refusal is a ValueError of one line naming the ``drmi run`` flag (or, for settings with
        no flag, the ``self.json`` key) and the fix.
        """
        pc, sel, tc = self.pool, self.selection, self.target
        unknown = [m for m in sel.methods if m not in METHODS]
        if isinstance(sel.methods, str) or not sel.methods or unknown:
            raise ValueError(f"--methods: unknown method(s) {unknown or list(sel.methods)}; "
                             f"choose from {', '.join(METHODS)} (or 'all')")
        if not sel.budgets or isinstance(sel.budgets, str):
            raise ValueError(f"--budgets must list at least one budget, like 50,100,200; got {sel.budgets!r}")
        for budget in sel.budgets:
            check_int("--budgets", budget, minimum=2, fix="each budget must be at least 2 queries")
        check_int("--seeds", sel.seeds, maximum=1_000, fix="give the number of seeds per (method, budget) cell")
        check_int("selection.first_seed (self.json)", sel.first_seed, minimum=0, maximum=SEED_MAX)
        # pool and splits
        check_choice("--protocol", pc.protocol, PROTOCOLS)
        check_int("--pool-size", pc.pool, maximum=10**8)
        check_int("--test-size", pc.test, maximum=10**8)
        check_int("pool.target_train (self.json)", pc.target_train, maximum=10**8)
        check_int("pool.split_seed (self.json)", pc.split_seed, minimum=0, maximum=SEED_MAX)
        check_int("pool.size (self.json)", pc.size, minimum=MIN_SIDE, maximum=MAX_SIZE, none_ok=True)
        check_bool("--download", pc.download)
        if max(sel.budgets) > pc.pool:
            raise ValueError(f"--budgets: budget {max(sel.budgets)} is larger than the attacker's pool ({pc.pool} images); "
                             "lower the budget or enlarge the pool with --pool-size")
        check_source("--pool", pc.source, download=pc.download)
        if pc.protocol.startswith("paper-"):
            if pc.pool + pc.test > PAPER_HELD_OUT:
                raise ValueError(f"--pool-size {pc.pool} + --test-size {pc.test} exceed the {PAPER_HELD_OUT} held-out "
                                 "images of the paper protocols; lower them")
        else:
            n = pool_images(pc.source)  # a URL is listed
            if pc.target_train + pc.pool + pc.test > n:
                raise ValueError(f"--pool-size {pc.pool} + --test-size {pc.test} + {pc.target_train} target training "
                                 f"images exceed the {n:,} images of {pc.source}; lower --pool-size or --test-size")
        # MI
        check_int("--bins", self.mi.bins, minimum=2, maximum=LEVELS, fix="give the grey levels per pixel (default 256)")
        check_choice("--color", self.mi.color, COLOR_MODES)
        # the target
        check_checkpoint("--target", tc.checkpoint)
        self.endpoint.check()
        if self.endpoint.url:
            if tc.checkpoint:
                raise ValueError("--target and --target-url: give one (a checkpoint we serve, or an endpoint to attack)")
            cells = len(sel.methods) * len(sel.budgets) * sel.seeds
            most = pc.test * (1 + cells)  # the test split once, then each substitute's adversarial examples
            if self.endpoint.eval_budget is not None and self.endpoint.eval_budget < most:
                raise ValueError(f"--eval-budget {self.endpoint.eval_budget}: the referee may need {most} queries (the "
                                 f"{pc.test} test images, then up to {pc.test} adversarial examples for each of {cells} "
                                 "substitutes); raise it, or lower --test-size")
        check_number("--rate-limit", tc.rate_limit, above=0, at_most=1e9, none_ok=True,
                     fix="give images/s, or leave the flag out for no limit")
        check_number("--burst", tc.burst, above=0, at_most=1e9, fix="give how many images may pass at once (default 1)")
        check_int("--target-replicas", tc.replicas, maximum=256)
        check_int("--serve-port", tc.port, minimum=1, maximum=65535, none_ok=True)
        check_choice("--output", tc.output, OUTPUTS)
        check_int("target.decimals (self.json)", tc.decimals, minimum=0, maximum=10)
        check_number("target.prada_delta (self.json)", tc.prada_delta, above=0, at_most=1, none_ok=True,
                     fix="use --no-prada to switch the detector off")
        check_train(dataclasses.asdict(tc.train), lambda f: f"target.train.{f} (self.json)")
        # substitutes and PGD
        check_train(dataclasses.asdict(self.substitute),
                    lambda f: "--substitute" if f == "model" else f"substitute.{f} (self.json)")
        check_attack(dataclasses.asdict(self.attack), lambda f: f"attack.{f} (self.json)")
        check_choice("--learn", self.learn, LEARN_MODES)
        check_int("--substitute-workers", self.substitute_workers, minimum=0, maximum=1_024,
                  fix="0 fits in Ray Train's local mode")
        check_bool("substitute_gpu (self.json)", self.substitute_gpu)


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
class ReduceConfig(RunSettings):
    """``drmi reduce`` / ``jobs/imagenet.py`` / ``jobs/cifar10.py``: pool -> the K least redundant
    images (``selection.json``), and optionally query/fit/attack with them (``target`` set)."""

    data: str = "bundled-mnist"  # see drmi_ray.pools.load_pool: a name or an ImageFolder / Parquet URL
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

    def check(self) -> None:
        """Refuse settings that cannot run, before any work (no Ray, no image decoded): one-line
        ValueErrors naming the ``drmi reduce`` flag and the fix. A pool URL is listed (not decoded)
        to bound --budget, --pool-size and --clusters by its image count."""
        check_int("--budget", self.budget, maximum=10**9, fix="give K, the number of images to select")
        bounds = {"tile_size": 16_384, "max_in_flight": 10_000, "parallel_partitions": 1_000, "dense_max": 50_000,
                  "num_actors": 1_024, "batch_files": 100_000, "max_pixels": 10**9, "test_size": 10**7}
        for name, most in bounds.items():
            check_int("--" + name.replace("_", "-"), getattr(self, name), maximum=most)
        check_int("--size", self.size, minimum=MIN_SIDE, maximum=MAX_SIZE, none_ok=True,
                  fix=f"images are decoded to SIZE x SIZE; smaller than {MIN_SIDE} leaves nothing to compare")
        check_int("--pool-size", self.pool_size, maximum=10**9, none_ok=True)
        check_int("--clusters", self.clusters, maximum=100_000, none_ok=True)
        if self.pool_size is not None and self.budget > self.pool_size:
            raise ValueError(f"--budget {self.budget} is larger than --pool-size {self.pool_size}; lower the budget or "
                             "enlarge the pool")
        check_int("--seed", self.seed, minimum=0, maximum=SEED_MAX)
        check_int("--serve-port", self.serve_port, minimum=1, maximum=65535, none_ok=True)
        check_choice("--partition", self.partition, PARTITIONS)
        check_choice("--store-dtype", self.store_dtype, DTYPES)
        check_number("--gpus-per-tile", self.gpus_per_tile, at_least=0, at_most=16, fix="0 computes MI tiles on CPUs")
        check_int("--bins", self.mi.bins, minimum=2, maximum=LEVELS, fix="give the grey levels per pixel (default 256)")
        check_choice("--color", self.mi.color, COLOR_MODES)
        check_choice("--learn", self.learn, LEARN_MODES)
        check_int("--substitute-workers", self.substitute_workers, minimum=0, maximum=1_024,
                  fix="0 fits in Ray Train's local mode")
        for name in ("rgb", "download", "substitute_gpu"):
            check_bool("--" + name.replace("_", "-"), getattr(self, name))
        check_train(dataclasses.asdict(self.substitute), lambda f: SUBSTITUTE_FLAGS.get(f, f"substitute.{f}"))
        check_attack(dataclasses.asdict(self.attack), lambda f: ATTACK_FLAGS.get(f, f"attack.{f}"))
        check_source("--data", self.data, download=self.download)
        check_checkpoint("--target", self.target)
        self.endpoint.check()
        if self.endpoint.url and self.target:
            raise ValueError("--target and --target-url: give one (a checkpoint we serve, or an endpoint to attack)")
        if self.endpoint.url and self.endpoint.eval_budget is not None and self.endpoint.eval_budget < 2 * self.test_size:
            raise ValueError(f"--eval-budget {self.endpoint.eval_budget}: the referee may need {2 * self.test_size} queries "
                             f"(the {self.test_size} test images, then their adversarial examples); raise it, or lower --test-size")
        check_exists("--test", self.test, "a labelled ImageFolder tree or Parquet shards")
        n = pool_images(self.data)  # last: a URL is listed
        for option, value in (("--budget", self.budget), ("--pool-size", self.pool_size), ("--clusters", self.clusters)):
            if value is not None and value > n:
                raise ValueError(f"{option} {value} is larger than the pool ({n:,} images in {self.data}); lower {option}")
