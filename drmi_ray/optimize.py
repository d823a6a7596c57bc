"""Subset optimizer: choose K of N pool images with the least summed pairwise MI (DRMI step 3).

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
  ``exact_select(mi, k)``           the oracle for small pools (brute force or scipy ``milp``)
  ``select_distributed(source, k)`` Ray actors read the matrix themselves (``.npy`` path,
                                    tile-store URL or in-memory array); see its docstring
  ``select_partitioned(labels, k, partition_mi)``  per-partition budgets, so ImageNet-sized pools
                                    never need the full matrix; ``kmeans_partitions`` makes labels

Example::

    mi = pairwise_mi(images)                     # (N, N) float64, entropy on the diagonal
    sel = select(mi, 600, seed=0)                # sel.indices (600,) int64, sel.objective float
"""

from __future__ import annotations

import math
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
# The iterated local search below runs unchanged on a dense matrix (numba) or on Ray shard actors.


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
def _coverage_greedy(sim, k, redundancy):
    """Lazy greedy for F(S) = Σ_x max_{s∈S} sim[x, s] − redundancy · Σ_{i<j∈S} sim[i, j].

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
        while True:
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
        order[t] = j
        bound[j] = -np.inf
        row = sim[j]
        for x in range(n):
            cover[x] = max(cover[x], row[x])
            overlap[x] += row[x]
    return order


def select_coverage(sim, k, *, redundancy: float = 0.0) -> Selection:
    """Choose ``k`` images that cover the pool: greedy facility location on a similarity matrix.

    Maximises ``F(S) = Σ_{x in pool} max_{s∈S} sim[x, s] − redundancy · Σ_{i<j∈S} sim[i, j]``
    (every pool image close to a chosen one; ``redundancy > 0`` also penalises chosen pairs
    that are alike). Greedy is within ``1 − 1/e`` of the optimum for ``redundancy = 0``.

    Args:
      sim: ``(n, n)`` symmetric similarity, entries in ``[0, 1]`` (e.g. ``normalized_mi``).
      k: subset size, ``2 <= k <= n``.
      redundancy: weight of the pairwise term, ``>= 0``.
    Returns ``Selection`` with ``indices`` sorted, ``order`` the greedy pick order and
    ``objective`` = ``F(S)``. Deterministic. Cost: O(N²) for the first pick, then O(N) per
    re-evaluated candidate (lazy greedy; typically a few per pick).
    """
    sim = check_mi(sim, k, name="sim")
    if sim.min() < 0 or not redundancy >= 0:
        raise ValueError(f"sim must be >= 0 (min {sim.min():.3g}) and redundancy >= 0 (got {redundancy!r}); "
                         "use a similarity such as normalized_mi(mi, 'sqrt')")
    order = _coverage_greedy(sim, int(k), float(redundancy))
    value = float(sim[:, order].max(axis=1).sum()) - redundancy * objective(sim, order)
    return Selection(np.sort(order), value, order=order)


# ----------------------------------------------------------------------------- exact oracle


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

    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

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


# ----------------------------------------------------------------------------- matrix sources


class MatrixSource:
    """Read access to an ``(n, n)`` MI matrix wherever it lives; opened inside each actor.

    ``source``: a ``.npy`` path (memory-mapped: actors share the page cache, nothing is copied),
    a tile-store URL (``drmi_ray.matrix.TileStore``), an in-memory array, ``[object_ref]`` of an
    array in the object store, or any object with ``.n`` and ``.read_rows(rows) -> (len, n)``.
    """

    def __init__(self, source):
        self.array, self.store = None, None
        if isinstance(source, list) and len(source) == 1:  # [ref]: nested so Ray does not resolve it
            import ray

            source = ray.get(source[0])
        if isinstance(source, np.ndarray):
            self.array = source
        elif isinstance(source, str) and source.endswith(".npy"):
            self.array = np.load(source, mmap_mode="r")
        elif isinstance(source, str):
            from drmi_ray.matrix import TileStore

            self.store = TileStore(source)
        elif hasattr(source, "read_rows") and hasattr(source, "n"):
            self.store = source
        else:
            raise ValueError(f"source must be a .npy path, a tile-store URL, an ndarray or an object with .n and .read_rows, got {type(source).__name__}")
        if self.array is not None and (self.array.ndim != 2 or self.array.shape[0] != self.array.shape[1]):
            raise ValueError(f"source matrix must be square (n, n), got shape {self.array.shape}")
        self.n = self.array.shape[0] if self.array is not None else int(self.store.n)
        self.itemsize = (self.array.dtype if self.array is not None else np.dtype(getattr(self.store, "dtype", np.float64))).itemsize

    def block(self, lo, hi):
        """Rows ``lo:hi``: a view for arrays and memory maps, a copy from a store."""
        if self.array is not None:
            return self.array[lo:hi]
        return self.store.read_rows(np.arange(lo, hi))

    def dense(self):
        if self.array is not None:
            return self.array
        return self.store.to_dense() if hasattr(self.store, "to_dense") else self.store.read_rows(np.arange(self.n))


# ----------------------------------------------------------------------------- Ray actors (thin)


class _Shard:
    """Owns rows ``lo:hi`` of the matrix (read from the source in the constructor) and proposes
    swaps for its outsiders. Stateless between calls: the driver sends the applied state
    (members, g) every round, so an actor restarted with its constructor state answers the same."""

    def __init__(self, source, lo, hi):
        self.lo, self.hi = lo, hi
        self.rows = MatrixSource(source).block(lo, hi)
        self._members, self._sub = None, None  # cache of rows[:, members], derived from members only

    def check(self):
        """None, or a one-line problem with this shard (non-finite entries)."""
        for a in range(0, self.hi - self.lo, 256):
            bad = ~np.isfinite(self.rows[a : a + 256])
            if bad.any():
                r, c = np.argwhere(bad)[0]
                return f"matrix has non-finite (NaN/inf) entries, first at ({self.lo + a + r}, {c}); recompute or replace them"
        return None

    def _columns(self, members):
        """``rows[:, members]`` as float64; after a few swaps only the changed columns are read
        (a full gather touches every page of a memory-mapped shard)."""
        if self._members is not None and len(self._members) == len(members):
            changed = np.flatnonzero(self._members != members)
            if len(changed) <= len(members) // 4:
                for p in changed:
                    self._sub[:, p] = self.rows[:, members[p]]
                self._members = members.copy()
                return self._sub
        self._sub = np.asarray(self.rows[:, members], dtype=np.float64)
        self._members = members.copy()
        return self._sub

    def propose(self, members, g, count):
        """Best swap for each outsider j of the shard: (delta, member position p, j, mi[j, members[p]]),
        the ``count`` most improving ones, sorted by (delta, j)."""
        sub = self._columns(members)  # (rows, K)
        p = np.argmax(sub + g[members], axis=1)  # the member whose removal helps j most
        mij = sub[np.arange(len(sub)), p]
        d = (g[self.lo : self.hi] - mij) - g[members[p]]
        d[np.isin(np.arange(self.lo, self.hi), members)] = np.inf
        keep = np.flatnonzero(d < -TOL)
        if len(keep) > count:
            keep = keep[np.argpartition(d[keep], count)[:count]]
        keep = keep[np.lexsort((keep, d[keep]))]
        return d[keep], p[keep], keep + self.lo, mij[keep]

    def read(self, idx):
        return np.asarray(self.rows[np.asarray(idx) - self.lo], dtype=np.float64)


class _Searcher:
    """Holds the whole matrix (a memory map of a ``.npy`` is shared, not copied) and runs ``select``."""

    def __init__(self, source):
        self.mi = MatrixSource(source).dense()

    def run(self, k, seed, kwargs):
        t0 = time.time()
        sel = select(self.mi, k, seed=seed, **kwargs)
        return sel, t0


class _ShardedState:
    """The search state on the driver (members, g: O(N)); swap proposals and matrix rows come
    from the shard actors. Same interface as ``_DenseState``."""

    def __init__(self, shards, bounds, n, k, proposals, progress):
        self.shards, self.bounds, self.n, self.k = shards, bounds, n, k
        self.proposals, self.progress, self.rounds = proposals, progress, 0

    def _rows(self, idx):
        import ray

        idx = np.unique(np.asarray(idx, dtype=np.int64))
        owner = np.searchsorted(self.bounds, idx, side="right") - 1
        parts = [idx[owner == o] for o in np.unique(owner)]
        got = ray.get([self.shards[o].read.remote(part) for o, part in zip(np.unique(owner), parts)])
        return {int(x): row for part, rows in zip(parts, got) for x, row in zip(part, rows)}

    def reset(self, first):
        """Greedy start, the same arithmetic as the dense kernel (one row read per member)."""
        self.g = np.zeros(self.n)
        self.inside = np.zeros(self.n, bool)
        self.members = np.empty(self.k, np.int64)
        add = first
        for t in range(self.k):
            if t > 0:
                add = int(np.argmin(np.where(self.inside, np.inf, self.g)))
            self.members[t], self.inside[add] = add, True
            row = self._rows([add])[add].copy()
            row[add] = 0.0
            self.g += row

    def _apply(self, p, j, ri, rj):
        i = self.members[p]
        self.g += rj - ri
        self.g[i] += ri[i]
        self.g[j] -= rj[j]
        self.inside[i], self.inside[j], self.members[p] = False, True, j

    def swap_many(self, ps, js):
        rows = self._rows(np.concatenate([self.members[np.asarray(ps)], js]))
        for p, j in zip(ps, js):
            self._apply(int(p), int(j), rows[int(self.members[p])], rows[int(j)])

    def local_search(self):
        """Rounds: every shard proposes, the driver applies the best non-conflicting proposals
        whose gain, recomputed after the swaps before them, still improves."""
        import ray

        while True:
            m, g = ray.put(self.members), ray.put(self.g)
            out = ray.get([s.propose.remote(m, g, self.proposals) for s in self.shards])
            d, p, j, mij = (np.concatenate(x) for x in zip(*out))
            order = np.lexsort((j, d))[: self.proposals]
            chosen, used_p, used_j = [], set(), set()
            for t in order:
                if p[t] not in used_p and j[t] not in used_j:
                    chosen.append(t)
                    used_p.add(p[t])
                    used_j.add(j[t])
            if not chosen:
                return
            rows = self._rows(np.concatenate([self.members[p[chosen]], j[chosen]]))
            for t in chosen:
                i = self.members[p[t]]
                if (self.g[j[t]] - mij[t]) - self.g[i] < -TOL:
                    self._apply(int(p[t]), int(j[t]), rows[int(i)], rows[int(j[t])])
            self.rounds += 1
            if self.progress is not None:
                self.progress({"round": self.rounds, "objective": self.objective(), "actors": self.shards})

    objective = _DenseState.objective
    snapshot = _DenseState.snapshot
    restore = _DenseState.restore


def _restart_seeds(seed, restarts):
    """Restart 0 uses ``seed`` itself (so one restart equals ``select(..., seed=seed)``)."""
    children = np.random.SeedSequence(seed).spawn(max(0, restarts - 1))
    return [seed] + [int(c.generate_state(1)[0]) for c in children]


def select_distributed(source, k, *, num_actors: int = 2, restarts: int = 1, seed=0, mode: str = "auto", iterations: int = 200, time_limit: float | None = None, strength: int | None = None, patience: int = 10, proposals: int = 8, max_actor_restarts: int = 3, dense_limit_bytes: int = 2**31, progress=None) -> Selection:
    """``select`` on Ray actors that read the matrix from ``source`` themselves.

    source: ``.npy`` path (memory-mapped), tile-store URL, ndarray (put in the object store once)
      or an object with ``.n``/``.read_rows`` (see ``MatrixSource``).
    mode: ``"restarts"``: ``restarts`` independent ``select`` runs (seeds from ``seed``; restart 0
      uses ``seed``) spread over ``num_actors`` actors that each hold the matrix; best wins.
      ``"shards"``: ``num_actors`` actors each own a contiguous block of rows (the matrix is never in
      one process); each round every shard proposes its ``proposals`` best swaps, the driver applies
      the best non-conflicting improving ones and sends the new (members, g) to all; perturbations
      and greedy restarts as in ``select``; ``restarts`` searches run one after another.
      ``"auto"`` (default): ``"restarts"`` when the matrix fits in ``dense_limit_bytes`` (2 GiB).
    Fault tolerance: actors are restarted (``max_actor_restarts``) and their pending calls retried;
      the applied state lives on the driver and is sent with every call, and a restart is a pure
      function of its seed, so a killed actor changes nothing in the result.
    progress: optional callable, in shard mode called after each round with
      ``{"round", "objective", "actors"}``.
    Other arguments as in ``select`` (``time_limit`` applies per restart).
    """
    import ray

    if mode not in ("auto", "restarts", "shards"):
        raise ValueError(f"mode must be 'auto', 'restarts' or 'shards', got {mode!r}")
    if num_actors < 1 or restarts < 1:
        raise ValueError(f"num_actors and restarts must be >= 1, got {num_actors} and {restarts}")
    if isinstance(source, np.ndarray):
        check_mi(source, k)
        source = [ray.put(source)]
    src = MatrixSource(source)
    n = src.n
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 2 <= k <= n:
        raise ValueError(f"k must be an integer with 2 <= k <= n={n}, got {k!r}")
    if mode == "auto":
        mode = "restarts" if n * n * src.itemsize <= dense_limit_bytes else "shards"
    options = dict(max_restarts=max_actor_restarts, max_task_retries=max_actor_restarts, num_cpus=1)
    seeds = _restart_seeds(seed, restarts)
    kwargs = dict(iterations=iterations, time_limit=time_limit, strength=strength, patience=patience)
    start = time.time()

    if mode == "restarts":
        actors = [ray.remote(_Searcher).options(**options).remote(source) for _ in range(min(num_actors, restarts))]
        runs = ray.get([actors[r % len(actors)].run.remote(k, s, kwargs) for r, s in enumerate(seeds)])
        for a in actors:
            ray.kill(a)
        best = min(range(len(runs)), key=lambda r: (runs[r][0].objective, r))
        # one history over all restarts, in seconds since this call began
        events = sorted((t0 - start + t, f) for sel, t0 in runs for t, f in sel.history)
        history, low = [], np.inf
        for t, f in events:
            if f < low:
                history.append((t, f))
                low = f
        sel = runs[best][0]
        return Selection(sel.indices, sel.objective, history, sum(r[0].iterations for r in runs))

    bounds = np.linspace(0, n, num_actors + 1).astype(np.int64)
    shards = [ray.remote(_Shard).options(**options).remote(source, int(bounds[a]), int(bounds[a + 1])) for a in range(num_actors)]
    try:
        problems = [p for p in ray.get([s.check.remote() for s in shards]) if p]
        if problems:
            raise ValueError(problems[0])
        best = None
        history, it_total = [], 0
        for s in seeds:
            rng = np.random.default_rng(s)
            state = _ShardedState(shards, bounds, n, k, proposals, progress)
            state.reset(int(rng.integers(n)))
            t0 = time.perf_counter()
            h = [(0.0, state.objective())]
            it_total += _iterated_local_search(state, rng, iterations=iterations, time_limit=time_limit, strength=strength or _default_strength(k), patience=patience, start=t0, history=h)
            f = state.objective()
            offset = time.time() - start - (time.perf_counter() - t0)
            for t, v in h:
                if not history or v < history[-1][1]:
                    history.append((offset + t, v))
            if best is None or f < best[0] - TOL:
                best = (f, np.sort(state.members))
        return Selection(best[1], _objective_from_rows(shards, bounds, best[1]), history, it_total)
    finally:
        for a in shards:
            ray.kill(a)


def _objective_from_rows(shards, bounds, idx):
    import ray

    owner = np.searchsorted(bounds, idx, side="right") - 1
    rows = ray.get([shards[o].read.remote(idx[owner == o]) for o in np.unique(owner)])
    sub = np.concatenate(rows)[:, idx]
    return float((sub.sum() - np.trace(sub)) / 2)


# ----------------------------------------------------------------------------- partitions


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
            from drmi_ray.mi import pairwise_mi

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
