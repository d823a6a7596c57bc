"""``select`` on Ray actors that read the MI matrix themselves (``.npy`` path, tile-store URL or
in-memory array): ``select_distributed(source, k)``, see its docstring; ``MatrixSource`` opens
the matrix inside each actor. The search itself is ``search._iterated_local_search``, run here
over ``_ShardedState`` (swap proposals and rows from shard actors) instead of ``_DenseState``."""

from __future__ import annotations

import time

import numpy as np
import ray

from drmi_ray.optimize.search import (TOL, Selection, _default_strength, _DenseState, _iterated_local_search, check_mi,
                                      select)
from drmi_ray.tiles import TileStore

# ----------------------------------------------------------------------------- matrix sources


class MatrixSource:
    """Read access to an ``(n, n)`` MI matrix wherever it lives; opened inside each actor.

    ``source``: a ``.npy`` path (memory-mapped: actors share the page cache, nothing is copied),
    a tile-store URL (``drmi_ray.tiles.TileStore``), an in-memory array, ``[object_ref]`` of an
    array in the object store, or any object with ``.n`` and ``.read_rows(rows) -> (len, n)``.
    """

    def __init__(self, source):
        self.array, self.store = None, None
        if isinstance(source, list) and len(source) == 1:  # [ref]: nested so Ray does not resolve it
            source = ray.get(source[0])
        if isinstance(source, np.ndarray):
            self.array = source
        elif isinstance(source, str) and source.endswith(".npy"):
            self.array = np.load(source, mmap_mode="r")
        elif isinstance(source, str):
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
    owner = np.searchsorted(bounds, idx, side="right") - 1
    rows = ray.get([shards[o].read.remote(idx[owner == o]) for o in np.unique(owner)])
    sub = np.concatenate(rows)[:, idx]
    return float((sub.sum() - np.trace(sub)) / 2)
