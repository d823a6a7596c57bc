"""The N×N MI matrix of a pool, as upper-triangle tiles computed by Ray tasks into a tile store.

The maths is in ``mi.py``; this module only cuts the matrix into tiles, schedules one Ray task per
tile, and stores/reads the tiles.

Tile store layout (any fsspec URL: a local path, ``s3://`` / ``gs://`` with the s3/gcs extras)::

    STORE/manifest.json                   format, version, pool fingerprint and settings (below)
    STORE/tiles/tile-IIIII-JJJJJ.parquet  tile (I, J), I ≤ J: rows I·t.., columns J·t.. (t = tile_size)

A tile is one Parquet column ``mi`` holding the ``(rows, cols)`` block row-major, in the store's
``dtype``: ``float64`` (default; bit-identical to ``pairwise_mi``) or ``float32`` (half the
storage: a 60,000-image pool is 14.4 GB as float64 and 7.2 GB as float32; MI values keep ~7
significant digits). Diagonal tiles are full symmetric blocks with the entropies H(u) on their
diagonal. The manifest fingerprints the pool (SHA-256 of the image bytes, shape, dtype) and the
settings (bins, color, tile_size, dtype, n, format version): a store written for another pool or
other settings is refused, never mixed. A tile is written under a temporary name and renamed, so a
tile file that exists is complete; a rerun skips those and computes only the missing ones.

Example::

    store = compute_mi_matrix(images, "runs/mi-store")     # resumable; progress bar
    rows = store.read_rows([0, 5, 9])                      # (3, n), reads only the tiles needed
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from drmi_ray.mi import LEVELS, entropy_sums, mi_block, to_codes

FORMAT = "drmi-mi-tiles"
VERSION = 1
DEFAULT_TILE_SIZE = 1024  # 1M pairs: ~1.5 s on one idle CPU core, 0.02 s on an H200; 8 MB of float64
DTYPES = ("float64", "float32")
# settings that must match for a rerun to continue a store
_FINGERPRINT_KEYS = ("format", "version", "n", "image_shape", "pool_sha256", "bins", "color", "tile_size", "dtype")


# ----------------------------------------------------------------------------------------------
# Tiles: geometry and the plain compute function the Ray task calls


def tile_grid(n: int, tile_size: int) -> list[tuple[int, int]]:
    """The upper-triangle tiles (I, J), I ≤ J, of an n×n matrix, row-major."""
    t = -(-n // tile_size)
    return [(i, j) for i in range(t) for j in range(i, t)]


def tile_pairs(n: int, tile_size: int, i: int, j: int) -> int:
    """Pairs u < v that tile (i, j) computes (a diagonal tile: its upper triangle)."""
    rows = min(n, (i + 1) * tile_size) - i * tile_size
    cols = min(n, (j + 1) * tile_size) - j * tile_size
    return rows * (rows - 1) // 2 if i == j else rows * cols


def compute_tile(codes: np.ndarray, sums: np.ndarray, i: int, j: int, tile_size: int, bins: int,
                 device=None) -> np.ndarray:
    """float64 block of tile (i, j) from the pool's codes ``(n, d)`` and ``entropy_sums`` ``(n,)``.

    device: ``None`` = numba CPU kernel, else a torch device for the torch kernel.
    """
    r = slice(i * tile_size, min(len(codes), (i + 1) * tile_size))
    c = slice(j * tile_size, min(len(codes), (j + 1) * tile_size))
    if i == j:
        return mi_block(codes[r], None, bins, s_a=sums[r], device=device)
    return mi_block(codes[r], codes[c], bins, s_a=sums[r], s_b=sums[c], device=device)


def _tile_path(root: str, i: int, j: int) -> str:
    return posixpath.join(root, "tiles", f"tile-{i:05d}-{j:05d}.parquet")


def write_tile(fs, root: str, i: int, j: int, block: np.ndarray, dtype: str) -> None:
    """Write a tile under a temporary name, then rename: a tile file that exists is complete."""
    final = _tile_path(root, i, j)
    tmp = posixpath.join(root, "tiles", f".tmp-{i:05d}-{j:05d}-{uuid.uuid4().hex}.parquet")
    table = pa.table({"mi": np.ascontiguousarray(block, dtype=dtype).ravel()})
    with fs.open(tmp, "wb") as f:
        # MI floats neither compress nor repeat: a dictionary page would only add 1 MB per tile
        pq.write_table(table, f, compression="none", use_dictionary=False)
    fs.mv(tmp, final)


def _tile_task(codes, sums, i, j, tile_size, bins, dtype, url, num_cpus):
    """One Ray task: compute and write tile (i, j) unless it exists. Returns (i, j, pairs, computed)."""
    import numba
    import ray

    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(_tile_path(root, i, j)):  # a retry or a concurrent run already wrote it
        return i, j, tile_pairs(len(codes), tile_size, i, j), False
    device = None
    if ray.get_gpu_ids():
        import torch

        device = "cuda" if torch.cuda.is_available() else None
    numba.set_num_threads(max(1, min(int(num_cpus), numba.config.NUMBA_NUM_THREADS)))
    block = compute_tile(codes, sums, i, j, tile_size, bins, device=device)
    write_tile(fs, root, i, j, block, dtype)
    return i, j, tile_pairs(len(codes), tile_size, i, j), True


# ----------------------------------------------------------------------------------------------
# The job


def pool_fingerprint(images: np.ndarray) -> str:
    """SHA-256 (hex) of the pool's shape, dtype and bytes."""
    h = hashlib.sha256(f"{images.shape}|{images.dtype}|".encode())
    h.update(memoryview(np.ascontiguousarray(images)).cast("B"))
    return h.hexdigest()


def compute_mi_matrix(images, store_url: str, *, bins: int = LEVELS, color: str = "flatten",
                      tile_size: int = DEFAULT_TILE_SIZE, max_in_flight: int | None = None,
                      num_gpus_per_task: float = 0, num_cpus_per_task: float = 1,
                      dtype: str = "float64", progress: bool = True) -> "TileStore":
    """Compute the pool's full pairwise-MI matrix into a tile store, one Ray task per tile.

    images: uint8 ``(n, H, W)``, ``(n, H, W, C)`` or ``(n, D)`` (validated like ``pairwise_mi``).
    store_url: folder (any fsspec URL) of the tile store; created, or continued when it holds a
        partial matrix of the same pool and settings (a mismatch is a ValueError).
    bins, color: as in ``pairwise_mi``. tile_size: rows/columns per tile (default 1024; on GPUs
        4096 amortises the per-task cost better).
    max_in_flight: tasks submitted at once (default 2 × the cluster's CPUs, at least 4); with the
        pool put in the object store once, driver memory is the pool plus O(max_in_flight).
    num_gpus_per_task: > 0 runs each tile on the task's GPU with the torch kernel (workers are
        kept across tasks so CUDA starts once per worker). num_cpus_per_task: numba threads per task.
    dtype: ``"float64"`` or ``"float32"`` storage (see the module docstring).
    progress: a tqdm bar with pairs/s and ETA, tiles done in its postfix.
    Calls ``ray.init()`` when Ray is not running. Returns the ``TileStore``, whose ``computed``
    lists the tiles this call computed (the rest were already there).
    """
    import ray

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if isinstance(tile_size, bool) or not isinstance(tile_size, (int, np.integer)) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive integer, got {tile_size!r}")
    codes = to_codes(images, bins=bins, color=color, name="images")
    n = len(codes)
    fs, root = fsspec.core.url_to_fs(store_url)
    _open_or_create(fs, root, store_url, _manifest(images, codes, bins, color, tile_size, dtype))

    if not ray.is_initialized():
        ray.init()
    if num_gpus_per_task and ray.cluster_resources().get("GPU", 0) < num_gpus_per_task:
        raise ValueError(f"num_gpus_per_task={num_gpus_per_task} but the Ray cluster has "
                         f"{ray.cluster_resources().get('GPU', 0)} GPUs; use 0 for the CPU kernel")
    if max_in_flight is None:
        max_in_flight = max(4, 2 * int(ray.cluster_resources().get("CPU", 1)))

    done = _present_tiles(fs, root)
    todo = [t for t in tile_grid(n, tile_size) if t not in done]
    # GPU tasks default to a fresh worker per call (CUDA start-up per tile); max_calls=0 keeps them
    task = ray.remote(max_calls=0)(_tile_task) if num_gpus_per_task else ray.remote(_tile_task)
    task = task.options(num_cpus=num_cpus_per_task, num_gpus=num_gpus_per_task, max_retries=3)
    codes_ref, sums_ref = ray.put(codes), ray.put(entropy_sums(codes, bins))  # once, shared by all tasks

    from tqdm.auto import tqdm

    total = sum(tile_pairs(n, tile_size, i, j) for i, j in todo)
    bar = tqdm(total=total, unit="pair", unit_scale=True, disable=not progress, desc="MI tiles")
    computed, pending, start = [], [], time.perf_counter()
    todo_iter = iter(todo)
    while True:
        for i, j in todo_iter:  # top the window up to max_in_flight
            pending.append(task.remote(codes_ref, sums_ref, i, j, tile_size, bins, dtype, store_url,
                                       num_cpus_per_task))
            if len(pending) >= max_in_flight:
                break
        if not pending:
            break
        ready, pending = ray.wait(pending, num_returns=1)
        for i, j, pairs, was_computed in ray.get(ready):
            if was_computed:
                computed.append((i, j))
            bar.update(pairs)
            bar.set_postfix(tiles=f"{len(done) + len(computed)}/{len(done) + len(todo)}", refresh=False)
    bar.close()
    store = TileStore(store_url)
    store.computed = sorted(computed)
    store.stats = {"tiles_computed": len(computed), "tiles_skipped": len(done), "pairs": total,
                   "seconds": time.perf_counter() - start}
    return store


def _manifest(images, codes, bins, color, tile_size, dtype) -> dict:
    return {
        "format": FORMAT, "version": VERSION, "n": len(codes), "image_shape": list(np.shape(images)[1:]),
        "pool_sha256": pool_fingerprint(images), "bins": int(bins), "color": color,
        "tile_size": int(tile_size), "dtype": dtype, "positions": int(codes.shape[1]),
        "layout": "tiles/tile-IIIII-JJJJJ.parquet, I <= J, column 'mi' = (rows, cols) block row-major",
    }


def compute_small_stores(items, *, bins: int = LEVELS, color: str = "flatten", tile_size: int = DEFAULT_TILE_SIZE,
                         dtype: str = "float64", device=None) -> list[int]:
    """Many small matrices in one call (one Ray task runs it for a bundle of small partitions, so
    their per-task cost is paid once): each ``(images, store_url)`` with at most ``tile_size``
    images gets its one-tile store, the same store ``compute_mi_matrix`` writes (and resumes).
    Returns the pairs computed for each item (0 where its tile was already there)."""
    computed = []
    for images, url in items:
        codes = to_codes(images, bins=bins, color=color, name="images")
        if len(codes) > tile_size:
            raise ValueError(f"{url}: {len(codes)} images do not fit one tile of {tile_size}; use compute_mi_matrix")
        fs, root = fsspec.core.url_to_fs(url)
        _open_or_create(fs, root, url, _manifest(images, codes, bins, color, tile_size, dtype))
        if fs.exists(_tile_path(root, 0, 0)):
            computed.append(0)
            continue
        write_tile(fs, root, 0, 0, compute_tile(codes, entropy_sums(codes, bins), 0, 0, tile_size, bins, device), dtype)
        computed.append(tile_pairs(len(codes), tile_size, 0, 0))
    return computed


def _open_or_create(fs, root, url, manifest):
    path = posixpath.join(root, "manifest.json")
    fs.makedirs(posixpath.join(root, "tiles"), exist_ok=True)
    if fs.exists(path):
        with fs.open(path, "r") as f:
            old = json.load(f)
        diff = [k for k in _FINGERPRINT_KEYS if old.get(k) != manifest[k]]
        if diff:
            what = ", ".join(f"{k}: store has {old.get(k)!r}, asked {manifest[k]!r}" if k != "pool_sha256"
                             else "pool: other images" for k in diff)
            raise ValueError(f"MI store {url} was written for another pool or other settings ({what}); "
                             "use a new store_url, or delete this one to recompute")
        return
    with fs.open(path, "w") as f:
        json.dump(manifest, f, indent=1)


def _present_tiles(fs, root) -> set[tuple[int, int]]:
    present = set()
    for p in fs.glob(posixpath.join(root, "tiles", "tile-*.parquet")):
        _, i, j = posixpath.basename(p)[: -len(".parquet")].split("-")
        present.add((int(i), int(j)))
    return present


# ----------------------------------------------------------------------------------------------
# Reading


class TileStore:
    """A tile store opened for reading (see the module docstring for the layout).

    Attributes: ``n`` (images), ``bins``, ``color``, ``tile_size``, ``dtype`` (storage and read
    dtype), ``manifest`` (dict), ``complete`` (every tile present), ``url``.
    Reads return the store's dtype and touch only the tiles they need, one tile in memory at a time.
    """

    def __init__(self, url: str):
        self.url = url
        self._fs, self._root = fsspec.core.url_to_fs(url)
        path = posixpath.join(self._root, "manifest.json")
        if not self._fs.exists(path):
            raise FileNotFoundError(f"no MI tile store at {url} (no manifest.json); "
                                    "create it with drmi_ray.matrix.compute_mi_matrix(images, url)")
        with self._fs.open(path, "r") as f:
            self.manifest = json.load(f)
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise ValueError(f"{url}/manifest.json is not a {FORMAT} v{VERSION} manifest "
                             f"(format {self.manifest.get('format')!r}, version {self.manifest.get('version')!r})")
        self.n = self.manifest["n"]
        self.bins = self.manifest["bins"]
        self.color = self.manifest["color"]
        self.tile_size = self.manifest["tile_size"]
        self.dtype = np.dtype(self.manifest["dtype"])
        self.computed, self.stats = [], {}

    def missing_tiles(self) -> list[tuple[int, int]]:
        present = _present_tiles(self._fs, self._root)
        return [t for t in tile_grid(self.n, self.tile_size) if t not in present]

    @property
    def complete(self) -> bool:
        return not self.missing_tiles()

    def read_tile(self, i: int, j: int) -> np.ndarray:
        """Tile (i, j), i ≤ j, as stored: ``(rows, cols)`` of the store's dtype."""
        t = self.tile_size
        shape = (min(self.n, (i + 1) * t) - i * t, min(self.n, (j + 1) * t) - j * t)
        path = _tile_path(self._root, i, j)
        try:
            with self._fs.open(path, "rb") as f:
                values = pq.read_table(f).column("mi").to_numpy()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"tile ({i}, {j}) of MI store {self.url} is missing: the matrix is incomplete "
                f"({len(self.missing_tiles())} tiles missing); rerun compute_mi_matrix(images, {self.url!r}) "
                "with the same pool and settings to finish it") from None
        return values.reshape(shape)

    def read_block(self, rows, cols) -> np.ndarray:
        """``(len(rows), len(cols))`` block of the full symmetric matrix (diagonal = entropy)."""
        rows, cols = self._index(rows, "rows"), self._index(cols, "cols")
        out = np.empty((len(rows), len(cols)), self.dtype)
        rt, ct = rows // self.tile_size, cols // self.tile_size
        for i in np.unique(rt):
            r_pos = np.flatnonzero(rt == i)
            for j in np.unique(ct):
                c_pos = np.flatnonzero(ct == j)
                tile = self.read_tile(i, j) if i <= j else self.read_tile(j, i).T  # lower half by symmetry
                out[np.ix_(r_pos, c_pos)] = tile[np.ix_(rows[r_pos] - i * self.tile_size,
                                                        cols[c_pos] - j * self.tile_size)]
        return out

    def read_rows(self, rows) -> np.ndarray:
        """``(len(rows), n)`` full rows (store dtype); reads only the tiles of those rows' tile-rows."""
        return self.read_block(rows, np.arange(self.n))

    def to_dense(self) -> np.ndarray:
        """The whole ``(n, n)`` matrix (store dtype), each tile read once; for pools that fit in memory."""
        out = np.empty((self.n, self.n), self.dtype)
        t = self.tile_size
        for i, j in tile_grid(self.n, t):
            tile = self.read_tile(i, j)
            out[i * t:i * t + tile.shape[0], j * t:j * t + tile.shape[1]] = tile
            out[j * t:j * t + tile.shape[1], i * t:i * t + tile.shape[0]] = tile.T
        return out

    def _index(self, idx, name) -> np.ndarray:
        idx = np.atleast_1d(np.asarray(idx))
        if idx.size == 0:
            idx = idx.astype(np.int64)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"{name} must be a 1-D sequence of integer indices, got {idx.dtype} {idx.shape}")
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"{name} must lie in 0..{self.n - 1}, got {idx.min()}..{idx.max()}")
        return idx.astype(np.int64)

    def __repr__(self):
        return f"TileStore({self.url!r}, n={self.n}, bins={self.bins}, color={self.color!r}, dtype={self.dtype})"
