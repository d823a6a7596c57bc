"""Exact oracle for small pools: the optimum of ``Σ_{i<j∈S} MI(i, j)`` over ``|S| = K``
(brute force or scipy ``milp``); the tests measure ``select`` against it."""

from __future__ import annotations

import math

import numpy as np
from numba import njit
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from drmi_ray.optimize.search import Selection, check_mi, objective


def exact_select(mi, k, *, method: str = "auto", time_limit: float | None = None) -> Selection:
    """The optimum, for small pools (the test oracle).

    ``method="brute"``: depth-first enumeration of the C(n, k) subsets with running sums (numba;
    branches whose partial sum already reaches the best are cut when mi >= 0); auto when
    C(n, k) <= 5e7 (n=30, k=8: 5.9e6 subsets, well under a second).
    ``"milp"`` solves the standard linearisation with scipy's HiGHS: binary ``x_i``, continuous
    ``y_ij = x_i x_j`` (``y <= x_i``, ``y <= x_j``, ``y >= x_i + x_j - 1``), ``Σ x = k``, plus the
    products of the cardinality row with each ``x_i`` (``Σ_j y_ij = (k-1) x_i``), which make the LP
    bound tight enough for n≈30-40 in seconds.
    """
    mi = check_mi(mi, k).astype(np.float64)
    n = mi.shape[0]
    if method == "auto":
        method = "brute" if math.comb(n, k) <= 50_000_000 else "milp"
    if method == "brute":
        best = _brute_force(mi, k, bool((mi >= 0).all()))
        return Selection(best, objective(mi, best))
    if method != "milp":
        raise ValueError(f"method must be 'auto', 'brute' or 'milp', got {method!r}")


    pi, pj = np.triu_indices(n, 1)
    m = len(pi)
    nv = n + m
    ys = n + np.arange(m)
    rows, cols, vals, lo, hi = [], [], [], [], []

    def add(r_cols, r_vals, l, h):
        rows.extend([len(lo)] * len(r_cols))
        cols.extend(r_cols)
        vals.extend(r_vals)
        lo.append(l)
        hi.append(h)

    add(range(n), [1.0] * n, k, k)
    for p in range(m):
        i, j, y = pi[p], pj[p], ys[p]
        add([y, i], [1.0, -1.0], -np.inf, 0.0)  # y <= x_i
        add([y, j], [1.0, -1.0], -np.inf, 0.0)  # y <= x_j
        add([i, j, y], [1.0, 1.0, -1.0], -np.inf, 1.0)  # y >= x_i + x_j - 1
    for i in range(n):
        ps = np.flatnonzero((pi == i) | (pj == i))
        add(list(ys[ps]) + [i], [1.0] * len(ps) + [-(k - 1.0)], 0.0, 0.0)
    a = coo_matrix((vals, (rows, cols)), shape=(len(lo), nv)).tocsr()
    c = np.concatenate([np.zeros(n), mi[pi, pj]])
    integrality = np.concatenate([np.ones(n), np.zeros(m)])
    options = {"time_limit": time_limit} if time_limit else {}
    res = milp(c, constraints=LinearConstraint(a, lo, hi), integrality=integrality, bounds=Bounds(0, 1), options=options)
    if res.x is None or res.status != 0:
        raise RuntimeError(f"milp did not prove an optimum (status {res.status}: {res.message}); raise time_limit or use method='brute'")
    idx = np.sort(np.flatnonzero(res.x[:n] > 0.5)).astype(np.int64)
    return Selection(idx, objective(mi, idx))


@njit(cache=True)
def _brute_force(mi, k, prune):
    """Exact minimum by depth-first enumeration: chosen[t] is the t-th member, ascending."""
    n = mi.shape[0]
    chosen = np.zeros(k, np.int64)
    partial = np.zeros(k + 1)  # partial[t] = objective of chosen[:t]
    best_f, best = np.inf, np.zeros(k, np.int64)
    t, nxt = 0, 0  # filling slot t, next candidate index
    while True:
        if t == k:
            if partial[k] < best_f:
                best_f = partial[k]
                best[:] = chosen
            t -= 1
            nxt = chosen[t] + 1
            continue
        if nxt > n - (k - t) or (prune and partial[t] >= best_f):
            if t == 0:
                return best
            t -= 1
            nxt = chosen[t] + 1
            continue
        add = 0.0
        for s in range(t):
            add += mi[chosen[s], nxt]
        chosen[t] = nxt
        partial[t + 1] = partial[t] + add
        t += 1
        nxt = nxt + 1
