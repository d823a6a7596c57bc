"""The tile store: the on-disk format of an N×N MI matrix cut into upper-triangle tiles, and its reader.

``matrix.py`` computes the tiles (one Ray task each) and writes them through this module.

Layout (any fsspec URL: a local path, ``s3://`` / ``gs://`` with the s3/gcs extras)::

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
its pages carry CRC checksums. A rerun of ``matrix.compute_mi_matrix`` reads every existing tile's
footer (not its data) and treats a tile that is missing, unreadable, truncated, of the wrong shape
or of another fingerprint as not done: it recomputes it and reports how many it repaired
(``stats["tiles_repaired"]``). ``check_data=True`` also reads every tile's data to catch bytes
corrupted inside a page. Reads check footer and checksums and name the file on any failure. Tiles
and the manifest are written under a temporary name and renamed; a manifest is never created over
``tiles/`` holding tiles of another fingerprint.

Concurrent drivers share the work through per-tile claim files ``tiles/.claim-IIIII-JJJJJ``
(created exclusively; JSON with owner, host, pid, time). A driver claims a tile just before it
submits it and removes the claim once the tile is written; it skips tiles claimed by another live
driver and, at the end, waits for them, taking over a claim that is older than ``claim_timeout_s``
or whose driver (same host) is dead. Two drivers may at worst compute a tile twice (a taken-over
claim); tiles are deterministic and renamed into place, so never a wrong tile.
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

FORMAT = "drmi-mi-tiles"
VERSION = 1
DTYPES = ("float64", "float32")
# settings that must match for a rerun to continue a store
_FINGERPRINT_KEYS = ("format", "version", "n", "image_shape", "pool_sha256", "bins", "color", "tile_size", "dtype")
CLAIM_TIMEOUT_S = 600.0  # a claim older than this is taken over (a live driver's tile should be done by then)
_TILE_NAME = re.compile(r"tile-(\d+)-(\d+)\.parquet")  # tile_path's names; any other file is not a tile
_META = b"drmi.tile"  # Parquet key-value metadata key of a tile: JSON {fingerprint, i, j, shape}


def store_fingerprint(manifest: dict) -> str:
    """SHA-256 (hex) of the manifest's fingerprint keys: pool and settings."""
    return hashlib.sha256(json.dumps([manifest.get(k) for k in _FINGERPRINT_KEYS]).encode()).hexdigest()


def pool_fingerprint(images: np.ndarray) -> str:
    """SHA-256 (hex) of the pool's shape, dtype and bytes."""
    h = hashlib.sha256(f"{images.shape}|{images.dtype}|".encode())
    h.update(memoryview(np.ascontiguousarray(images)).cast("B"))
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Tiles: geometry, writing, checking


def tile_grid(n: int, tile_size: int) -> list[tuple[int, int]]:
    """The upper-triangle tiles (I, J), I ≤ J, of an n×n matrix, row-major."""
    t = -(-n // tile_size)
    return [(i, j) for i in range(t) for j in range(i, t)]


def tile_shape(n: int, tile_size: int, i: int, j: int) -> tuple[int, int]:
    """(rows, cols) of tile (i, j)."""
    return min(n, (i + 1) * tile_size) - i * tile_size, min(n, (j + 1) * tile_size) - j * tile_size


def tile_path(root: str, i: int, j: int) -> str:
    """Where tile (i, j) of the store at ``root`` lives."""
    return posixpath.join(root, "tiles", f"tile-{i:05d}-{j:05d}.parquet")


def present_tiles(fs, root) -> set[tuple[int, int]]:
    """(i, j) of every file named exactly as ``tile_path`` names tiles; other files (a stray
    ``tile-00000-00000-copy.parquet``, ``tile-abc-def.parquet``) are not tiles and are ignored."""
    present = set()
    for p in fs.glob(posixpath.join(root, "tiles", "tile-*.parquet")):
        name = posixpath.basename(p)
        match = _TILE_NAME.fullmatch(name)
        if match:
            i, j = int(match[1]), int(match[2])
            if name == posixpath.basename(tile_path(root, i, j)):  # not tile-0-0.parquet either
                present.add((i, j))
    return present


def write_tile(fs, root: str, i: int, j: int, block: np.ndarray, dtype: str, fingerprint: str = "") -> None:
    """Write a tile under a temporary name, then rename: a tile file that exists was complete when
    written. Its metadata records ``fingerprint``, (i, j) and the shape; its pages carry checksums."""
    final = tile_path(root, i, j)
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


# ----------------------------------------------------------------------------------------------
# Claims: concurrent drivers on one store share the work


class TileClaims:
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
# The manifest


def new_manifest(images, codes, bins, color, tile_size, dtype) -> dict:
    """The manifest of a store of ``images`` (their ``codes``) with these settings, fingerprint included."""
    images = np.asarray(images)  # to_codes accepted it: a uint8 array or an array-like of one
    manifest = {
        "format": FORMAT, "version": VERSION, "n": len(codes), "image_shape": list(np.shape(images)[1:]),
        "pool_sha256": pool_fingerprint(images), "bins": int(bins), "color": color,
        "tile_size": int(tile_size), "dtype": dtype, "positions": int(codes.shape[1]),
        "layout": "tiles/tile-IIIII-JJJJJ.parquet, I <= J, column 'mi' = (rows, cols) block row-major",
    }
    manifest["fingerprint"] = store_fingerprint(manifest)
    return manifest


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


def open_or_create(fs, root, url, manifest) -> dict:
    """The store's manifest, created atomically when absent; refuses a store of other settings."""
    path = posixpath.join(root, "manifest.json")
    fs.makedirs(posixpath.join(root, "tiles"), exist_ok=True)
    if not fs.exists(path):
        foreign = [t for t in sorted(present_tiles(fs, root))
                   if tile_problem(fs, tile_path(root, *t), manifest["fingerprint"], *t,
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
        present = present_tiles(self._fs, self._root)
        return [t for t in tile_grid(self.n, self.tile_size) if t not in present]

    @property
    def complete(self) -> bool:
        return not self.missing_tiles()

    def read_tile(self, i: int, j: int) -> np.ndarray:
        """Tile (i, j), i ≤ j, as stored: ``(rows, cols)`` of the store's dtype. Its footer metadata
        (fingerprint, coordinates, shape) and page checksums are checked: a bad tile is a ValueError."""
        shape = tile_shape(self.n, self.tile_size, i, j)
        path = tile_path(self._root, i, j)
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
