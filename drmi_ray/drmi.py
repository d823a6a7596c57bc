"""Random and DRMI's selection methods: the query rules of ``random`` and the ``drmi`` family.

Each ``run_*`` below is a runner that ``acquisition`` registers under the method's name (see its
docstring for the contract): ``run(record, budget, *, seed, mi, **_) -> info``, spending exactly
``budget`` queries through ``record`` (an ``acquisition.AttackerRecord``, which holds the pool).

``random``   ``budget`` distinct pool images drawn uniformly (``default_rng(seed).choice``), in
             draw order (``random_indices``).
``drmi``     ``optimize.select(mi, budget, seed=seed)`` on the caller's pairwise MI matrix (the
             paper's objective, min Σ_{i<j∈S} MI(i, j)); seeded shuffle (``seeded_shuffle``).
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

``random_indices`` (the rivals' random seed step too) and ``seeded_shuffle`` (the query order of
every method that picks a set, ``drmi reduce``'s too) are shared from here.
"""

from __future__ import annotations

import numpy as np

from .optimize import Selection, select, select_coverage
from .partition import kmeans_partitions, select_partitioned

BALANCED_CLUSTERS = 10  # drmi-balanced: k-means clusters of the pool (no labels needed)
MIX_REDUNDANCY = 0.1  # drmi-mix: weight of the pairwise NMI penalty against coverage


def random_indices(n: int, k: int, seed: int) -> np.ndarray:
    """``k`` distinct indices of ``range(n)``, uniform, in draw order."""
    return np.random.default_rng(seed).choice(n, size=k, replace=False)


def seeded_shuffle(indices: np.ndarray, seed: int) -> np.ndarray:
    """The query order of a method whose algorithm picks a set, not a sequence."""
    return np.random.default_rng(seed).permutation(np.asarray(indices, dtype=np.int64))


def ask_set(record, selection: Selection, seed: int) -> dict:
    """Query the set an optimizer picked, in its seeded shuffle; the method's info."""
    record.ask_pool(seeded_shuffle(selection.indices, seed))
    return {"objective": float(selection.objective)}


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


def typical_indices(pool_images: np.ndarray, sim: np.ndarray, k: int, seed: int) -> np.ndarray:
    """drmi-typical's rule: ``k`` images, one typical image per k-means cluster, in query order.

    ``kmeans_partitions(pool_images, k, seed=seed)``; an image's typicality is its summed ``sim``
    to the other members of its cluster. Images are ranked within their cluster by descending
    typicality; the first ``k`` by (rank, larger cluster first, lower index) are returned, so
    every cluster gives its most typical image before any gives a second (k-means can leave a
    cluster empty)."""
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


# --------------------------------------------------------------------------- runners

def run_random(record, budget, *, seed, **_):
    record.ask_pool(random_indices(len(record.pool), budget, seed))
    return {}


def run_drmi(record, budget, *, seed, mi, **_):
    return ask_set(record, select(mi, budget, seed=seed), seed)


def run_drmi_sqrt(record, budget, *, seed, mi, **_):
    return ask_set(record, select(normalized_mi(mi, "sqrt"), budget, seed=seed), seed)


def run_drmi_joint(record, budget, *, seed, mi, **_):
    return ask_set(record, select(normalized_mi(mi, "joint"), budget, seed=seed), seed)


def run_drmi_balanced(record, budget, *, seed, mi, **_):
    """Plain DRMI within each k-means cluster of the pool, budgets proportional to cluster size."""
    clusters = kmeans_partitions(record.pool, min(BALANCED_CLUSTERS, len(record.pool)), seed=seed)
    return ask_set(record, select_partitioned(clusters, budget, lambda idx: mi[np.ix_(idx, idx)], seed=seed), seed)


def run_drmi_typical(record, budget, *, seed, mi, **_):
    record.ask_pool(typical_indices(record.pool, normalized_mi(mi, "sqrt"), budget, seed))
    return {}


def _coverage(record, budget, seed, mi, redundancy):
    sel = select_coverage(normalized_mi(mi, "sqrt"), budget, redundancy=redundancy, seed=seed)
    record.ask_pool(sel.order)
    return {"objective": float(sel.objective)}


def run_drmi_cover(record, budget, *, seed, mi, **_):
    return _coverage(record, budget, seed, mi, 0.0)


def run_drmi_mix(record, budget, *, seed, mi, **_):
    return _coverage(record, budget, seed, mi, MIX_REDUNDANCY)
