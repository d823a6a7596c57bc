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
other settings is refused, never mixed.

Integrity: every tile is self-describing. Its Parquet key-value metadata holds the store
``fingerprint`` (SHA-256 of the manifest's fingerprint keys), its coordinates and its shape, and
its pages carry CRC checksums. A rerun reads every existing tile's footer (not its data) and treats
a tile that is missing, unreadable, truncated, of the wrong shape or of another fingerprint as not
done: it recomputes it and reports how many it repaired (``stats["tiles_repaired"]``).
``check_data=True`` also reads every tile's data to catch bytes corrupted inside a page. Reads
check footer and checksums and name the file on any failure. Tiles and the manifest are written
under a temporary name and renamed; a manifest is never created over ``tiles/`` holding tiles of
another fingerprint.

Concurrent drivers share the work through per-tile claim files ``tiles/.claim-IIIII-JJJJJ``
(created exclusively; JSON with owner, host, pid, time). A driver claims a tile just before it
submits it and removes the claim once the tile is written; it skips tiles claimed by another live
driver and, at the end, waits for them, taking over a claim that is older than ``claim_timeout_s``
or whose driver (same host) is dead. Two drivers may at worst compute a tile twice (a taken-over
claim); tiles are deterministic and renamed into place, so never a wrong tile.

Example::

    store = compute_mi_matrix(images, "runs/mi-store")     # resumable; progress bar
    rows = store.read_rows([0, 5, 9])                      # (3, n), reads only the tiles needed
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import socket
import time
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from drmi_ray.runtime import init_ray, log, use_cpus
from drmi_ray.mi import LEVELS, entropy_sums, mi_block, to_codes

FORMAT = "drmi-mi-tiles"
VERSION = 1
DEFAULT_TILE_SIZE = 1024  # 1M pairs: ~1.5 s on one idle CPU core, 0.02 s on an H200; 8 MB of float64
DTYPES = ("float64", "float32")
# settings that must match for a rerun to continue a store
_FINGERPRINT_KEYS = ("format", "version", "n", "image_shape", "pool_sha256", "bins", "color", "tile_size", "dtype")
CLAIM_TIMEOUT_S = 600.0  # a claim older than this is taken over (a live driver's tile should be done by then)
_TILE_NAME = re.compile(r"tile-(\d+)-(\d+)\.parquet")  # _tile_path's names; any other file is not a tile
_META = b"drmi.tile"  # Parquet key-value metadata key of a tile: JSON {fingerprint, i, j, shape}


def store_fingerprint(manifest: dict) -> str:
    """SHA-256 (hex) of the manifest's fingerprint keys: pool and settings."""
    return hashlib.sha256(json.dumps([manifest.get(k) for k in _FINGERPRINT_KEYS]).encode()).hexdigest()


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


def tile_shape(n: int, tile_size: int, i: int, j: int) -> tuple[int, int]:
    """(rows, cols) of tile (i, j)."""
    return min(n, (i + 1) * tile_size) - i * tile_size, min(n, (j + 1) * tile_size) - j * tile_size


def _tile_path(root: str, i: int, j: int) -> str:
    return posixpath.join(root, "tiles", f"tile-{i:05d}-{j:05d}.parquet")


def write_tile(fs, root: str, i: int, j: int, block: np.ndarray, dtype: str, fingerprint: str = "") -> None:
    """Write a tile under a temporary name, then rename: a tile file that exists was complete when
    written. Its metadata records ``fingerprint``, (i, j) and the shape; its pages carry checksums."""
    final = _tile_path(root, i, j)
    tmp = posixpath.join(root, "tiles", f".tmp-{i:05d}-{j:05d}-{uuid.uuid4().hex}.parquet")
    meta = {"fingerprint": fingerprint, "i": int(i), "j": int(j), "shape": [int(x) for x in block.shape]}
    table = pa.table({"mi": np.ascontiguousarray(block, dtype=dtype).ravel()}).replace_schema_metadata(
        {_META: json.dumps(meta).encode()})
    with fs.open(tmp, "wb") as f:
        # MI floats neither compress nor repeat: a dictionary page would only add 1 MB per tile
        pq.write_table(table, f, compression="none", use_dictionary=False, write_page_checksum=True)
    fs.mv(tmp, final)


def tile_problem(fs, path: str, fingerprint: str, i: int, j: int, shape, dtype: str,
                 data: bool = False) -> str | None:
    """Why the tile file at ``path`` is not tile (i, j) of shape ``shape`` of the store
    ``fingerprint`` ("missing", "unreadable: ...", ...), or None when it is. Reads only the Parquet
    footer, unless ``data`` (then also every page, verifying its checksum)."""
    try:
        with fs.open(path, "rb") as f:
            md = pq.read_metadata(f)
            if data:
                f.seek(0)
                pq.read_table(f, page_checksum_verification=True)
    except FileNotFoundError:
        return "missing"
    except Exception as e:  # truncated, emptied, garbage: ArrowInvalid, OSError, ...
        return f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    try:
        meta = json.loads((md.metadata or {})[_META])
    except (KeyError, ValueError, TypeError):
        return "no drmi tile metadata (not written by write_tile of this version)"
    if meta.get("fingerprint") != fingerprint:
        return "from another store (other pool or settings)"
    if (meta.get("i"), meta.get("j")) != (i, j):
        return f"holds tile ({meta.get('i')}, {meta.get('j')}), not ({i}, {j})"
    if list(meta.get("shape", [])) != list(shape) or md.num_rows != shape[0] * shape[1]:
        return f"wrong shape ({meta.get('shape')}, {md.num_rows} values; expected {list(shape)})"
    if md.num_columns != 1 or md.schema.column(0).name != "mi" or \
            md.schema.column(0).physical_type != ("DOUBLE" if dtype == "float64" else "FLOAT"):
        return "wrong column or dtype"
    return None


def _tile_task(codes, sums, i, j, tile_size, bins, dtype, url, num_cpus, fingerprint):
    """One Ray task: compute and write tile (i, j) (the driver holds its claim). Returns (i, j, pairs)."""
    import ray

    fs, root = fsspec.core.url_to_fs(url)
    device = None
    if ray.get_gpu_ids():
        import torch

        device = "cuda" if torch.cuda.is_available() else None
    use_cpus(num_cpus)
    block = compute_tile(codes, sums, i, j, tile_size, bins, device=device)
    write_tile(fs, root, i, j, block, dtype, fingerprint)
    return i, j, tile_pairs(len(codes), tile_size, i, j)


# ----------------------------------------------------------------------------------------------
# Claims: concurrent drivers on one store share the work


class _Claims:
    """Per-tile claim files ``tiles/.claim-IIIII-JJJJJ`` of one driver (see the module docstring)."""

    def __init__(self, fs, root, timeout_s):
        self.fs, self.root, self.timeout_s = fs, root, timeout_s
        self.me = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}

    def _path(self, i, j):
        return posixpath.join(self.root, "tiles", f".claim-{i:05d}-{j:05d}")

    def take(self, i, j) -> bool:
        """Claim tile (i, j): True when it is now ours (free, stale, or its owner is dead)."""
        path = self._path(i, j)
        for _ in range(2):
            try:
                with self.fs.open(path, "xb") as f:
                    f.write(json.dumps({**self.me, "time": time.time()}).encode())
                return True
            except FileExistsError:
                if not self._stale(path):
                    return False
                try:  # take over: two drivers doing so at once may both compute the tile (same bytes)
                    self.fs.rm(path)
                except FileNotFoundError:
                    pass
        return False

    def _stale(self, path) -> bool:
        try:
            with self.fs.open(path, "rb") as f:
                claim = json.loads(f.read() or b"{}")
            age = time.time() - float(claim.get("time", self.fs.modified(path).timestamp()))
        except FileNotFoundError:
            return True
        except (ValueError, OSError):  # being written right now, or damaged: judge by its age
            try:
                age = time.time() - self.fs.modified(path).timestamp()
            except FileNotFoundError:
                return True
            claim = {}
        if claim.get("owner") == self.me["owner"] or age > self.timeout_s:
            return True
        if claim.get("host") == self.me["host"] and isinstance(claim.get("pid"), int):
            try:
                os.kill(claim["pid"], 0)
            except ProcessLookupError:
                return True  # its driver is gone
            except OSError:
                pass
        return False

    def release(self, i, j):
        try:
            self.fs.rm(self._path(i, j))
        except FileNotFoundError:
            pass


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
                      dtype: str = "float64", progress: bool = True, check_data: bool = False,
                      claim_timeout_s: float = CLAIM_TIMEOUT_S) -> "TileStore":
    """Compute the pool's full pairwise-MI matrix into a tile store, one Ray task per tile.

    images: uint8 ``(n, H, W)``, ``(n, H, W, C)`` or ``(n, D)`` (validated like ``pairwise_mi``).
    store_url: folder (any fsspec URL) of the tile store; created, or continued when it holds a
        partial matrix of the same pool and settings (a mismatch is a ValueError). Existing tiles
        are checked (footer only) and bad ones recomputed (see the module docstring).
    bins, color: as in ``pairwise_mi``. tile_size: rows/columns per tile (default 1024; on GPUs
        4096 amortises the per-task cost better).
    max_in_flight: tasks submitted at once (default 2 × the cluster's CPUs, at least 4); with the
        pool put in the object store once, driver memory is the pool plus O(max_in_flight).
    num_gpus_per_task: > 0 runs each tile on the task's GPU with the torch kernel (workers are
        kept across tasks so CUDA starts once per worker). num_cpus_per_task: numba threads per task.
    dtype: ``"float64"`` or ``"float32"`` storage (see the module docstring).
    progress: a tqdm bar with pairs/s and ETA, tiles done in its postfix.
    check_data: also read every existing tile's data and verify its page checksums (reads the whole
        store; catches bytes corrupted inside a tile, which the footer check cannot see).
    claim_timeout_s: age after which another driver's tile claim is taken over (default 600 s).
    Calls ``ray.init()`` when Ray is not running. Returns the ``TileStore``, whose ``computed``
    lists the tiles this call computed (the rest were already there, or written by another
    driver) and whose ``stats`` count them (``tiles_repaired``: bad tiles found and recomputed).
    """
    import ray

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if isinstance(tile_size, bool) or not isinstance(tile_size, (int, np.integer)) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive integer, got {tile_size!r}")
    codes = to_codes(images, bins=bins, color=color, name="images")
    n = len(codes)
    fs, root = fsspec.core.url_to_fs(store_url)
    manifest = _open_or_create(fs, root, store_url, _manifest(images, codes, bins, color, tile_size, dtype))
    fingerprint = manifest["fingerprint"]

    init_ray()
    if num_gpus_per_task and ray.cluster_resources().get("GPU", 0) < num_gpus_per_task:
        raise ValueError(f"num_gpus_per_task={num_gpus_per_task} but the Ray cluster has "
                         f"{ray.cluster_resources().get('GPU', 0)} GPUs; use 0 for the CPU kernel")
    if max_in_flight is None:
        max_in_flight = max(4, 2 * int(ray.cluster_resources().get("CPU", 1)))

    def problem(i, j, data=False):
        return tile_problem(fs, _tile_path(root, i, j), fingerprint, i, j, tile_shape(n, tile_size, i, j),
                            dtype, data=data)

    grid = tile_grid(n, tile_size)
    present = _present_tiles(fs, root)
    bad = {t: p for t in grid if t in present and (p := problem(*t, data=check_data))}
    todo = [t for t in grid if t not in present or t in bad]
    if bad:
        log.warning(f"MI store {store_url}: repairing {len(bad)} bad tiles (e.g. tile {next(iter(bad))}: "
                    f"{next(iter(bad.values()))})")
    # GPU tasks default to a fresh worker per call (CUDA start-up per tile); max_calls=0 keeps them
    task = ray.remote(max_calls=0)(_tile_task) if num_gpus_per_task else ray.remote(_tile_task)
    task = task.options(num_cpus=num_cpus_per_task, num_gpus=num_gpus_per_task, max_retries=3)
    codes_ref, sums_ref = ray.put(codes), ray.put(entropy_sums(codes, bins))  # once, shared by all tasks
    claims = _Claims(fs, root, claim_timeout_s)

    from tqdm.auto import tqdm

    total = sum(tile_pairs(n, tile_size, i, j) for i, j in todo)
    bar = tqdm(total=total, unit="pair", unit_scale=True, disable=not progress, desc="MI tiles")
    computed, pending, start = [], [], time.perf_counter()
    queue, deferred, by_others = list(todo), [], []

    def tile_done(t, pairs):
        bar.update(pairs)
        bar.set_postfix(tiles=f"{len(grid) - len(todo) + len(computed) + len(by_others)}/{len(grid)}", refresh=False)

    try:
        while queue or pending or deferred:
            while queue and len(pending) < max_in_flight:  # top the window up to max_in_flight
                i, j = queue.pop(0)
                if not claims.take(i, j):
                    deferred.append((i, j))  # another live driver is on it
                    continue
                if (i, j) not in bad and problem(i, j) is None:  # another driver finished it meanwhile
                    claims.release(i, j)
                    by_others.append((i, j))
                    tile_done((i, j), tile_pairs(n, tile_size, i, j))
                    continue
                pending.append(task.remote(codes_ref, sums_ref, i, j, tile_size, bins, dtype, store_url,
                                           num_cpus_per_task, fingerprint))
            if pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=1.0 if deferred else None)
                for i, j, pairs in ray.get(ready):
                    claims.release(i, j)
                    computed.append((i, j))
                    tile_done((i, j), pairs)
            elif deferred:  # only tiles other drivers hold: wait for them, take over stale claims
                time.sleep(0.5)
            still = []
            for t in deferred:
                if problem(*t) is None:
                    by_others.append(t)
                    tile_done(t, tile_pairs(n, tile_size, *t))
                elif not queue and not pending and claims.take(*t):  # its claim went stale: ours now
                    claims.release(*t)
                    queue.append(t)
                else:
                    still.append(t)
            deferred = still
    finally:
        bar.close()
    store = TileStore(store_url)
    store.computed = sorted(computed)
    store.stats = {"tiles_computed": len(computed), "tiles_skipped": len(grid) - len(todo),
                   "tiles_repaired": len(bad), "tiles_by_other_drivers": len(by_others), "pairs": total,
                   "seconds": time.perf_counter() - start}
    if bad:
        log.warning(f"MI store {store_url}: repaired {len(bad)} tiles")
    return store


def _manifest(images, codes, bins, color, tile_size, dtype) -> dict:
    images = np.asarray(images)  # to_codes accepted it: a uint8 array or an array-like of one
    manifest = {
        "format": FORMAT, "version": VERSION, "n": len(codes), "image_shape": list(np.shape(images)[1:]),
        "pool_sha256": pool_fingerprint(images), "bins": int(bins), "color": color,
        "tile_size": int(tile_size), "dtype": dtype, "positions": int(codes.shape[1]),
        "layout": "tiles/tile-IIIII-JJJJJ.parquet, I <= J, column 'mi' = (rows, cols) block row-major",
    }
    manifest["fingerprint"] = store_fingerprint(manifest)
    return manifest


def compute_small_stores(items, *, bins: int = LEVELS, color: str = "flatten", tile_size: int = DEFAULT_TILE_SIZE,
                         dtype: str = "float64", device=None) -> list[int]:
    """Many small matrices in one call (one Ray task runs it for a bundle of small partitions, so
    their per-task cost is paid once): each ``(images, store_url)`` with at most ``tile_size``
    images gets its one-tile store, the same store ``compute_mi_matrix`` writes (and resumes,
    recomputing a bad tile as it does). Returns the pairs computed for each item (0 where its tile
    was already there and sound)."""
    computed, repaired = [], 0
    for images, url in items:
        codes = to_codes(images, bins=bins, color=color, name="images")
        if len(codes) > tile_size:
            raise ValueError(f"{url}: {len(codes)} images do not fit one tile of {tile_size}; use compute_mi_matrix")
        fs, root = fsspec.core.url_to_fs(url)
        manifest = _open_or_create(fs, root, url, _manifest(images, codes, bins, color, tile_size, dtype))
        path = _tile_path(root, 0, 0)
        problem = tile_problem(fs, path, manifest["fingerprint"], 0, 0, (len(codes), len(codes)), dtype)
        if problem is None:
            computed.append(0)
            continue
        repaired += problem != "missing"
        block = compute_tile(codes, entropy_sums(codes, bins), 0, 0, tile_size, bins, device)
        write_tile(fs, root, 0, 0, block, dtype, manifest["fingerprint"])
        computed.append(tile_pairs(len(codes), tile_size, 0, 0))
    if repaired:
        log.warning(f"compute_small_stores: repaired {repaired} bad tiles")
    return computed


def _read_manifest(fs, path, url) -> dict:
    try:
        with fs.open(path, "rb") as f:
            manifest = json.loads(f.read().decode())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
        return manifest
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{posixpath.join(url, 'manifest.json')} is unreadable ({type(e).__name__}: {e}); "
                         "it was damaged outside drmi (it is written atomically): delete it and rerun "
                         "compute_mi_matrix with the same pool and settings (its tiles are checked and kept)") from None


def _open_or_create(fs, root, url, manifest) -> dict:
    """The store's manifest, created atomically when absent; refuses a store of other settings."""
    path = posixpath.join(root, "manifest.json")
    fs.makedirs(posixpath.join(root, "tiles"), exist_ok=True)
    if not fs.exists(path):
        foreign = [t for t in sorted(_present_tiles(fs, root))
                   if tile_problem(fs, _tile_path(root, *t), manifest["fingerprint"], *t,
                                   tile_shape(manifest["n"], manifest["tile_size"], *t), manifest["dtype"])
                   == "from another store (other pool or settings)"]
        if foreign:
            raise ValueError(f"MI store {url} has no manifest.json but its tiles/ holds {len(foreign)} tiles of "
                             "another pool or settings; use a new store_url, or delete its tiles/ folder to recompute")
        tmp = posixpath.join(root, f".manifest-{uuid.uuid4().hex}.tmp")
        with fs.open(tmp, "wb") as f:
            f.write(json.dumps(manifest, indent=1).encode())
        if isinstance(fs, LocalFileSystem):
            try:  # link: an exclusive create of the complete file (a concurrent creator wins or loses whole)
                os.link(tmp, path)
            except FileExistsError:
                pass
            fs.rm(tmp)
        else:  # object stores: rename is atomic per object; the read-back below refuses a loser
            fs.mv(tmp, path)
    old = _read_manifest(fs, path, url)
    diff = [k for k in _FINGERPRINT_KEYS if old.get(k) != manifest[k]]
    if diff:
        what = ", ".join(f"{k}: store has {old.get(k)!r}, asked {manifest[k]!r}" if k != "pool_sha256"
                         else "pool: other images" for k in diff)
        raise ValueError(f"MI store {url} was written for another pool or other settings ({what}); "
                         "use a new store_url, or delete this one to recompute")
    return {**old, "fingerprint": store_fingerprint(old)}


def _present_tiles(fs, root) -> set[tuple[int, int]]:
    """(i, j) of every file named exactly as ``_tile_path`` names tiles; other files (a stray
    ``tile-00000-00000-copy.parquet``, ``tile-abc-def.parquet``) are not tiles and are ignored."""
    present = set()
    for p in fs.glob(posixpath.join(root, "tiles", "tile-*.parquet")):
        name = posixpath.basename(p)
        match = _TILE_NAME.fullmatch(name)
        if match:
            i, j = int(match[1]), int(match[2])
            if name == posixpath.basename(_tile_path(root, i, j)):  # not tile-0-0.parquet either
                present.add((i, j))
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
        self.manifest = _read_manifest(self._fs, path, url)
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise ValueError(f"{url}/manifest.json is not a {FORMAT} v{VERSION} manifest "
                             f"(format {self.manifest.get('format')!r}, version {self.manifest.get('version')!r})")
        self.n = self.manifest["n"]
        self.bins = self.manifest["bins"]
        self.color = self.manifest["color"]
        self.tile_size = self.manifest["tile_size"]
        self.dtype = np.dtype(self.manifest["dtype"])
        self.fingerprint = store_fingerprint(self.manifest)
        self.computed, self.stats = [], {}

    def missing_tiles(self) -> list[tuple[int, int]]:
        present = _present_tiles(self._fs, self._root)
        return [t for t in tile_grid(self.n, self.tile_size) if t not in present]

    @property
    def complete(self) -> bool:
        return not self.missing_tiles()

    def read_tile(self, i: int, j: int) -> np.ndarray:
        """Tile (i, j), i ≤ j, as stored: ``(rows, cols)`` of the store's dtype. Its footer metadata
        (fingerprint, coordinates, shape) and page checksums are checked: a bad tile is a ValueError."""
        shape = tile_shape(self.n, self.tile_size, i, j)
        path = _tile_path(self._root, i, j)
        problem = tile_problem(self._fs, path, self.fingerprint, i, j, shape, self.manifest["dtype"])
        if problem == "missing":
            raise FileNotFoundError(
                f"tile ({i}, {j}) of MI store {self.url} is missing: the matrix is incomplete "
                f"({len(self.missing_tiles())} tiles missing); rerun compute_mi_matrix(images, {self.url!r}) "
                "with the same pool and settings to finish it")
        try:
            if problem is None:
                with self._fs.open(path, "rb") as f:
                    return pq.read_table(f, page_checksum_verification=True).column("mi").to_numpy().reshape(shape)
        except Exception as e:  # a page corrupted in place, or the file changed under us
            problem = f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        raise ValueError(f"tile file {path} of MI store {self.url} is bad: {problem}; rerun "
                         f"compute_mi_matrix(images, {self.url!r}) with the same pool and settings to repair it "
                         "(check_data=True if its footer is sound)")

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
