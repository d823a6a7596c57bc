"""Configuration as data: one dataclass per stage (pool, MI, selection, target, substitute, attack,
endpoint), nested the same way in ``ExperimentConfig`` (``drmi run``) and ``ReduceConfig``
(``drmi reduce`` and the jobs).

Each setting is declared once (``settings.setting``: default, flag, help, bounds); each stage checks
its own fields when it is made, and each run's ``check`` adds what needs several fields or a look
at the disk (one-line errors naming the flag, before any work). Every run folder holds its
settings as ``config.json``, so a run can be repeated from its own folder (``drmi run --config
RUN/config.json``, ``drmi reduce --config RUN/config.json``). The CLI's flags, their types,
defaults, choices and help come from here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import fsspec

from drmi_ray.acquisition import METHODS
from drmi_ray.attack import AttackConfig
from drmi_ray.checks import MAX_SIZE, check_checkpoint, check_exists, check_source, pool_images
from drmi_ray.data import MAX_PIXELS
from drmi_ray.images import MIN_SIDE
from drmi_ray.matrix import DEFAULT_TILE_SIZE, DTYPES
from drmi_ray.mi import COLOR_MODES, LEVELS
from drmi_ray.models import TrainConfig
from drmi_ray.service_protocol import OUTPUTS
from drmi_ray.settings import SEED_MAX, Checked, check_int, setting
from drmi_ray.spread import LEARN_MODES

PROTOCOLS = ("bundled-mnist", "paper-mnist", "paper-cifar10")
PAPER_HELD_OUT = 10000  # torchvision MNIST / CIFAR-10 test sets: the paper's pool + test split
PARTITIONS = ("kmeans", "label", "none")  # drmi reduce: see reduce.partition_pool
IMAGES_PER_CLUSTER = DEFAULT_TILE_SIZE  # drmi reduce's default k-means granularity: one tile per cluster


@dataclass
class PoolConfig(Checked):
    """``drmi run``'s pool protocol: the target's training images, the attacker's pool and the test split."""

    protocol: str = setting("bundled-mnist", flag="--protocol", choices=PROTOCOLS,
                            help="the paper's settings; paper-* read torchvision data under --data-root")
    source: str = setting("bundled-mnist", flag="--pool",  # see drmi_ray.pools.load_pool
                          help="pool source: bundled-mnist, mnist:ROOT, cifar10:ROOT, or a URL")
    target_train: int = setting(2000, most=10**8)  # images the target is trained on (the attacker never sees them)
    pool: int = setting(2000, flag="--pool-size", help="images in the attacker's pool", most=10**8)
    test: int = setting(1000, flag="--test-size", help="images in the test split", most=10**8)
    split_seed: int = setting(0, least=0, most=SEED_MAX)
    size: int | None = setting(None, least=MIN_SIDE, most=MAX_SIZE)  # resize image files to size x size
    download: bool = setting(False, flag="--download", help="let torchvision download MNIST / CIFAR-10 into ROOT")


@dataclass
class MIConfig(Checked):
    """What the pairwise MI is (bins, colour) and how its tile store is computed and kept."""

    bins: int = setting(256, flag="--bins", help="MI grey levels", least=2, most=LEVELS,
                        fix="give the grey levels per pixel (default 256)")  # R = 255 in the paper: 256 levels
    color: str = setting("flatten", flag="--color", choices=COLOR_MODES, help="MI colour mode")
    tile_size: int = setting(DEFAULT_TILE_SIZE, flag="--tile-size", help="MI tile side", most=16_384)
    store_dtype: str = setting("float64", flag="--store-dtype", choices=DTYPES,
                               help="MI tile store values (float32 halves the storage; float64 is exact)")
    max_in_flight: int | None = setting(None, flag="--max-in-flight", most=10_000,
                                        help="MI tiles in flight at once (default: twice the cluster's CPUs)")
    gpus_per_tile: float = setting(0.0, flag="--gpus-per-tile", least=0, most=16, fix="0 computes MI tiles on CPUs",
                                   help="GPUs each MI tile task asks for (0: CPU)")

    def store_options(self) -> dict:
        """``matrix.compute_mi_matrix``'s (and ``compute_stores``') options for these settings."""
        return {"bins": self.bins, "color": self.color, "tile_size": self.tile_size, "dtype": self.store_dtype,
                "max_in_flight": self.max_in_flight, "gpus_per_tile": self.gpus_per_tile}


@dataclass
class SelectionConfig(Checked):
    methods: tuple[str, ...] = setting(("drmi", "random"), flag="--methods",
                                       help=f"comma-separated methods, or 'all': {', '.join(METHODS)} (all are "
                                            "label-free: no method reads the pool's labels)")
    budgets: tuple[int, ...] = setting((50, 100, 200, 400, 600), flag="--budgets", help="comma-separated query budgets")
    seeds: int = setting(1, flag="--seeds", help="seeds per (method, budget) cell", most=1_000,
                         fix="give the number of seeds per (method, budget) cell")
    first_seed: int = setting(0, least=0, most=SEED_MAX)  # seeds first_seed..first_seed+seeds-1 per cell


@dataclass
class TargetConfig(Checked):
    """The target of ours: its checkpoint (or how to train one) and how its HTTP API answers and meters."""

    checkpoint: str | None = setting(None, flag="--target",
                                     help="a trained target checkpoint to attack (drmi run trains one when it is not given)")
    train: TrainConfig = setting(factory=lambda: TrainConfig(model="c3f2", epochs=12), flag=False)
    rate_limit: float | None = setting(None, flag="--rate-limit", above=0, most=1e9,
                                       help="target's answer rate in images/s (default unlimited)",
                                       fix="give images/s, or leave the flag out for no limit")
    output: str = setting("label", flag="--output", choices=OUTPUTS, help="what the target answers")
    decimals: int = setting(2, least=0, most=10)  # output="rounded": decimals kept
    # PRADA detector's Shapiro-Wilk threshold; None = off (--no-prada)
    prada_delta: float | None = setting(0.95, above=0, most=1, fix="use --no-prada to switch the detector off")
    burst: float = setting(1.0, flag="--burst", above=0, most=1e9, help="images the rate limiter lets through at once",
                           fix="give how many images may pass at once (default 1)")
    replicas: int = setting(1, flag="--target-replicas", most=256, help="model replicas behind the target's HTTP API")
    host: str = "127.0.0.1"  # where Serve's HTTP proxy listens (0.0.0.0: reachable from other nodes)
    port: int | None = setting(None, flag="--serve-port", most=65535,
                               help="the target's HTTP port when this run starts Ray Serve (default: a free port; "
                                    "a taken one is refused)")

    def service_options(self) -> dict:
        """``service.run_target``'s options for this target."""
        return {"output": self.output, "decimals": self.decimals, "replicas": self.replicas, "host": self.host,
                "port": self.port}

    def key_settings(self, budget: int) -> dict:
        """An API key's settings: its budget and the target's rate limit and PRADA threshold."""
        return {"budget": budget, "rate_limit": self.rate_limit, "burst": self.burst, "prada_delta": self.prada_delta}

    def client_batch(self) -> int | None:
        """Images per request a client of this target sends: a rate limit's burst (None: no limit)."""
        return None if self.rate_limit is None else max(1, int(self.burst))


API_KEY_ENV, EVAL_KEY_ENV = "DRMI_API_KEY", "DRMI_EVAL_API_KEY"


@dataclass
class EndpointConfig(Checked):
    """An outside prediction endpoint to attack by URL (``--target-url``) in place of a target of
    ours: any Open Inference Protocol v2 server (Triton, KServe, MLServer, ``drmi serve``).

    The API keys are never written to ``config.json``: ``api_key`` (``--api-key``, else
    ``$DRMI_API_KEY``) pays for the attack's queries; ``eval_api_key`` (``--eval-api-key``, else
    ``$DRMI_EVAL_API_KEY``, else the attack's key) pays for the referee's: the test images once
    and each substitute's adversarial examples, at most ``eval_budget`` images in all.
    """

    url: str | None = setting(None, flag="--target-url",
                              help="the endpoint's base URL (the part before /v2/...): the run's queries are spent "
                                   "there, and the referee scores black-box (see the README)")
    model: str = setting("target", flag="--target-model", help="the model's name at the endpoint")
    input_name: str | None = setting(None, flag="--target-input", help="the input's name (default: from the "
                                                                       "model's metadata)")
    datatype: str | None = setting(None, flag="--target-datatype",
                                   help="the input's datatype, e.g. UINT8 or FP32 (FP32: pixels scaled to 0..1; "
                                        "default: from the metadata)")
    shape: tuple[int, ...] | None = setting(None, flag="--target-shape",
                                            help="one image's shape at the input, e.g. 784 or 1,28,28 (default: from "
                                                 "the metadata)")
    output: str | None = setting(None, flag="--target-output",
                                 help="the output to ask for: labels or probability rows (default: the model's only "
                                      "output)")
    max_batch: int = setting(64, flag="--target-max-batch", most=1_000_000, help="images per request")
    eval_budget: int | None = setting(None, flag="--eval-budget", least=0,
                                      help="refuse to start when the referee could need more queries than this")
    api_key: str | None = setting(None, flag="--api-key", repr=False,
                                  help=f"the API key the attack's queries are charged to (default ${API_KEY_ENV})")
    eval_api_key: str | None = setting(None, flag="--eval-api-key", repr=False,
                                       help=f"the key the referee's queries are charged to: the test images and the "
                                            f"adversarial examples (default ${EVAL_KEY_ENV}, else --api-key)")

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
            given = [f for f in dataclasses.fields(self) if getattr(self, f.name) != f.default]
            if given:  # it would be ignored
                flag = given[0].metadata["flag"]
                raise ValueError(f"{flag} applies to an outside endpoint only: give --target-url too, or leave {flag} out")
            return
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
            raise ValueError(f"--target-url must be an http:// or https:// base URL, got {self.url!r}")
        if not isinstance(self.model, str) or not self.model or "/" in self.model:
            raise ValueError(f"--target-model must be a model name, got {self.model!r}")
        if self.shape is not None:
            if not self.shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in self.shape):
                raise ValueError(f"--target-shape must list one image's positive dims, like 784 or 1,28,28; "
                                 f"got {self.shape!r}")
        self.keys()

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "api_key": None, "eval_api_key": None}


# substitutes learn from "answers", the whole "pool" (spread answers) or "auto" (spread.use_pool)
LEARN_HELP = ("what a substitute learns from: the target's answers alone, or the whole unlabeled pool with the "
              "answers spread over the MI graph (the pool's own labels are never read); auto picks by the rule in "
              "drmi_ray/spread.py (C3F2 substitutes gain nothing from the pool; LeNet-5 ones gain accuracy and "
              "transfer: see the README)")


@dataclass
class RunSettings:
    """What both runs' settings (``ExperimentConfig``, ``ReduceConfig``) share: how substitutes learn
    and are attacked, the outside endpoint, and ``config.json`` (dumped and loaded the same way:
    ``--config``; API keys never written)."""

    # "answers" and no augmentation by default: C3F2 substitutes gain nothing from the pool, LeNet-5 ones
    # do (README, "Does the selection beat random? Does the pool?"); drmi reduce's graph is per partition
    learn: str = setting("answers", flag="--learn", choices=LEARN_MODES, help=LEARN_HELP)
    attack: AttackConfig = setting(factory=AttackConfig, help="PGD attack")
    substitute_workers: int = setting(1, flag="--substitute-workers", least=0, most=1_024,
                                      help="Ray Train workers per substitute fit (0 = local mode)",
                                      fix="0 fits in Ray Train's local mode")
    substitute_gpu: bool = setting(False, flag="--substitute-gpu", help="fit substitutes on GPUs (one per worker)")
    endpoint: EndpointConfig = setting(factory=EndpointConfig, help="attack an outside endpoint (any Open Inference "
                                                                   "Protocol v2 server) instead of --target")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "endpoint": self.endpoint.to_dict()}

    @classmethod
    def from_dict(cls, data: dict):
        """The settings of ``data`` (``to_dict``'s form); a setting left out keeps this run's
        default (a nested stage's too: ``ReduceConfig``'s substitute is a ResNet18)."""
        def build(default, values, where):
            kind = type(default)
            if not isinstance(values, dict):
                raise ValueError(f"{where or kind.__name__} settings must be a JSON object, got {type(values).__name__}")
            unknown = set(values) - {f.name for f in dataclasses.fields(kind)}
            if unknown:
                raise ValueError(f"unknown {kind.__name__} settings {sorted(unknown)}; check the config file")
            kwargs = {}
            for name, value in values.items():
                inner = getattr(default, name)
                if dataclasses.is_dataclass(inner):
                    value = build(inner, value, where + name + ".")
                elif isinstance(value, list):
                    value = tuple(value)
                kwargs[name] = value
            try:
                return dataclasses.replace(default, **kwargs)
            except ValueError as err:  # a stage refused one of its own fields: say where it is
                raise ValueError(f"{where}{err}") from None

        return build(cls(), data, "")

    @classmethod
    def load(cls, path: str):
        with fsspec.open(path, "r") as f:
            return cls.from_dict(json.load(f))


def check_run_target(target: TargetConfig, endpoint: EndpointConfig, referee_queries: int) -> None:
    """Both runs' target: a checkpoint we serve or an outside endpoint, never both; the referee's
    ``referee_queries`` at most within the endpoint's ``--eval-budget``."""
    check_checkpoint("--target", target.checkpoint)
    endpoint.check()
    if endpoint.url and target.checkpoint:
        raise ValueError("--target and --target-url: give one (a checkpoint we serve, or an endpoint to attack)")
    if endpoint.url and endpoint.eval_budget is not None and endpoint.eval_budget < referee_queries:
        raise ValueError(f"--eval-budget {endpoint.eval_budget}: the referee may need {referee_queries} queries (the "
                         "test images once, then each substitute's adversarial examples); raise it, or lower "
                         "--test-size")


@dataclass
class ExperimentConfig(RunSettings, Checked):
    """``drmi run`` / ``jobs/mnist.py``: methods x budgets x seeds on one pool protocol."""

    pool: PoolConfig = setting(factory=PoolConfig, help="the pool and its splits")
    mi: MIConfig = setting(factory=MIConfig, help="mutual information")
    selection: SelectionConfig = setting(factory=SelectionConfig, help="selection")
    target: TargetConfig = setting(factory=TargetConfig, help="the target")
    substitute: TrainConfig = setting(factory=lambda: TrainConfig(model="c3f2"), help="substitutes")

    def check(self) -> None:
        """Refuse a configuration that cannot run, before any work is done (no Ray, no image decoded;
        a pool URL is listed to bound the splits by its image count): what no one stage can check
        alone. Each refusal is a ValueError of one line naming the ``drmi run`` flag and the fix."""
        pc, sel = self.pool, self.selection
        unknown = [m for m in sel.methods if m not in METHODS]
        if isinstance(sel.methods, str) or not sel.methods or unknown:
            raise ValueError(f"--methods: unknown method(s) {unknown or list(sel.methods)}; "
                             f"choose from {', '.join(METHODS)} (or 'all')")
        if not sel.budgets or isinstance(sel.budgets, str):
            raise ValueError(f"--budgets must list at least one budget, like 50,100,200; got {sel.budgets!r}")
        for budget in sel.budgets:
            check_int("--budgets", budget, minimum=2, fix="each budget must be at least 2 queries")
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
        cells = len(sel.methods) * len(sel.budgets) * sel.seeds
        check_run_target(self.target, self.endpoint, pc.test * (1 + cells))


@dataclass
class ReducePoolConfig(Checked):
    """``drmi reduce``'s pool (decoded from files or a named source) and the referee's held-out images."""

    source: str = setting("bundled-mnist", flag="--data",  # see drmi_ray.pools.load_pool
                          help="the pool: an ImageFolder tree or Parquet shards (path or fsspec URL), bundled-mnist, "
                               "mnist:ROOT or cifar10:ROOT (default: none, required unless --config gives it)")
    pool: int | None = setting(None, flag="--pool-size", most=10**9,
                               help="use a seeded random subset of this many pool images")
    size: int | None = setting(None, flag="--size", least=MIN_SIDE, most=MAX_SIZE,
                               help="decode image files to SIZE x SIZE (default: their own size, all equal)",
                               fix=f"images are decoded to SIZE x SIZE; smaller than {MIN_SIDE} leaves nothing to compare")
    rgb: bool = setting(False, flag="--rgb", help="decode image files as RGB (default grey)")
    download: bool = setting(False, flag="--download", help="let torchvision download mnist:/cifar10: data into ROOT")
    max_pixels: int = setting(MAX_PIXELS, flag="--max-pixels", most=10**9,
                              help="skip (and list) image files above this many pixels (decompression bombs)")
    batch_files: int = setting(512, flag="--batch-files", most=100_000, help="files per decode unit")
    test_source: str | None = setting(None, flag="--test",
                                      help="the referee's labelled held-out ImageFolder/Parquet (default: the "
                                           "source's test split for mnist:/cifar10:, else unselected labelled pool "
                                           "images)")
    test: int = setting(500, flag="--test-size", most=10**7, help="referee's held-out images")


@dataclass
class ReduceSelectionConfig(Checked):
    """``drmi reduce``'s selection: K images, per partition of the pool."""

    budget: int = setting(100, flag="--budget -k", most=10**9, fix="give K, the number of images to select",
                          help="K, the number of images to select (default: none, required unless --config gives it)")
    partition: str = setting("kmeans", flag="--partition", choices=PARTITIONS,
                             help="MI and selection per k-means cluster of the images (label-free), per class using "
                                  "the pool's own labels (class folders / 'label' column: only if you want labels "
                                  "used), or one global matrix")
    clusters: int | None = setting(None, flag="--clusters", most=100_000,
                                   help=f"k-means clusters (default: one per {IMAGES_PER_CLUSTER:,} images)")
    parallel_partitions: int = setting(4, flag="--parallel-partitions", most=1_000,
                                       help="partitions whose MI is computed at once")
    dense_max: int = setting(20000, flag="--dense-max", most=50_000,
                             help="partitions up to this size select on a dense matrix; larger ones use Ray actors")
    num_actors: int = setting(4, flag="--num-actors", most=1_024, help="optimizer actors for partitions above --dense-max")
    seed: int = setting(0, flag="--seed", least=0, most=SEED_MAX,
                        help="seed of the subset, k-means, the search and the substitute")


@dataclass
class ReduceConfig(RunSettings, Checked):
    """``drmi reduce`` / ``jobs/imagenet.py`` / ``jobs/cifar10.py``: pool -> the K least redundant
    images (``selection.json``), and optionally query/fit/attack with them (``target.checkpoint`` or
    ``endpoint.url`` set)."""

    pool: ReducePoolConfig = setting(factory=ReducePoolConfig, help="the pool")
    mi: MIConfig = setting(factory=MIConfig, help="mutual information")
    selection: ReduceSelectionConfig = setting(factory=ReduceSelectionConfig, help="selection")
    # no PRADA by default: a key's detector keeps every queried image (journal and memory) and compares
    # each with all earlier ones, too much for an ImageNet-sized budget; target.train is drmi run's only
    target: TargetConfig = setting(factory=lambda: TargetConfig(prada_delta=None),
                                   help="the target (optional): query it with the selection, fit a substitute, attack")
    substitute: TrainConfig = setting(factory=lambda: TrainConfig(model="resnet18", epochs=10, min_steps=100),
                                      help="the substitute")

    def check(self) -> None:
        """Refuse settings that cannot run, before any work (no Ray, no image decoded): one-line
        ValueErrors naming the ``drmi reduce`` flag and the fix. A pool URL is listed (not decoded)
        to bound --budget, --pool-size and --clusters by its image count."""
        pc, sel = self.pool, self.selection
        if pc.pool is not None and sel.budget > pc.pool:
            raise ValueError(f"--budget {sel.budget} is larger than --pool-size {pc.pool}; lower the budget or "
                             "enlarge the pool")
        check_source("--data", pc.source, download=pc.download)
        check_run_target(self.target, self.endpoint, 2 * pc.test)
        check_exists("--test", pc.test_source, "a labelled ImageFolder tree or Parquet shards")
        n = pool_images(pc.source)  # last: a URL is listed
        for option, value in (("--budget", sel.budget), ("--pool-size", pc.pool), ("--clusters", sel.clusters)):
            if value is not None and value > n:
                raise ValueError(f"{option} {value} is larger than the pool ({n:,} images in {pc.source}); lower {option}")
