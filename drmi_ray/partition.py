"""Partitions of the pool: ``kmeans_partitions`` (label-free clusters), ``partition_budgets``
(budgets proportional to partition size) and ``select_partitioned`` (``optimize.select`` per
partition, only within-partition MI), so ImageNet-sized pools never need the full matrix."""

from __future__ import annotations

import numpy as np

from drmi_ray.mi import pairwise_mi
from drmi_ray.optimize import Selection, check_mi, objective, select
from drmi_ray.optimize.distributed import _restart_seeds


def partition_budgets(labels, k) -> dict:
    """``{label: budget}``, budgets proportional to partition sizes by largest remainder.

    Sum exactly ``k``; each budget between 0 and its partition's size; remainder ties go to the
    larger partition, then the smaller label. ``labels``: int ``(n,)``; ``0 <= k <= n``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array (one partition label per image), got {labels.dtype} {labels.shape}")
    if not 0 <= k <= len(labels):
        raise ValueError(f"k={k} must lie in 0..{len(labels)} (the number of labelled images)")
    names, sizes = np.unique(labels, return_counts=True)
    quota = k * sizes / sizes.sum()
    budget = np.floor(quota).astype(np.int64)
    frac = quota - budget
    for t in sorted(range(len(names)), key=lambda t: (-frac[t], -sizes[t], names[t]))[: k - int(budget.sum())]:
        budget[t] += 1
    return {int(a): int(b) for a, b in zip(names, budget)}


def select_partitioned(labels, k, partition_mi, *, seed=0, **select_kwargs) -> Selection:
    """Select per partition with budgets from ``partition_budgets``; only within-partition MI is used.

    labels: int ``(n,)`` partition of the pool (class labels, or ``kmeans_partitions``).
    partition_mi: ``callable(indices) -> (m, m)`` MI matrix of those images, or the images
      themselves (``(n, ...)`` uint8; then ``drmi_ray.mi.pairwise_mi(images[indices])``).
    Each partition gets ``select(mi_p, budget, seed=...)`` (budget 1: the image with the least
    total MI to its partition; budget = size: all). ``objective`` is the sum of the
    within-partition objectives (cross-partition pairs are never computed). Peak memory is the
    largest partition's matrix, not the pool's.
    """
    if not callable(partition_mi):
        images = partition_mi

        def partition_mi(indices):
            return pairwise_mi(images[indices])

    labels = np.asarray(labels)
    budgets = partition_budgets(labels, k)
    chosen, total = [], 0.0
    for t, (name, b) in enumerate(sorted(budgets.items())):
        members = np.flatnonzero(labels == name)
        if b == 0:
            continue
        if b == len(members) and b < 2:
            chosen.append(members)
            continue
        mi_p = partition_mi(members)
        if b == 1:
            mi_p = check_mi(mi_p, len(members)) if len(members) >= 2 else mi_p
            sums = mi_p.sum(axis=1) - np.diag(mi_p)
            chosen.append(members[[int(np.argmin(sums))]])
        elif b == len(members):
            chosen.append(members)
            total += objective(mi_p, np.arange(b))
        else:
            sel = select(mi_p, b, seed=_restart_seeds(seed, t + 1)[t], **select_kwargs)
            chosen.append(members[sel.indices])
            total += sel.objective
    idx = np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)
    return Selection(idx, total)


def kmeans_partitions(images, n_clusters: int, *, size: int = 7, seed=0, iterations: int = 50) -> np.ndarray:
    """int64 ``(n,)`` cluster labels: k-means (k-means++ start, Lloyd steps) on images block-averaged
    to about ``size x size`` (per channel). images: ``(n, H, W)``, ``(n, H, W, C)`` or ``(n, D)``."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim >= 3:
        f = max(1, x.shape[1] // size, x.shape[2] // size)
        h, w = x.shape[1] // f * f, x.shape[2] // f * f
        x = x[:, :h, :w].reshape(len(x), h // f, f, w // f, f, *x.shape[3:]).mean(axis=(2, 4))
    x = x.reshape(len(x), -1)
    if not 1 <= n_clusters <= len(x):
        raise ValueError(f"n_clusters={n_clusters} must lie in 1..{len(x)} (the number of images)")
    rng = np.random.default_rng(seed)
    centres = np.empty((n_clusters, x.shape[1]), dtype=x.dtype)
    centres[0] = x[int(rng.integers(len(x)))]
    d2 = np.full(len(x), np.inf, dtype=x.dtype)
    for c in range(1, n_clusters):  # k-means++: far points are likelier centres
        d2 = np.minimum(d2, np.maximum(_sqdist(x, centres[c - 1:c])[:, 0], 0))  # O(N) per centre
        centres[c] = x[rng.choice(len(x), p=d2 / d2.sum()) if d2.sum() > 0 else int(rng.integers(len(x)))]
    labels = None
    for _ in range(iterations):
        new = _sqdist(x, centres).argmin(1)
        if labels is not None and (new == labels).all():
            break
        labels = new
        for c in range(n_clusters):
            if (labels == c).any():
                centres[c] = x[labels == c].mean(0)
    return labels.astype(np.int64)


def _sqdist(x, c):
    return (x**2).sum(1)[:, None] - 2 * x @ c.T + (c**2).sum(1)[None]
