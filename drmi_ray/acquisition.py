"""Ways of spending a query budget: the method registry and its one entry point, ``acquire``.

Every method spends **exactly** ``budget`` queries through one ``query`` function that the caller
supplies (in the experiment ``TargetClient(url, key).query``: the target's HTTP API), so the target counts
every method the same way. No Ray in here: the caller fans out the cells.

Entry point::

    got = acquire("cpb", pool_images, 200, query, seed=0, substitute_config=TrainConfig())
    got.images   # uint8 (200, H, W[, C]): what was queried, in query order
    got.labels   # int64 (200,): the target's answers
    got.indices  # int64 (200,): pool index of each image, -1 for a synthetic one (jbda)

``query(images uint8 (n, ...)) -> labels int64 (n,)``; a query that answers probability rows
``(n, classes)`` is accepted too (its argmax is used).

Query order: each method sends its queries in its own natural order, the order its algorithm
picks them; a method that picks a set (the swap-search optimizer) sends it in a seeded shuffle
(``drmi.seeded_shuffle(indices, seed)``). Never in pool-index order: a pool stored by class would
otherwise reach the target class by class, which is what a stealth detector such as PRADA sees.

Methods (``METHODS``, in registration order; ``MI_METHODS`` take the pool's MI matrix), their
exact rules in their modules' docstrings: ``random`` and DRMI's family in ``drmi.py`` (drmi,
drmi-sqrt, drmi-joint, drmi-balanced, drmi-typical, drmi-cover, drmi-mix), the paper's rivals in
``baselines.py`` (cmal, cpb, trace, kcenter, jbda).

A method is a runner registered with ``register_method(name, runner, needs_mi=..., min_budget=...)``;
``acquire`` calls it as ``runner(record, budget, seed=seed, mi=mi, config=config)`` (``mi`` the
caller's ``(n, n)`` MI matrix, checked when ``needs_mi``; ``config`` the substitute's
``TrainConfig`` with the run's seed). It spends exactly ``budget`` queries through ``record``, an
``AttackerRecord`` (``record.ask_pool(indices)``, or ``record.ask(images, -1)`` for synthetic
images), and returns a dict of details for ``Acquired.info``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import baselines, drmi
from .client import labels_of
from .images import check_images
from .models import TrainConfig

Query = Callable[[np.ndarray], np.ndarray]


@dataclass
class Acquired:
    """What a method queried and what the target answered, in query order."""

    method: str
    images: np.ndarray  # uint8 (budget, H, W[, C])
    labels: np.ndarray  # int64 (budget,)
    indices: np.ndarray  # int64 (budget,): pool index, -1 for a synthetic image
    info: dict = field(default_factory=dict)  # method details (seed size, rounds, ...)

    def __len__(self) -> int:
        return len(self.labels)


class AttackerRecord:
    """The attacker's side of one method's queries (the target keeps its own journal,
    ``ledger.Ledger``): wraps the caller's ``query``, checks each answer and keeps what was asked
    and answered, in order.

    ``pool``: the pool images; ``images``, ``labels``, ``indices``: one array per ``ask``, in
    order; ``count``: queries spent so far.
    """

    def __init__(self, query: Query, pool: np.ndarray):
        self.query, self.pool = query, pool
        self.images: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.indices: list[np.ndarray] = []
        self.count = 0

    def ask(self, images: np.ndarray, indices) -> np.ndarray:
        """Query ``images`` (pool ``indices``, or -1 for synthetic ones); their int64 labels."""
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if len(images) == 0:
            return np.zeros(0, dtype=np.int64)
        labels = labels_of(self.query(images), len(images))  # int labels (n,) or float rows (n, C) only
        self.images.append(images)
        self.labels.append(labels)
        self.indices.append(np.broadcast_to(np.asarray(indices, dtype=np.int64), (len(images),)))
        self.count += len(images)
        return labels

    def ask_pool(self, indices) -> np.ndarray:
        """Query the pool images at ``indices``, in that order; their int64 labels."""
        indices = np.asarray(indices, dtype=np.int64)
        return self.ask(self.pool[indices], indices)

    def result(self, method: str, budget: int, info: dict | None = None) -> Acquired:
        if self.count != budget:  # a bug in the method, never the caller's fault
            raise RuntimeError(f"{method} spent {self.count} queries, not its budget of {budget}")
        return Acquired(method, np.concatenate(self.images), np.concatenate(self.labels),
                        np.concatenate(self.indices).copy(), info or {})


# --------------------------------------------------------------------------- the registry

@dataclass(frozen=True)
class _Method:
    runner: Callable[..., dict]
    needs_mi: bool
    min_budget: int


_REGISTRY: dict[str, _Method] = {}
METHODS: list[str] = []  # every registered method, in registration order (kept by register_method)
MI_METHODS: list[str] = []  # those that take the pool's MI matrix


def register_method(name: str, runner: Callable[..., dict], *, needs_mi: bool = False,
                    min_budget: int = 1) -> None:
    """Make ``runner`` the method called ``name`` for ``acquire`` and ``drmi run --methods``.

    ``runner``: see the module doc. ``needs_mi``: it reads the pool's MI matrix (``acquire``
    refuses a call without one). ``min_budget``: the fewest queries it can spend (2 for an
    objective over pairs; the pool must hold as many images). ``ValueError`` if the name is taken.
    Register when a module of the package is imported (as the built-ins below): Ray's worker
    processes, where the experiment runs each cell, import ``drmi_ray`` afresh and know only those.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"method name: expected a non-empty string, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"method {name!r} is already registered")
    if not callable(runner):
        raise ValueError(f"method {name!r}: the runner must be callable, got {type(runner).__name__}")
    if isinstance(min_budget, bool) or not isinstance(min_budget, int) or min_budget < 1:
        raise ValueError(f"method {name!r}: min_budget must be a positive int, got {min_budget!r}")
    _REGISTRY[name] = _Method(runner, bool(needs_mi), min_budget)
    METHODS.append(name)
    if needs_mi:
        MI_METHODS.append(name)


register_method("drmi", drmi.run_drmi, needs_mi=True, min_budget=2)
register_method("random", drmi.run_random)
register_method("cmal", baselines.run_cmal, min_budget=2)
register_method("cpb", baselines.run_cpb)
register_method("trace", baselines.run_trace)
register_method("kcenter", baselines.run_kcenter)
register_method("jbda", baselines.run_jbda)
register_method("drmi-sqrt", drmi.run_drmi_sqrt, needs_mi=True, min_budget=2)
register_method("drmi-joint", drmi.run_drmi_joint, needs_mi=True, min_budget=2)
register_method("drmi-balanced", drmi.run_drmi_balanced, needs_mi=True, min_budget=2)
register_method("drmi-typical", drmi.run_drmi_typical, needs_mi=True, min_budget=2)
register_method("drmi-cover", drmi.run_drmi_cover, needs_mi=True, min_budget=2)
register_method("drmi-mix", drmi.run_drmi_mix, needs_mi=True, min_budget=2)


# --------------------------------------------------------------------------- entry point

def acquire(method: str, pool_images: np.ndarray, budget: int, query: Query, *, seed: int = 0,
            mi: np.ndarray | None = None, substitute_config: TrainConfig | None = None
            ) -> Acquired:
    """Spend exactly ``budget`` queries with ``method``; see the module docstring for the rules.

    Args:
      method: one of ``METHODS``.
      pool_images: the attacker's unlabeled pool, uint8 ``(n, H, W)`` or ``(n, H, W, C)``.
      budget: queries to spend, ``1 <= budget <= n`` (at least the method's ``min_budget``:
        2 for cmal and the MI methods).
      query: ``images -> labels`` (int64 ``(m,)``; probability rows are argmax-ed).
      seed: drives every random choice and the substitutes' initialisation.
      mi: the ``(n, n)`` pairwise MI matrix (``MI_METHODS`` only).
      substitute_config: how ``cpb``/``trace``/``jbda`` train their substitutes (seed overridden).
    Raises ``ValueError`` (one line) on an unknown method, a bad pool, a budget out of range or a
    missing/misshapen ``mi``.
    """
    spec = _REGISTRY.get(method)
    if spec is None:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    pool = check_images(pool_images, name="pool_images", min_count=spec.min_budget)
    n = len(pool)
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise ValueError(f"budget must be an integer number of queries, got {budget!r}")
    budget = int(budget)
    if budget < 1 or budget > n:
        raise ValueError(f"budget={budget} is out of range: it must be between 1 and the pool size {n}")
    if budget < spec.min_budget:
        raise ValueError(f"{method} needs budget >= {spec.min_budget}, got {budget}")
    if not callable(query):
        raise ValueError(f"query must be a function images -> labels, got {type(query).__name__}")
    if spec.needs_mi:
        if mi is None:
            raise ValueError(f"{method} needs the pool's pairwise MI matrix: pass mi=pairwise_mi(pool_images)")
        if np.shape(mi) != (n, n):
            raise ValueError(f"mi has shape {np.shape(mi)} but the pool has {n} images; expected ({n}, {n})")
    config = dataclasses.replace(substitute_config or TrainConfig(), seed=int(seed))
    record = AttackerRecord(query, pool)
    info = spec.runner(record, budget, seed=int(seed), mi=mi, config=config)
    return record.result(method, budget, info)
