"""Dense subset search: choose K of N pool images with the least summed pairwise MI (DRMI step 3).

Minimise ``f(S) = Σ_{i<j ∈ S} MI(i, j)`` over subsets ``|S| = K`` (a quadratic selection problem,
NP-hard in general). The search keeps ``g(x) = Σ_{s∈S, s≠x} MI(x, s)`` for every image ``x``;
swapping ``i ∈ S`` for ``j ∉ S`` changes ``f`` by ``g(j) − MI(i, j) − g(i)`` and updates ``g`` in
O(N) (``g += MI[j] − MI[i]``). ``f(S) = ½ Σ_{s∈S} g(s)``.

  1. greedy start: a seeded first image, then repeatedly the image with the smallest ``g``;
  2. swap search: apply the best improving swap until none improves (a local minimum);
  3. iterated local search: kick the selection (swap a few random members for random low-``g``
     outsiders), search again, keep the result if it beats the current local minimum; after
     ``patience`` fruitless kicks, restart from a fresh greedy start kicked harder. Under
     ``iterations`` and/or ``time_limit``; with an iteration budget alone the result is a function
     of ``seed``.

Entry points
  ``select(mi, k)``                 one process, dense matrix (numba kernels below)
  ``select_coverage(sim, k)``       a coverage objective instead (greedy facility location)

``Selection``, ``check_mi`` and ``objective`` are shared by the whole package; the iterated local
search here also drives ``distributed._ShardedState`` (Ray shard actors).

Example::

    mi = pairwise_mi(images)                     # (N, N) float64, entropy on the diagonal
    sel = select(mi, 600, seed=0)                # sel.indices (600,) int64, sel.objective float
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from numba import njit

TOL = 1e-9  # a swap must lower f by more than this; g carries ~1e-12 rounding after many swaps


@dataclass
class Selection:
    """``indices``: sorted int64 ``(k,)``; ``objective``: ``Σ_{i<j∈S} mi[i, j]`` (for
    ``select_coverage``: its coverage objective ``F(S)``).

    ``history`` lists ``(seconds, best objective)`` each time the search improved (for benchmarks);
    ``iterations`` counts the perturbation rounds run; ``order`` is the pick order of a greedy
    method (``select_coverage``), None for the swap search (it picks a set, not a sequence).
    """

    indices: np.ndarray
    objective: float
    history: list = field(default_factory=list, repr=False)
    iterations: int = 0
    order: np.ndarray | None = field(default=None, repr=False)  # pick order, where the method has one


# ----------------------------------------------------------------------------- validation


def check_mi(mi, k, *, name: str = "mi") -> np.ndarray:
    """Validate ``(mi, k)`` at the door; return ``mi`` as a C-contiguous float32/float64 array.

    ``ValueError`` (one line: what is wrong, what to do) for: non-float dtype, non-square,
    NaN/inf, asymmetric, ``k`` not an integer, ``k < 2`` or ``k > n``. float16 becomes float32.
    """
    mi = np.asarray(mi)
    if mi.ndim != 2 or mi.shape[0] != mi.shape[1]:
        raise ValueError(f"{name} must be a square (n, n) matrix, got shape {mi.shape}; pass the full pairwise MI matrix, e.g. pairwise_mi(images)")
    if not np.issubdtype(mi.dtype, np.floating):
        raise ValueError(f"{name} must be a float matrix (float16/32/64), got dtype {mi.dtype}; convert with {name}.astype(np.float64)")
    n = mi.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer number of images, got {k!r}")
    if k < 2:
        raise ValueError(f"k={k} is too small: the objective sums pairs, so k must be at least 2")
    if k > n:
        raise ValueError(f"k={k} exceeds the pool size n={n}; choose k <= {n} or pass a larger pool")
    if mi.dtype == np.float16:
        mi = mi.astype(np.float32)
    mi = np.ascontiguousarray(mi)
    code, r, c = _check_matrix(mi, 1e-5)
    if code == 1:
        raise ValueError(f"{name} has non-finite (NaN/inf) entries, first at ({r}, {c}); recompute the MI matrix or replace them")
    if code == 2:
        raise ValueError(f"{name} is not symmetric: {name}[{r}, {c}]={mi[r, c]:.6g} but {name}[{c}, {r}]={mi[c, r]:.6g}; pass ({name} + {name}.T) / 2 if that is rounding, else check how it was built")
    return mi


def objective(mi, indices) -> float:
    """``Σ_{i<j} mi[i, j]`` over ``indices`` (diagonal ignored)."""
    idx = np.asarray(indices, dtype=np.int64)
    sub = np.asarray(mi[np.ix_(idx, idx)], dtype=np.float64)
    return float((sub.sum() - np.trace(sub)) / 2)


# ----------------------------------------------------------------------------- numba kernels
# mi is read by rows only (symmetric), so a row of the matrix is also its column.


@njit(cache=True, nogil=True)
def _check_matrix(mi, rtol):
    """(0, -1, -1) if finite and symmetric to rtol; else (1 = non-finite | 2 = asymmetric, i, j).
    64x64 tiles so the transposed reads stay in cache."""
    n = mi.shape[0]
    for a in range(0, n, 64):
        for b in range(a, n, 64):
            for i in range(a, min(a + 64, n)):
                for j in range(max(b, i), min(b + 64, n)):
                    x, y = mi[i, j], mi[j, i]
                    if not (np.isfinite(x) and np.isfinite(y)):
                        return (1, i, j) if not np.isfinite(x) else (1, j, i)
                    if abs(x - y) > rtol * max(abs(x), abs(y), 1.0):
                        return 2, i, j
    return 0, -1, -1


@njit(cache=True, nogil=True)
def _row_max(mi):
    """Largest off-diagonal entry of each row: bounds the best swap out of a member (pruning)."""
    n = mi.shape[0]
    out = np.full(n, -np.inf)
    for i in range(n):
        for j in range(n):
            if j != i and mi[i, j] > out[i]:
                out[i] = mi[i, j]
    return out


@njit(cache=True, nogil=True)
def _gains(mi, members):
    """g[x] = Σ_{s∈S, s≠x} mi[x, s] recomputed from scratch: O(K N)."""
    n = mi.shape[0]
    g = np.zeros(n)
    for s in members:
        row = mi[s]
        for x in range(n):
            g[x] += row[x]
    for s in members:
        g[s] -= mi[s, s]
    return g


@njit(cache=True, nogil=True)
def _greedy(mi, k, first):
    """Greedy start: ``first``, then the outsider with the smallest g (lowest index on ties)."""
    n = mi.shape[0]
    g = np.zeros(n)
    inside = np.zeros(n, np.bool_)
    members = np.empty(k, np.int64)
    add = first
    for t in range(k):
        if t > 0:
            best = np.inf
            for x in range(n):
                if not inside[x] and g[x] < best:
                    best = g[x]
                    add = x
        members[t] = add
        inside[add] = True
        row = mi[add]
        for x in range(n):
            if x != add:
                g[x] += row[x]
    return members, inside, g


@njit(cache=True, nogil=True)
def _swap(mi, g, inside, members, p, j):
    """Swap members[p] out and j in; g updated in O(N)."""
    i = members[p]
    ri = mi[i]
    rj = mi[j]
    for x in range(g.shape[0]):
        g[x] += np.float64(rj[x]) - np.float64(ri[x])  # float32 rows: subtract in float64
    g[i] += ri[i]  # g excludes the diagonal: undo the self terms
    g[j] -= rj[j]
    inside[i] = False
    inside[j] = True
    members[p] = j


@njit(cache=True, nogil=True)
def _best_swap(mi, g, inside, members, rowmax):
    """Best swap over all (i ∈ S, j ∉ S): (delta, position of i in members, j); O(K N).

    Member i is skipped when even its bound min_j g(j) − max_j mi[i, j] − g(i) cannot beat the
    best so far; near a local minimum that prunes most rows."""
    n = g.shape[0]
    gout = np.empty(n)
    gmin = np.inf
    for x in range(n):
        gout[x] = np.inf if inside[x] else g[x]
        gmin = min(gmin, gout[x])
    best, bp, bj = 0.0, -1, -1
    for p in range(members.shape[0]):
        gi = g[members[p]]
        if gmin - rowmax[members[p]] - gi >= best:
            continue
        row = mi[members[p]]
        for j in range(n):
            d = gout[j] - row[j] - gi
            if d < best:
                best, bp, bj = d, p, j
    return best, bp, bj


@njit(cache=True, nogil=True)
def _local_search(mi, g, inside, members, rowmax, tol):
    """Best-improvement swaps until none lowers f by more than tol; returns the swap count."""
    swaps = 0
    while True:
        d, p, j = _best_swap(mi, g, inside, members, rowmax)
        if d > -tol:
            return swaps
        _swap(mi, g, inside, members, p, j)
        swaps += 1


# ----------------------------------------------------------------------------- search states
# The iterated local search below runs unchanged on a dense matrix (numba) or on Ray shard actors
# (``distributed._ShardedState``).


class _DenseState:
    def __init__(self, mi, members, inside, g, rowmax=None):
        self.mi, self.members, self.inside, self.g = mi, members, inside, g
        self.rowmax = _row_max(mi) if rowmax is None else rowmax

    @classmethod
    def greedy(cls, mi, k, first):
        return cls(mi, *_greedy(mi, k, first))

    def reset(self, first):
        self.members, self.inside, self.g = _greedy(self.mi, len(self.members), first)

    def swap_many(self, ps, js):
        for p, j in zip(ps, js):
            _swap(self.mi, self.g, self.inside, self.members, int(p), int(j))

    def local_search(self):
        _local_search(self.mi, self.g, self.inside, self.members, self.rowmax, TOL)

    def objective(self):
        return float(self.g[self.members].sum() / 2)

    def snapshot(self):
        return self.members.copy(), self.inside.copy(), self.g.copy()

    def restore(self, snap):
        self.members, self.inside, self.g = (a.copy() for a in snap)


def _kick(state, rng, strength, r=None):
    """Perturbation: swap r ∈ [1, strength] random members for random outsiders among the 10%
    with the smallest g (random outsiders would mostly be swapped straight back)."""
    k, n = len(state.members), len(state.g)
    r = int(rng.integers(1, strength + 1)) if r is None else r
    outside = np.flatnonzero(~state.inside)
    pool = max(4 * r, (n - k) // 10)
    if pool < len(outside):
        outside = outside[np.argpartition(state.g[outside], pool)[:pool]]
        outside.sort()  # argpartition order is an implementation detail; keep runs reproducible
    ps = rng.choice(k, size=r, replace=False)
    js = rng.choice(outside, size=min(r, len(outside)), replace=False)
    state.swap_many(ps, js)


def _iterated_local_search(state, rng, *, iterations, time_limit, strength, patience, start, history):
    """Local search, then kick / search / keep-if-better than the current local minimum until a
    budget runs out; after ``patience`` kicks in a row without improvement, restart from a fresh
    greedy start (a new current minimum). The best state seen wins."""
    state.local_search()
    best_f = cur_f = state.objective()
    best = cur = state.snapshot()
    history.append((time.perf_counter() - start, best_f))
    it = stale = 0
    while it < iterations and (time_limit is None or time.perf_counter() - start < time_limit):
        it += 1
        restart = stale >= patience
        if restart:  # a fresh greedy start, kicked at full strength: greedy alone has only n starts
            state.reset(int(rng.integers(len(state.g))))
            _kick(state, rng, strength, r=min(len(state.members) // 2, 4 * strength))
        else:
            _kick(state, rng, strength)
        state.local_search()
        f = state.objective()
        if restart or f < cur_f - TOL:
            cur_f, cur, stale = f, state.snapshot(), 0
            if f < best_f - TOL:
                best_f, best = f, cur
                history.append((time.perf_counter() - start, best_f))
        else:
            stale += 1
            state.restore(cur)
    state.restore(best)
    return it


def _default_strength(k):
    return max(2, k // 20)


def select(mi, k, *, seed=0, iterations: int = 200, time_limit: float | None = None, strength: int | None = None, patience: int = 10) -> Selection:
    """Choose ``k`` of ``n`` images minimising the summed pairwise MI.

    Args:
      mi: ``(n, n)`` symmetric float matrix (float16/32/64; diagonal ignored), e.g. ``pairwise_mi``.
      k: subset size, ``2 <= k <= n``.
      seed: picks the greedy start image and drives the perturbations (int or SeedSequence).
      iterations: perturbation rounds after the first local minimum (default 200; 0 = greedy +
        swap search only).
      time_limit: seconds; stop early when exceeded (then the result depends on machine speed).
      strength: at most this many swaps per perturbation (default ``max(2, k // 20)``).
      patience: kicks in a row without improvement before a fresh greedy restart (default 10).
    Returns ``Selection(indices, objective)``; deterministic for a given seed and iteration budget.
    Cost: O(K N) per swap scan, O(N) per applied swap; memory is the matrix plus O(N).
    """
    start = time.perf_counter()
    mi = check_mi(mi, k)
    rng = np.random.default_rng(seed)
    state = _DenseState.greedy(mi, k, int(rng.integers(mi.shape[0])))
    history = [(time.perf_counter() - start, state.objective())]
    it = _iterated_local_search(state, rng, iterations=iterations, time_limit=time_limit, strength=strength or _default_strength(k), patience=patience, start=start, history=history)
    idx = np.sort(state.members)
    return Selection(idx, objective(mi, idx), history, it)


# ----------------------------------------------------------------------------- coverage


@njit(cache=True, nogil=True)
def _coverage_greedy(sim, k, redundancy, first):
    """Lazy greedy for F(S) = Σ_x max_{s∈S} sim[x, s] − redundancy · Σ_{i<j∈S} sim[i, j],
    starting from pick ``first`` (-1: the greedy first pick too).

    With sim >= 0 both terms only lose marginal gain as S grows (submodular), so a candidate's
    last computed gain bounds its gain now: only candidates whose bound leads are recomputed.
    Returns the picks in order (ties: lowest index)."""
    n = sim.shape[0]
    cover = np.zeros(n)  # max_{s∈S} sim[x, s]
    overlap = np.zeros(n)  # Σ_{s∈S} sim[x, s]
    bound = np.full(n, np.inf)
    computed_at = np.full(n, -1)
    order = np.empty(k, np.int64)
    for t in range(k):
        while not (t == 0 and first >= 0):
            j = np.argmax(bound)
            if computed_at[j] == t:
                break
            row = sim[j]
            gain = 0.0
            for x in range(n):
                if row[x] > cover[x]:
                    gain += row[x] - cover[x]
            bound[j] = gain - redundancy * overlap[j]
            computed_at[j] = t
        if t == 0 and first >= 0:
            j = first
        order[t] = j
        bound[j] = -np.inf
        row = sim[j]
        for x in range(n):
            cover[x] = max(cover[x], row[x])
            overlap[x] += row[x]
    return order


def select_coverage(sim, k, *, redundancy: float = 0.0, seed: int | None = None) -> Selection:
    """Choose ``k`` images that cover the pool: greedy facility location on a similarity matrix.

    Maximises ``F(S) = Σ_{x in pool} max_{s∈S} sim[x, s] − redundancy · Σ_{i<j∈S} sim[i, j]``
    (every pool image close to a chosen one; ``redundancy > 0`` also penalises chosen pairs
    that are alike). Greedy is within ``1 − 1/e`` of the optimum for ``redundancy = 0``.

    Args:
      sim: ``(n, n)`` symmetric similarity, entries in ``[0, 1]`` (e.g. ``normalized_mi``).
      k: subset size, ``2 <= k <= n``.
      redundancy: weight of the pairwise term, ``>= 0``.
      seed: None: every pick greedy (deterministic); an int: the first pick is
        ``default_rng(seed).integers(n)``, the rest greedy (so seeds give different selections).
    Returns ``Selection`` with ``indices`` sorted, ``order`` the pick order and
    ``objective`` = ``F(S)``. Cost: O(N²) for the first pick, then O(N) per
    re-evaluated candidate (lazy greedy; typically a few per pick).
    """
    sim = check_mi(sim, k, name="sim")
    if sim.min() < 0 or not redundancy >= 0:
        raise ValueError(f"sim must be >= 0 (min {sim.min():.3g}) and redundancy >= 0 (got {redundancy!r}); "
                         "use a similarity such as normalized_mi(mi, 'sqrt')")
    first = -1 if seed is None else int(np.random.default_rng(seed).integers(len(sim)))
    order = _coverage_greedy(sim, int(k), float(redundancy), first)
    value = float(sim[:, order].max(axis=1).sum()) - redundancy * objective(sim, order)
    return Selection(np.sort(order), value, order=order)
