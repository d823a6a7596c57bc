"""Configuration as data: one dataclass per stage, gathered in ExperimentConfig.

The CLI builds an ExperimentConfig, and every run folder holds it as ``config.json``, so a run
can be repeated from its own folder (``drmi run --config RUN/config.json``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from drmi_ray.attack import AttackConfig
from drmi_ray.models import TrainConfig


@dataclass
class PoolConfig:
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
    seeds: int = 1  # seeds 0..seeds-1 per (method, budget) cell


@dataclass
class TargetConfig:
    checkpoint: str | None = None  # use this trained target instead of training one
    train: TrainConfig = field(default_factory=lambda: TrainConfig(model="c3f2", epochs=12))
    rate_limit: float | None = None  # images/s the target answers; None = unlimited
    output: str = "label"  # what a query returns: "label" or "probs"


@dataclass
class ExperimentConfig:
    pool: PoolConfig = field(default_factory=PoolConfig)
    mi: MIConfig = field(default_factory=MIConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    substitute: TrainConfig = field(default_factory=lambda: TrainConfig(model="c3f2"))
    attack: AttackConfig = field(default_factory=AttackConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

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


def quick(config: ExperimentConfig) -> ExperimentConfig:
    """The few-minute version: smaller pool and test set, two budgets."""
    config = dataclasses.replace(config)
    config.pool = dataclasses.replace(config.pool, pool=600, test=500)
    config.selection = dataclasses.replace(config.selection, budgets=(50, 200))
    return config
