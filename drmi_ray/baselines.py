"""Ways of spending a query budget: DRMI and its rivals.

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
(``seeded_shuffle(indices, seed)``). Never in pool-index order: a pool stored by class would
otherwise reach the target class by class, which is what a stealth detector such as PRADA sees.

Methods (``METHODS``), with the exact rules:

``random``   ``budget`` distinct pool images drawn uniformly (``default_rng(seed).choice``), in
             draw order.
``drmi``     ``optimize.select(mi, budget, seed=seed)`` on the caller's pairwise MI matrix (the
             paper's objective, min Σ_{i<j∈S} MI(i, j)); seeded shuffle.
``cmal``     the same optimizer on ``|corrcoef|`` of the flattened images (``correlation_matrix``;
             a constant image's undefined correlations are set to 1, i.e. fully redundant);
             seeded shuffle.
``kcenter``  greedy k-center in pixel space (float, L2): the first centre is
             ``default_rng(seed).integers(n)``; then repeatedly the pool image farthest from its
             nearest chosen centre (ties: lowest index); in pick order.
``cpb``      class-probability baseline. Seed step: ``s = min(budget, max(10, ceil(0.2 budget)))``
             pool images at random (as ``random``), queried; a first substitute is trained on them
             (``models.train_classifier``, ``substitute_config`` with ``seed=seed``). Then, over the
             rest of the pool, margin ``m = p_top1 - p_top2`` of the substitute's softmax and its
             predicted class ``c``. Within each predicted class the candidates are ranked by
             ascending margin (ties: lower index); round ``r`` takes the ``r``-th ranked candidate of
             every class that still has one, ordered by ascending margin; rounds are concatenated
             and the first ``budget - s`` are queried (so the last round is cut at its most
             uncertain members).
``trace``    activated-neuron traces. The same seed step and first substitute; an image's trace is
             the binary pattern ``relu_output > 0`` of every ``nn.ReLU`` module of the substitute
             (all hidden layers, eval mode, concatenated). Then greedy farthest-point in Hamming
             distance: repeatedly the pool image (not yet chosen) whose trace is farthest from its
             nearest trace among the seed set and the picks so far (ties: lowest index), until
             ``budget - s`` are picked; in pick order.
``jbda``     Jacobian-based dataset augmentation (Papernot et al., AsiaCCS 2017; the attack PRADA
             detects). Seed: ``min(budget, 10)`` random pool images, queried. Round ``ρ = 0, 1, ...``:
             train a substitute on everything labelled so far (``substitute_config``, ``seed=seed``),
             then for each labelled image ``x`` with target label ``y`` a new image
             ``clip(x + step_ρ · sign(∂ logit_y(x) / ∂x), 0, 255)`` in uint8 grey levels, where
             ``step_ρ = (-1)^⌊ρ/τ⌋ · round(λ · 255)`` (λ = 0.1, τ = 3: 26 grey levels, i.e.
             λ = 0.1 quantised to the uint8 grid, sign flipping every 3 rounds). The set doubles each
             round; the round that would pass the budget augments only a seeded random subset of
             the labelled images (as many as are left). Synthetic images get index ``-1``.
``drmi-sqrt``, ``drmi-joint``  DRMI on normalised MI (``normalized_mi``): ``MI / sqrt(H(u) H(v))``
             or ``MI / H(u, v)``; plain MI favours low-entropy images since ``MI <= min(H(u), H(v))``;
             seeded shuffle.
``drmi-balanced``  plain DRMI inside each of 10 k-means clusters of the pool
             (``partition.kmeans_partitions``, images block-averaged to 7x7, no labels), budgets
             proportional to cluster size (``partition.select_partitioned``); seeded shuffle.

The label-free objectives below use ``NMI = normalized_mi(mi, "sqrt")`` (in [0, 1], 1 on the
diagonal) as the similarity of two images.

``drmi-typical``  one typical image per region of the pool: ``kmeans_partitions(pool, budget,
             seed=seed)``; within each cluster rank the members by their summed NMI to the other
             members (most typical first); query the first ``budget`` by (rank, larger cluster
             first, lower index), i.e. every cluster's most typical image, largest clusters first
             (``typical_indices``).
``drmi-cover``  coverage (facility location): greedy ``max Σ_{x in pool} max_{s∈S} NMI(x, s)``
             (``optimize.select_coverage``), every pool image close to a chosen one, the first pick
             ``default_rng(seed).integers(n)`` (so seeds differ); in pick order.
``drmi-mix``  coverage minus redundancy: greedy ``max Σ_x max_{s∈S} NMI(x, s) − 0.1 ·
             Σ_{i<j∈S} NMI(i, j)`` (``MIX_REDUNDANCY``, set on seeds 100-103, never on the
             reported seeds); in pick order.

A method that trains a substitute (``cpb``, ``trace``, ``jbda``) takes ``substitute_config``
(a ``models.TrainConfig``; default ``TrainConfig()``, C3F2) and overrides only its ``seed``.
Results are deterministic per ``seed`` (same torch thread count).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from .client import labels_of
from .images import check_images
from .models import TrainConfig, predict_proba, to_tensor, train_classifier

METHODS = ("drmi", "random", "cmal", "cpb", "trace", "kcenter", "jbda",
           "drmi-sqrt", "drmi-joint", "drmi-balanced", "drmi-typical", "drmi-cover", "drmi-mix")
MI_METHODS = ("drmi", "drmi-sqrt", "drmi-joint", "drmi-balanced",  # need the pool's MI matrix
              "drmi-typical", "drmi-cover", "drmi-mix")
BALANCED_CLUSTERS = 10  # drmi-balanced: k-means clusters of the pool (no labels needed)
MIX_REDUNDANCY = 0.1  # drmi-mix: weight of the pairwise NMI penalty against coverage

SEED_SHARE = 0.2  # cpb / trace: share of the budget spent at random first ...
SEED_MIN = 10  # ... but at least this many images (never more than the budget)
JBDA_SEED = 10  # jbda: real seed images
JBDA_LAMBDA = 0.1  # jbda: step size in [0, 1] pixel units
JBDA_TAU = 3  # jbda: the step's sign flips every tau rounds

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


class _Ledger:
    """Wraps the caller's ``query``: checks each answer, keeps images/labels/indices in order."""

    def __init__(self, query: Query, pool: np.ndarray):
        self.query, self.pool = query, pool
        self.images: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.indices: list[np.ndarray] = []
        self.count = 0

    def ask(self, images: np.ndarray, indices) -> np.ndarray:
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
        indices = np.asarray(indices, dtype=np.int64)
        return self.ask(self.pool[indices], indices)

    def result(self, method: str, budget: int, info: dict | None = None) -> Acquired:
        if self.count != budget:  # a bug here, never the caller's fault
            raise RuntimeError(f"{method} spent {self.count} queries, not its budget of {budget}")
        return Acquired(method, np.concatenate(self.images), np.concatenate(self.labels),
                        np.concatenate(self.indices).copy(), info or {})


# --------------------------------------------------------------------------- entry point

def acquire(method: str, pool_images: np.ndarray, budget: int, query: Query, *, seed: int = 0,
            mi: np.ndarray | None = None, substitute_config: TrainConfig | None = None
            ) -> Acquired:
    """Spend exactly ``budget`` queries with ``method``; see the module docstring for the rules.

    Args:
      method: one of ``METHODS``.
      pool_images: the attacker's unlabeled pool, uint8 ``(n, H, W)`` or ``(n, H, W, C)``.
      budget: queries to spend, ``1 <= budget <= n`` (``drmi``/``cmal``: ``>= 2``).
      query: ``images -> labels`` (int64 ``(m,)``; probability rows are argmax-ed).
      seed: drives every random choice and the substitutes' initialisation.
      mi: the ``(n, n)`` pairwise MI matrix (``drmi`` only).
      substitute_config: how ``cpb``/``trace``/``jbda`` train their substitutes (seed overridden).
    Raises ``ValueError`` (one line) on an unknown method, a bad pool, a budget out of range or a
    missing/misshapen ``mi``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    pool = check_images(pool_images, name="pool_images",
                        min_count=2 if method in ("cmal", *MI_METHODS) else 1)
    n = len(pool)
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise ValueError(f"budget must be an integer number of queries, got {budget!r}")
    budget = int(budget)
    if budget < 1 or budget > n:
        raise ValueError(f"budget={budget} is out of range: it must be between 1 and the pool size {n}")
    if method in ("cmal", *MI_METHODS) and budget < 2:
        raise ValueError(f"{method} needs budget >= 2 (its objective sums pairs), got {budget}")
    if not callable(query):
        raise ValueError(f"query must be a function images -> labels, got {type(query).__name__}")
    if method in MI_METHODS:
        if mi is None:
            raise ValueError(f"{method} needs the pool's pairwise MI matrix: pass mi=pairwise_mi(pool_images)")
        if np.shape(mi) != (n, n):
            raise ValueError(f"mi has shape {np.shape(mi)} but the pool has {n} images; expected ({n}, {n})")
    config = dataclasses.replace(substitute_config or TrainConfig(), seed=int(seed))
    ledger = _Ledger(query, pool)
    info = _RUNNERS[method](ledger, budget, seed=int(seed), mi=mi, config=config)
    return ledger.result(method, budget, info)


def seed_size(budget: int) -> int:
    """cpb/trace: how many of ``budget`` queries go to the random seed step."""
    return min(budget, max(SEED_MIN, math.ceil(SEED_SHARE * budget)))


# --------------------------------------------------------------------------- pool-only methods

def random_indices(n: int, k: int, seed: int) -> np.ndarray:
    """``k`` distinct indices of ``range(n)``, uniform, in draw order."""
    return np.random.default_rng(seed).choice(n, size=k, replace=False)


def seeded_shuffle(indices: np.ndarray, seed: int) -> np.ndarray:
    """The query order of a method whose algorithm picks a set, not a sequence."""
    return np.random.default_rng(seed).permutation(np.asarray(indices, dtype=np.int64))


def correlation_matrix(pool_images: np.ndarray) -> np.ndarray:
    """``|Pearson correlation|`` between flattened images, float64 ``(n, n)``; NaN (constant image) -> 1."""
    x = pool_images.reshape(len(pool_images), -1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.abs(np.corrcoef(x))
    c = np.atleast_2d(c)
    c[np.isnan(c)] = 1.0
    return c


def kcenter_indices(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Greedy k-center (farthest-point) on rows of ``x`` (float, L2), in pick order.

    The first centre is ``default_rng(seed).integers(n)``; each next one
    is the row farthest from its nearest chosen centre (ties: lowest index).
    """
    x = x.reshape(len(x), -1).astype(np.float64)
    n = len(x)
    sq = np.einsum("ij,ij->i", x, x)
    start = int(np.random.default_rng(seed).integers(n))
    dist = np.full(n, np.inf)
    chosen = [start]
    for _ in range(k - 1):
        c = chosen[-1]
        d = np.maximum(sq + sq[c] - 2.0 * (x @ x[c]), 0.0)
        np.minimum(dist, d, out=dist)
        dist[chosen[-1]] = -1.0
        chosen.append(int(np.argmax(dist)))
    return np.asarray(chosen, dtype=np.int64)


def _random(ledger, budget, *, seed, **_):
    ledger.ask_pool(random_indices(len(ledger.pool), budget, seed))
    return {}


def _drmi(ledger, budget, *, seed, mi, **_):
    from .optimize import select

    sel = select(mi, budget, seed=seed)
    ledger.ask_pool(seeded_shuffle(sel.indices, seed))
    return {"objective": float(sel.objective)}


def normalized_mi(mi: np.ndarray, kind: str) -> np.ndarray:
    """MI divided by ``sqrt(H(u) H(v))`` (``kind="sqrt"``) or by the joint entropy ``H(u, v) =
    H(u) + H(v) - MI(u, v)`` (``kind="joint"``); entropies are ``mi``'s diagonal. Both lie in
    [0, 1], so low-entropy images lose the head start that ``MI <= min(H(u), H(v))`` gives them.
    Pairs with a zero denominator (constant images) score 0."""
    h = np.diag(mi)
    denom = np.sqrt(np.outer(h, h)) if kind == "sqrt" else h[:, None] + h[None, :] - mi
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(denom > 0, mi / denom, 0.0)
    return (out + out.T) / 2  # exact symmetry for the optimizer's check


def _drmi_normalized(kind):
    def run(ledger, budget, *, seed, mi, **_):
        from .optimize import select

        sel = select(normalized_mi(mi, kind), budget, seed=seed)
        ledger.ask_pool(seeded_shuffle(sel.indices, seed))
        return {"objective": float(sel.objective)}

    return run


def _drmi_balanced(ledger, budget, *, seed, mi, **_):
    """Plain DRMI within each k-means cluster of the pool, budgets proportional to cluster size."""
    from .partition import kmeans_partitions, select_partitioned

    clusters = kmeans_partitions(ledger.pool, min(BALANCED_CLUSTERS, len(ledger.pool)), seed=seed)
    sel = select_partitioned(clusters, budget, lambda idx: mi[np.ix_(idx, idx)], seed=seed)
    ledger.ask_pool(seeded_shuffle(sel.indices, seed))
    return {"objective": float(sel.objective)}


def typical_indices(pool_images: np.ndarray, sim: np.ndarray, k: int, seed: int) -> np.ndarray:
    """drmi-typical's rule: ``k`` images, one typical image per k-means cluster, in query order.

    ``kmeans_partitions(pool_images, k, seed=seed)``; an image's typicality is its summed ``sim``
    to the other members of its cluster. Images are ranked within their cluster by descending
    typicality; the first ``k`` by (rank, larger cluster first, lower index) are returned, so
    every cluster gives its most typical image before any gives a second (k-means can leave a
    cluster empty)."""
    from .partition import kmeans_partitions

    clusters = kmeans_partitions(pool_images, k, seed=seed)
    n = len(clusters)
    typicality, rank, size = np.zeros(n), np.zeros(n, np.int64), np.zeros(n, np.int64)
    for c in np.unique(clusters):
        members = np.flatnonzero(clusters == c)
        within = sim[np.ix_(members, members)]
        typicality[members] = within.sum(axis=1) - np.diag(within)
        ranked = members[np.lexsort((members, -typicality[members]))]
        rank[ranked] = np.arange(len(members))
        size[members] = len(members)
    return np.lexsort((np.arange(n), -size, rank))[:k]


def _drmi_typical(ledger, budget, *, seed, mi, **_):
    ledger.ask_pool(typical_indices(ledger.pool, normalized_mi(mi, "sqrt"), budget, seed))
    return {}


def _drmi_cover(redundancy):
    def run(ledger, budget, *, seed, mi, **_):
        from .optimize import select_coverage

        sel = select_coverage(normalized_mi(mi, "sqrt"), budget, redundancy=redundancy, seed=seed)
        ledger.ask_pool(sel.order)
        return {"objective": float(sel.objective)}

    return run


def _cmal(ledger, budget, *, seed, **_):
    from .optimize import select

    sel = select(correlation_matrix(ledger.pool), budget, seed=seed)
    ledger.ask_pool(seeded_shuffle(sel.indices, seed))
    return {"objective": float(sel.objective)}


def _kcenter(ledger, budget, *, seed, **_):
    ledger.ask_pool(kcenter_indices(ledger.pool, budget, seed))
    return {}


# --------------------------------------------------------------------------- cpb and trace

def _seed_step(ledger, budget, seed, config):
    """Random seed queries and the first substitute; returns (seed indices, substitute)."""
    s = seed_size(budget)
    idx = random_indices(len(ledger.pool), s, seed)
    labels = ledger.ask_pool(idx)
    substitute = train_classifier(ledger.pool[idx], labels, config) if s < budget else None
    return idx, substitute


def margin_order(probs: np.ndarray, k: int) -> np.ndarray:
    """cpb's rule on candidate rows of softmax ``probs``: the ``k`` rows to query, in order.

    Rank within each predicted class by ascending margin ``p_top1 - p_top2`` (ties: lower row);
    round r = the r-th of every class, ordered by margin; rounds concatenated; first ``k``.
    """
    top2 = np.sort(probs, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    predicted = probs.argmax(axis=1)
    order = np.lexsort((np.arange(len(probs)), margin))  # ascending margin, then row
    rank = np.empty(len(probs), dtype=np.int64)  # position within its predicted class
    for c in np.unique(predicted):
        members = order[predicted[order] == c]
        rank[members] = np.arange(len(members))
    final = np.lexsort((np.arange(len(probs)), margin, rank))
    return final[:k]


def _cpb(ledger, budget, *, seed, config, **_):
    seed_idx, substitute = _seed_step(ledger, budget, seed, config)
    rest = budget - len(seed_idx)
    if rest:
        candidates = np.setdiff1d(np.arange(len(ledger.pool)), seed_idx)
        probs = predict_proba(substitute, ledger.pool[candidates])
        ledger.ask_pool(candidates[margin_order(probs, rest)])
    return {"seed_queries": int(len(seed_idx))}


def activation_traces(model: nn.Module, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """Bit-packed ``relu_output > 0`` of every ``nn.ReLU`` module, uint8 ``(n, ceil(bits / 8))``."""
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    if not relus:
        raise ValueError(f"{type(model).__name__} has no nn.ReLU modules to trace")
    captured: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: captured.append(out.detach())) for m in relus]
    model.eval()
    rows = []
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                captured.clear()
                model(to_tensor(images[start:start + batch_size]))
                bits = torch.cat([t.reshape(len(t), -1) > 0 for t in captured], dim=1)
                rows.append(np.packbits(bits.numpy(), axis=1))
    finally:
        for h in hooks:
            h.remove()
    return np.concatenate(rows)


def farthest_traces(traces: np.ndarray, start: np.ndarray, k: int) -> np.ndarray:
    """trace's rule: ``k`` rows not in ``start``, greedy farthest-point in Hamming distance."""
    n = len(traces)
    dist = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    taken = np.zeros(n, dtype=bool)
    for i in start:
        np.minimum(dist, np.bitwise_count(traces ^ traces[i]).sum(axis=1, dtype=np.int64), out=dist)
        taken[i] = True
    picks = []
    for _ in range(k):
        dist[taken] = -1
        j = int(np.argmax(dist))
        picks.append(j)
        taken[j] = True
        np.minimum(dist, np.bitwise_count(traces ^ traces[j]).sum(axis=1, dtype=np.int64), out=dist)
    return np.asarray(picks, dtype=np.int64)


def _trace(ledger, budget, *, seed, config, **_):
    seed_idx, substitute = _seed_step(ledger, budget, seed, config)
    rest = budget - len(seed_idx)
    if rest:
        traces = activation_traces(substitute, ledger.pool)
        ledger.ask_pool(farthest_traces(traces, seed_idx, rest))
    return {"seed_queries": int(len(seed_idx))}


# --------------------------------------------------------------------------- jbda

def jbda_step(round_index: int, *, lam: float = JBDA_LAMBDA, tau: int = JBDA_TAU) -> int:
    """Signed step in uint8 grey levels for round ``round_index``: ``(-1)^⌊ρ/τ⌋ round(λ 255)``."""
    return (-1) ** (round_index // tau) * int(round(lam * 255))


def jacobian_signs(model: nn.Module, images: np.ndarray, labels: np.ndarray, *,
                   batch_size: int = 256) -> np.ndarray:
    """``sign(∂ logit_y(x) / ∂x)`` as int8 with the images' layout ``(n, H, W[, C])``."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_tensor(images[start:start + batch_size]).requires_grad_(True)
        y = torch.as_tensor(labels[start:start + batch_size], dtype=torch.int64)
        model(x).gather(1, y[:, None]).sum().backward()
        g = torch.sign(x.grad).to(torch.int8)
        g = g[:, 0] if images.ndim == 3 else g.permute(0, 2, 3, 1)
        out.append(g.numpy())
    return np.concatenate(out)


def jbda_augment(model, images, labels, step: int) -> np.ndarray:
    """One JBDA round's new images: ``clip(x + step * sign(∇ logit_y), 0, 255)`` as uint8."""
    signs = jacobian_signs(model, images, labels).astype(np.int16)
    return np.clip(images.astype(np.int16) + step * signs, 0, 255).astype(np.uint8)


def _jbda(ledger, budget, *, seed, config, **_):
    rng = np.random.default_rng(seed)
    s = min(budget, JBDA_SEED)
    ledger.ask_pool(random_indices(len(ledger.pool), s, seed))
    rounds = 0
    while ledger.count < budget:
        images, labels = np.concatenate(ledger.images), np.concatenate(ledger.labels)
        substitute = train_classifier(images, labels, config)
        left = budget - ledger.count
        parents = np.arange(len(images))
        if left < len(parents):
            parents = np.sort(rng.choice(len(parents), size=left, replace=False))
        new = jbda_augment(substitute, images[parents], labels[parents], jbda_step(rounds))
        ledger.ask(new, -1)
        rounds += 1
    return {"seed_queries": s, "rounds": rounds}


_RUNNERS = {"random": _random, "drmi": _drmi, "cmal": _cmal, "kcenter": _kcenter,
            "cpb": _cpb, "trace": _trace, "jbda": _jbda, "drmi-sqrt": _drmi_normalized("sqrt"),
            "drmi-joint": _drmi_normalized("joint"), "drmi-balanced": _drmi_balanced,
            "drmi-typical": _drmi_typical, "drmi-cover": _drmi_cover(0.0),
            "drmi-mix": _drmi_cover(MIX_REDUNDANCY)}
assert set(_RUNNERS) == set(METHODS)
