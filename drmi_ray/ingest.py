"""Ingest: list an image pool on any fsspec URL and decode it with Ray Data, streaming.

    listing = list_pool("s3://bucket/imagenet/train")        # ImageFolder tree or Parquet shards
    pool = decode_pool(listing, size=64, mode="L")            # data.Pool; pool.skipped lists bad files

Forms of a pool URL (local path, ``s3://``, ``gs://``, any fsspec URL):
  ImageFolder   ``ROOT/CLASS/IMAGE``: the class folder is the image's label; files directly under
                ROOT are unlabeled (label -1).
  Parquet       one shard or a folder of ``*.parquet`` shards: column ``image`` (encoded bytes),
                optional ``label`` (int) and ``path`` (a name for each row, else ``SHARD#ROW``).

Decoding is a Ray Data pipeline: one row per *unit* (a batch of files, or one Parquet row group),
``map_batches`` decodes a unit and resizes every image to ``size x size`` (grey, or RGB), and the
driver streams the decoded blocks into a disk-backed array as they come. Ray Data's backpressure
keeps only a bounded number of blocks in the object store, so a pool larger than the object store
still decodes; the driver's array lives in a temporary file the OS pages as needed.

A file that is corrupt, truncated, not an image, above ``max_pixels`` (a decompression bomb),
degenerate (smaller than 8x8, blank or nearly constant: ``images.degenerate``) or of another shape
(without ``size``) is skipped and listed in ``Pool.skipped`` as ``{path, reason}``: never fatal,
never silent. Every PIL mode is scaled to 8 bits (``data.decode_image``: 16-bit, float too). The pool keeps the listing's order (sorted paths; shards, row groups,
rows), whatever order the blocks arrive in, so a rerun sees the same pool.
"""

from __future__ import annotations

import logging
import math
import posixpath
import tempfile
import time
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow.parquet as pq
import ray
import ray.data
from tqdm.auto import tqdm

from drmi_ray.data import IMAGE_SUFFIXES, MAX_PIXELS, Pool, decode_image
from drmi_ray.runtime import init_ray

THUMB = 8  # side of the grey thumbnails that k-means partitions on


@dataclass
class Listing:
    """What to decode. ``units``: one dict per decode unit, in pool order:
    ``{"start", "paths"}`` (files) or ``{"start", "shard", "row_group", "rows", "first_row"}`` (Parquet)."""

    url: str
    kind: str  # "folder" or "parquet"
    units: list[dict]
    n_files: int  # images listed (files, or Parquet rows)
    labels: np.ndarray | None = None  # folder: label of every file (-1: unlabeled); Parquet: read per row
    classes: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # shards that could not be opened


def list_pool(url: str, *, batch_files: int = 512, cpus: int = 1) -> Listing:
    """List an ImageFolder tree or Parquet shards and cut them into decode units.

    A unit is at most ``batch_files`` files (fewer when the pool is small, so every one of the
    cluster's ``cpus`` gets several units), or one Parquet row group.
    """
    fs, root = fsspec.core.url_to_fs(url)
    if not fs.exists(root):
        raise FileNotFoundError(f"pool {url!r} does not exist; give an ImageFolder tree or Parquet shards")
    if root.endswith(".parquet"):
        shards = [root]
    elif fs.isdir(root):
        shards = sorted(fs.glob(posixpath.join(root, "**", "*.parquet")))
    else:
        raise ValueError(f"pool {url!r} is a file; give an ImageFolder tree, a Parquet shard or a folder of shards")
    if shards:
        return _list_parquet(url, fs, shards)
    files = sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) or Parquet shards under {url!r}")
    base = root.rstrip("/") + "/"
    rel = [p[len(base):] if p.startswith(base) else posixpath.relpath(p, root) for p in files]
    classes = sorted({r.split("/")[0] for r in rel if "/" in r})
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[r.split("/")[0]] if "/" in r else -1 for r in rel], dtype=np.int64)
    prefix = fs.unstrip_protocol(root).rstrip("/") + "/"  # one call, not one per file
    urls = [prefix + r for r in rel]
    per_unit = max(16, min(batch_files, math.ceil(len(urls) / (4 * max(cpus, 1)))))
    units = [{"start": s, "paths": urls[s:s + per_unit]} for s in range(0, len(urls), per_unit)]
    return Listing(url, "folder", units, len(urls), labels, classes)


def _list_parquet(url, fs, shards) -> Listing:
    """One unit per row group; row counts from the shards' footers (an unreadable shard is skipped)."""
    units, skipped, start = [], [], 0
    for shard in shards:
        name = fs.unstrip_protocol(shard)
        try:
            with fs.open(shard, "rb") as f:
                meta = pq.ParquetFile(f).metadata
                if "image" not in meta.schema.names:
                    raise ValueError(f"no 'image' column (found {meta.schema.names}); write encoded image bytes there")
                first_row = 0  # of the row group within its shard: rows are named SHARD#ROW
                for g in range(meta.num_row_groups):
                    rows = meta.row_group(g).num_rows
                    units.append({"start": start, "shard": name, "row_group": g, "rows": rows, "first_row": first_row})
                    start, first_row = start + rows, first_row + rows
        except (OSError, ValueError) as err:
            skipped.append({"path": name, "reason": f"unreadable Parquet shard ({type(err).__name__}: {err})"})
    if not units:
        raise ValueError(f"no readable Parquet rows under {url!r}; first problem: {skipped[:1]}")
    return Listing(url, "parquet", units, start, None, [], skipped)


# ----------------------------------------------------------------------------------------------
# Decoding one unit: the plain function the Ray Data workers run


def thumbnails(images: np.ndarray) -> np.ndarray:
    """8x8 grey thumbnails (area means over an 8x8 grid of blocks), flattened: uint8 ``(n, 64)``.
    What k-means partitions on; RGB is turned grey with ITU-R 601 luma weights."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 4:
        x = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    n, h, w = x.shape
    rows, cols = np.linspace(0, h, THUMB + 1).astype(int), np.linspace(0, w, THUMB + 1).astype(int)
    if h < THUMB or w < THUMB:  # tiny images: nearest pixel
        return np.rint(x[:, rows[:-1]][:, :, cols[:-1]]).astype(np.uint8).reshape(n, -1)
    sums = np.add.reduceat(np.add.reduceat(x, rows[:-1], axis=1), cols[:-1], axis=2)
    area = np.outer(np.diff(rows), np.diff(cols)).astype(np.float32)
    return np.rint(sums / area).clip(0, 255).astype(np.uint8).reshape(n, -1)


def _unit_rows(unit: dict):
    """(path, encoded bytes or an exception, label) for every image of a unit."""
    if unit.get("paths") is not None:  # one batched read per unit (concurrent on object stores)
        urls = unit["paths"]
        fs, _ = fsspec.core.url_to_fs(urls[0])
        paths = [fs._strip_protocol(u) for u in urls]
        got = fs.cat(paths, on_error="return")
        for url, path in zip(urls, paths):
            data = got.get(path, FileNotFoundError(path))
            yield url, data, -1
        return

    shard, rows = unit["shard"], int(unit["rows"])
    try:
        fs, path = fsspec.core.url_to_fs(shard)
        with fs.open(path, "rb") as f:
            table = pq.ParquetFile(f).read_row_group(int(unit["row_group"]))
    except (OSError, ValueError) as err:  # the whole row group is lost: every row listed
        for r in range(rows):
            yield f"{shard}#{int(unit['first_row']) + r}", err, -1
        return
    names = table.column("path").to_pylist() if "path" in table.column_names else None
    labels = table.column("label").to_pylist() if "label" in table.column_names else [None] * rows
    for r, data in enumerate(table.column("image").to_pylist()):
        name = names[r] if names and names[r] else f"{shard}#{int(unit['first_row']) + r}"
        yield name, data if data is not None else ValueError("empty image cell"), -1 if labels[r] is None else int(labels[r])


def decode_unit(unit: dict, *, shape: tuple, size: int | None, mode: str, max_pixels: int) -> dict:
    """Decode one unit to uint8 images of ``shape`` (resized to ``size`` when given). Never raises
    on a bad file: its row gets ``reason`` (empty for a good image) and zero pixels."""
    rows = list(_unit_rows(unit))
    images = np.zeros((len(rows), *shape), dtype=np.uint8)
    reasons, labels = [], []
    for k, (path, data, label) in enumerate(rows):
        reason = ""
        try:
            if isinstance(data, Exception):
                raise ValueError(f"unreadable ({type(data).__name__}: {data})")
            img = decode_image(data, size=size, mode=mode, max_pixels=max_pixels)
            if img.shape != shape:
                raise ValueError(f"image is {img.shape}, the pool's images are {shape}; pass --size to resize all")
            images[k] = img
        except ValueError as err:
            reason = str(err)
        reasons.append(reason)
        labels.append(label)
    start = int(unit["start"])
    return {"index": np.arange(start, start + len(rows), dtype=np.int64), "image": images,
            "thumb": thumbnails(images), "path": np.array([p for p, _, _ in rows], dtype=str),
            "label": np.asarray(labels, dtype=np.int64), "reason": np.array(reasons, dtype=str)}


def _decode_batch(batch: dict, **kwargs) -> dict:
    """map_batches adapter: a batch of one unit row -> that unit's decoded rows."""
    (unit,) = [{k: _plain(v[0]) for k, v in batch.items()}]
    return decode_unit(unit, **kwargs)


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value.item() if isinstance(value, np.generic) else value


# ----------------------------------------------------------------------------------------------
# The pipeline


def probe_shape(listing: Listing, size: int | None, mode: str, max_pixels: int) -> tuple:
    """The pool's image shape: ``size`` when given, else the first decodable image's shape."""
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        return (size, size) if mode == "L" else (size, size, 3)
    for unit in listing.units[:4]:
        for _, data, _ in _unit_rows(unit):
            if isinstance(data, Exception):
                continue
            try:
                return decode_image(data, mode=mode, max_pixels=max_pixels).shape
            except ValueError:
                continue
    raise ValueError(f"no decodable image among the first files of {listing.url!r}; check the pool or pass --size")


def decode_pool(listing: Listing, *, size: int | None = None, mode: str = "L",
                max_pixels: int = MAX_PIXELS, progress: bool = True) -> Pool:
    """Decode every unit with Ray Data; returns a ``data.Pool`` (images in a disk-backed array,
    ``thumbs`` set, bad files in ``skipped``). Starts Ray if it is not running."""
    if mode not in ("L", "RGB"):
        raise ValueError(f"mode must be 'L' (grey) or 'RGB', got {mode!r}")
    shape = probe_shape(listing, size, mode, max_pixels)
    init_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours below counts images and skips
    # one map operator: nothing to reserve resources against; with the reservation on, 2 CPUs ran
    # 0.7x as many decodes (benchmarks/decode_throughput.py)
    reserve, ctx.op_resource_reservation_enabled = ctx.op_resource_reservation_enabled, False
    data_log = logging.getLogger("ray.data")
    level, data_log.level = data_log.level, logging.ERROR  # not its per-run plan and "bars disabled" lines

    n = listing.n_files
    pixels = np.memmap(tempfile.TemporaryFile(prefix="drmi-pool-"), dtype=np.uint8, mode="w+", shape=(n, *shape))
    thumbs = np.zeros((n, THUMB * THUMB), dtype=np.uint8)
    labels = listing.labels.copy() if listing.labels is not None else np.full(n, -1, dtype=np.int64)
    paths = np.empty(n, dtype=object)
    reasons = np.full(n, "unreadable (never decoded)", dtype=object)

    units = ray.data.from_items(listing.units, override_num_blocks=len(listing.units))
    decoded = units.map_batches(_decode_batch, batch_size=1, batch_format="numpy",
                                fn_kwargs={"shape": shape, "size": size, "mode": mode, "max_pixels": max_pixels})
    start, n_bad = time.perf_counter(), 0
    try:
        with tqdm(total=n, unit="image", desc="decode", disable=not progress) as bar:
            for batch in decoded.iter_batches(batch_size=None, batch_format="numpy"):
                rows = slice(batch["index"][0], batch["index"][-1] + 1)  # a unit's rows are consecutive
                pixels[rows], thumbs[rows] = batch["image"], batch["thumb"]  # bad rows: zeros, dropped below
                paths[rows], reasons[rows] = batch["path"], batch["reason"]
                if listing.labels is None:
                    labels[rows] = batch["label"]
                n_bad += int((batch["reason"] != "").sum())
                bar.update(len(batch["index"]))
                bar.set_postfix(skipped=n_bad, refresh=False)
    finally:
        data_log.setLevel(level)
        ctx.op_resource_reservation_enabled = reserve
    seconds = time.perf_counter() - start

    keep = np.flatnonzero(reasons == "")
    skipped = listing.skipped + [{"path": paths[i], "reason": reasons[i]} for i in np.flatnonzero(reasons != "")]
    other_size = [s for s in skipped if s["reason"].startswith("image is (")]
    if other_size:
        raise ValueError(f"{len(other_size)} image(s) differ in size from the pool's first image {shape} "
                         f"(e.g. {other_size[0]['path']}); pass --size S to resize them all to S x S")
    if not len(keep):
        raise ValueError(f"none of the {n} images in {listing.url!r} could be decoded; first: {skipped[:1]}")
    for lo in range(0, len(keep), 4096):  # compact in place: keep[j] >= j, so no row is read after it is overwritten
        rows = keep[lo:lo + 4096]
        pixels[lo:lo + len(rows)] = pixels[rows]
    pool = Pool(pixels[: len(keep)], labels[keep], paths[keep].tolist(), listing.classes, skipped)
    pool.thumbs = thumbs[keep]
    pool.stats = {"files": n, "decoded": len(keep), "skipped": len(skipped), "seconds": seconds,
                  "images_per_s": n / max(seconds, 1e-9)}
    return pool


def read_pool(url: str, *, size: int | None = None, mode: str = "L", max_pixels: int = MAX_PIXELS,
              batch_files: int = 512, progress: bool = True) -> Pool:
    """``list_pool`` + ``decode_pool`` in one call."""
    init_ray()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return decode_pool(list_pool(url, batch_files=batch_files, cpus=cpus), size=size, mode=mode,
                       max_pixels=max_pixels, progress=progress)
