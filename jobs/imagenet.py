"""Reduce an ImageNet-sized pool with DRMI on a Ray cluster (and, optionally, attack with it).

    python jobs/imagenet.py --data URL --budget K --out URL [--size 64] [--rgb]
                            [--partition label|kmeans|none] [--clusters C]
                            [--target CHECKPOINT [--substitute resnet18] [--test URL]]
    ray job submit --working-dir . -- python jobs/imagenet.py --data s3://... --budget 10000 --out s3://...

Stages (each prints progress; a rerun with the same --out resumes the MI stage tile by tile):

1. list   an ImageFolder tree (``ROOT/CLASS/IMAGE``; files directly under ROOT are unlabeled) or
          Parquet shards (column ``image`` = encoded bytes, optional ``label``, ``path``) on any
          fsspec URL (local path, ``s3://``, ``gs://``).
2. decode Ray tasks, one per batch of files (or per Parquet shard), decode and resize to
          ``--size`` (grey, or RGB with ``--rgb``). An unreadable or corrupt file is skipped and
          listed with the reason in ``selection.json`` ("skipped"): never fatal, never silent.
          Decoded batches stay in the object store; the driver fetches one partition at a time.
3. partition  ``label`` (the class folders / label column; the default), ``kmeans`` (k-means on
          8x8 thumbnails, for unlabeled pools; ``--clusters`` or one cluster per ~1,300 images) or
          ``none`` (one global matrix). Budgets are proportional to partition size (largest
          remainder, summing to K).
4. MI     per partition, ``compute_mi_matrix`` into its own tile store ``{out}/mi/PART`` (manifest
          fingerprints the partition's pixels and the settings); partitions run concurrently
          (``--parallel-partitions``), each with a bounded number of tiles in flight; tiles ask for
          a GPU with ``--gpus-per-tile`` (the autoscaler in cluster.yaml adds GPU nodes for them).
5. select per partition (``select`` on the partition's dense matrix; ``select_distributed`` for a
          partition above ``--dense-max`` images). ``{out}/selection.json`` gets ``selected`` (the
          K chosen image paths), ``skipped`` ([{path, reason}]), the per-partition budgets,
          objectives and tile-store manifests.
6. optional, with ``--target CHECKPOINT``: query the BlackBoxTarget actor with the selection
          (budget = K, audit log in the run folder), fit a substitute with Ray Train (torchvision
          ResNet18 / ResNet152 / Inception-v3, random init: no weights are downloaded), evaluate it
          and attack the target with PGD; ``results.json`` / ``report.md`` in the run folder.

Run directly it starts a local Ray; under ``ray job submit`` (RAY_ADDRESS set) ``ray.init()``
attaches to the cluster. The plain functions below are what tests/test_imagenet_job.py and
jobs/cifar10.py call.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np
import ray

if __name__ != "__main__":  # imported (tests, jobs/cifar10.py): workers cannot import jobs/ by name
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])

THUMB = 8  # side of the grey thumbnails that k-means partitions on
IMAGES_PER_CLUSTER = 1300  # default k-means granularity: about one ImageNet class per cluster
LOG = "[imagenet]"


def log(msg: str) -> None:
    print(f"{LOG} {msg}", flush=True)


# --------------------------------------------------------------------------- 1. list

@dataclass
class Listing:
    """What to decode: one unit per Ray task (a batch of files, or one Parquet shard)."""

    kind: str  # "folder" or "parquet"
    units: list[list[str]]  # file URLs per unit (folder), or [shard URL] per unit (parquet)
    labels: list[np.ndarray]  # per unit: labels of its files (folder); empty for parquet (read in the task)
    classes: list[str]
    n_files: int


def list_pool(url: str, *, batch_files: int = 256) -> Listing:
    """List an ImageFolder tree or Parquet shards; cut folder files into batches within a class."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    if not fs.exists(root):
        raise FileNotFoundError(f"--data {url!r} does not exist")
    if root.endswith(".parquet"):
        shards = [root]
    elif fs.isdir(root):
        shards = sorted(fs.glob(posixpath.join(root, "**", "*.parquet")))
    else:
        raise ValueError(f"--data {url!r} is a file; give an ImageFolder tree, a Parquet shard or a folder of shards")
    if shards:
        urls = [fs.unstrip_protocol(s) for s in shards]
        return Listing("parquet", [[u] for u in urls], [], [], len(urls))
    from drmi_ray.data import list_image_folder

    files, labels, classes = list_image_folder(url)
    units, unit_labels = [], []
    start = 0
    while start < len(files):  # batches never cross a class boundary (files are sorted by class)
        stop = min(start + batch_files, len(files))
        same = np.flatnonzero(labels[start:stop] != labels[start])
        if len(same):
            stop = start + int(same[0])
        units.append(files[start:stop])
        unit_labels.append(labels[start:stop])
        start = stop
    return Listing("folder", units, unit_labels, classes, len(files))


# --------------------------------------------------------------------------- 2. decode

def _thumbs(images: np.ndarray) -> np.ndarray:
    """8x8 grey thumbnails, flattened: uint8 (n, 64)."""
    from PIL import Image

    out = np.empty((len(images), THUMB * THUMB), dtype=np.uint8)
    for i, img in enumerate(images):
        pil = Image.fromarray(img).convert("L").resize((THUMB, THUMB), Image.BILINEAR)
        out[i] = np.asarray(pil, dtype=np.uint8).ravel()
    return out


def decode_unit(kind: str, unit: list[str], labels, size: int, mode: str) -> tuple[dict, np.ndarray]:
    """Decode one unit. Returns (meta, images): meta = {paths, labels, skipped, thumbs} of the
    images that decoded; ``images`` uint8 (m, size, size[, 3]). Never raises on a bad file."""
    from drmi_ray.data import decode_files, decode_image

    shape = (size, size) if mode == "L" else (size, size, 3)
    if kind == "folder":
        arrays, skipped = decode_files(unit, size=size, mode=mode)
        keep = [i for i, a in enumerate(arrays) if a is not None]
        paths = [unit[i] for i in keep]
        kept_labels = np.asarray(labels, dtype=np.int64)[keep]
        arrays = [arrays[i] for i in keep]
    else:
        import fsspec
        import pyarrow.parquet as pq

        (shard,) = unit
        arrays, paths, kept_labels, skipped = [], [], [], []
        try:
            fs, path = fsspec.core.url_to_fs(shard)
            table = pq.read_table(path, filesystem=fs)
            if "image" not in table.column_names:
                raise ValueError(f"no 'image' column (found {table.column_names})")
        except (OSError, ValueError) as err:  # an unreadable shard is skipped whole, with its reason
            return {"paths": [], "labels": np.zeros(0, np.int64), "skipped": [{"path": shard, "reason": str(err)}],
                    "thumbs": np.zeros((0, THUMB * THUMB), np.uint8)}, np.zeros((0, *shape), np.uint8)
        names = table.column("path").to_pylist() if "path" in table.column_names else None
        shard_labels = table.column("label").to_pylist() if "label" in table.column_names else None
        for row, data in enumerate(table.column("image").to_pylist()):
            name = names[row] if names else f"{shard}#{row}"
            try:
                if data is None:
                    raise ValueError("empty image cell")
                arrays.append(decode_image(data, size=size, mode=mode))
            except ValueError as err:
                skipped.append({"path": name, "reason": str(err)})
                continue
            paths.append(name)
            label = None if shard_labels is None else shard_labels[row]
            kept_labels.append(-1 if label is None else int(label))
        kept_labels = np.asarray(kept_labels, dtype=np.int64)
    images = np.stack(arrays) if arrays else np.zeros((0, *shape), np.uint8)
    meta = {"paths": paths, "labels": kept_labels, "skipped": skipped, "thumbs": _thumbs(images)}
    return meta, images


decode_task = ray.remote(num_returns=2, max_retries=3)(decode_unit)


@dataclass
class DecodedPool:
    """The decoded pool: metadata in the driver, pixels in the object store (one ref per unit)."""

    paths: list[str]
    labels: np.ndarray  # int64 (N,), -1 unknown
    thumbs: np.ndarray  # uint8 (N, 64)
    skipped: list[dict]
    classes: list[str]
    unit_refs: list  # ObjectRef of each unit's images
    unit_of: np.ndarray  # (N,) unit index of each image
    row_of: np.ndarray  # (N,) row within its unit
    n_files: int
    _arrays: np.ndarray | None = None  # set when the pixels are already in memory (cifar10)

    def __len__(self) -> int:
        return len(self.paths)

    def images(self, indices) -> np.ndarray:
        """The pixels of ``indices`` (fetches only the units that hold them)."""
        indices = np.asarray(indices, dtype=np.int64)
        if self._arrays is not None:
            return self._arrays[indices]
        units = np.unique(self.unit_of[indices])
        fetched = dict(zip(units.tolist(), ray.get([self.unit_refs[u] for u in units])))
        return np.stack([fetched[u][r] for u, r in zip(self.unit_of[indices].tolist(), self.row_of[indices].tolist())])

    @classmethod
    def from_arrays(cls, images, labels, paths, classes=()) -> "DecodedPool":
        n = len(images)
        return cls(list(paths), np.asarray(labels, np.int64), _thumbs(images), [], list(classes), [],
                   np.zeros(n, np.int64), np.arange(n), n, images)


def decode_pool(listing: Listing, *, size: int, mode: str, max_in_flight: int = 64) -> DecodedPool:
    """Decode every unit in Ray tasks, a bounded window in flight; progress every few seconds."""
    n_units = len(listing.units)
    metas: list[dict | None] = [None] * n_units
    refs: list = [None] * n_units
    pending: dict = {}
    next_unit, done, t0, last = 0, 0, time.perf_counter(), 0.0
    n_images = n_skipped = 0
    while done < n_units:
        while next_unit < n_units and len(pending) < max_in_flight:
            labels = listing.labels[next_unit] if listing.labels else None
            meta_ref, images_ref = decode_task.remote(listing.kind, listing.units[next_unit], labels, size, mode)
            pending[meta_ref] = next_unit
            refs[next_unit] = images_ref
            next_unit += 1
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=5.0)
        for ref in ready:
            u = pending.pop(ref)
            metas[u] = ray.get(ref)
            n_images += len(metas[u]["paths"])
            n_skipped += len(metas[u]["skipped"])
            done += 1
        now = time.perf_counter()
        if now - last > 5 or done == n_units:
            rate = n_images / max(now - t0, 1e-9)
            eta = (n_units - done) * (now - t0) / max(done, 1)
            log(f"decode: {done}/{n_units} units, {n_images} images, {n_skipped} skipped, "
                f"{rate:.0f} images/s, ETA {eta:.0f} s")
            last = now
    paths, labels, thumbs, skipped, unit_of, row_of = [], [], [], [], [], []
    for u, meta in enumerate(metas):
        m = len(meta["paths"])
        paths += meta["paths"]
        labels.append(meta["labels"])
        thumbs.append(meta["thumbs"])
        skipped += meta["skipped"]
        unit_of.append(np.full(m, u, np.int64))
        row_of.append(np.arange(m, dtype=np.int64))
    if not paths:
        raise ValueError(f"none of the {listing.n_files} files could be decoded; first: {skipped[:1]}")
    for s in skipped[:20]:
        log(f"skipped {s['path']}: {s['reason']}")
    if len(skipped) > 20:
        log(f"... and {len(skipped) - 20} more skipped files (all listed in selection.json)")
    return DecodedPool(paths, np.concatenate(labels), np.concatenate(thumbs), skipped, listing.classes,
                       refs, np.concatenate(unit_of), np.concatenate(row_of), listing.n_files)


# --------------------------------------------------------------------------- 3. partition

@dataclass
class Partition:
    key: int  # the partition's label in the keys array handed to select_partitioned
    name: str  # folder-safe name: its tile store is {out}/mi/NAME
    members: np.ndarray  # pool indices, ascending
    budget: int = 0


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:60] or "_"


def partition_pool(pool: DecodedPool, how: str, *, clusters: int | None = None,
                   seed: int = 0) -> tuple[np.ndarray, list[Partition]]:
    """Partition keys (int64 (N,)) and the partitions: by label, by k-means cluster of the 8x8
    thumbnails (``optimize.kmeans_partitions``), or one global partition."""
    from drmi_ray.optimize import kmeans_partitions

    n = len(pool)
    if how == "none":
        keys = np.zeros(n, dtype=np.int64)
        names = {0: "all"}
    elif how == "label":
        if (pool.labels < 0).all():
            raise ValueError("--partition label: the pool has no labels (no class folders / no 'label' column); "
                             "use --partition kmeans or none")
        keys = pool.labels.copy()
        names = {k: (pool.classes[k] if 0 <= k < len(pool.classes) else f"label{k}") for k in np.unique(keys)}
        names[-1] = "unlabeled"  # files directly under the root of an otherwise labelled tree
    elif how == "kmeans":
        k = min(clusters or max(1, round(n / IMAGES_PER_CLUSTER)), n)
        keys = kmeans_partitions(pool.thumbs.reshape(n, THUMB, THUMB), k, seed=seed)
        names = {c: f"cluster{c}" for c in np.unique(keys)}
    else:
        raise ValueError(f"--partition must be label, kmeans or none, got {how!r}")
    parts = [Partition(int(key), f"{i:04d}-{_safe(names[int(key)])}", np.flatnonzero(keys == key))
             for i, key in enumerate(np.unique(keys))]
    return keys, parts


@dataclass
class Settings:
    bins: int = 256
    color: str = "flatten"
    tile_size: int = 1300
    max_in_flight: int = 16
    gpus_per_tile: float = 0.0
    store_dtype: str = "float64"
    seed: int = 0
    dense_max: int = 20000
    num_actors: int = 4
    parallel_partitions: int = 4


def partition_store(pool: DecodedPool, part: Partition, out: str, s: Settings) -> str:
    """Compute one partition's MI matrix into its own tile store (resumes a partial one)."""
    from drmi_ray.matrix import compute_mi_matrix

    url = f"{out}/mi/{part.name}"
    compute_mi_matrix(pool.images(part.members), url, bins=s.bins, color=s.color, tile_size=s.tile_size,
                      max_in_flight=s.max_in_flight, num_gpus_per_task=s.gpus_per_tile, dtype=s.store_dtype,
                      progress=s.parallel_partitions <= 1)
    return url


def compute_stores(pool: DecodedPool, parts: list[Partition], out: str, s: Settings) -> dict[int, str]:
    """Tile stores of every partition that selection reads (budget >= 1, size >= 2), several
    partitions at once so small ones still fill the cluster; progress per partition."""
    need = [p for p in parts if p.budget >= 1 and len(p.members) >= 2]
    pairs = sum(len(p.members) * (len(p.members) - 1) // 2 for p in need)
    log(f"MI: {len(need)} partition(s) to compute, {pairs:,} pairs, tiles of {s.tile_size}, "
        f"{s.parallel_partitions} partition(s) at a time")
    stores, done, t0 = {}, 0, time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, s.parallel_partitions)) as ex:
        futures = {ex.submit(partition_store, pool, p, out, s): p for p in need}
        for fut in as_completed(futures):
            p = futures[fut]
            stores[p.key] = fut.result()
            done += len(p.members) * (len(p.members) - 1) // 2
            el = time.perf_counter() - t0
            log(f"MI: {len(stores)}/{len(need)} partitions ({p.name}, {len(p.members)} images), "
                f"{done:,}/{pairs:,} pairs, {done / max(el, 1e-9):,.0f} pairs/s, "
                f"ETA {(pairs - done) * el / max(done, 1):.0f} s")
    return stores


def select_all(keys: np.ndarray, parts: list[Partition], stores: dict[int, str], budget: int,
               s: Settings) -> tuple[np.ndarray, float]:
    """Per-partition selection: ``select_partitioned`` on each partition's dense matrix (read from
    its tile store); a partition above ``dense_max`` images is searched by ``select_distributed``'s
    actors reading its tile store (the matrix never in one process)."""
    from drmi_ray.matrix import TileStore
    from drmi_ray.optimize import select_distributed, select_partitioned

    def partition_mi(indices):
        return TileStore(stores[int(keys[indices[0]])]).to_dense()

    big = [p for p in parts if len(p.members) > s.dense_max and 2 <= p.budget < len(p.members)]
    small = np.ones(len(keys), dtype=bool)
    chosen, objective = [], 0.0
    for p in big:
        log(f"select: {p.name} has {len(p.members):,} images > --dense-max; {s.num_actors} optimizer actors")
        sel = select_distributed(stores[p.key], p.budget, num_actors=s.num_actors, seed=s.seed)
        chosen.append(p.members[sel.indices])
        objective += sel.objective
        small[p.members] = False
    if small.any():
        rest = np.flatnonzero(small)
        k_rest = budget - sum(p.budget for p in big)
        sel = select_partitioned(keys[rest], k_rest, lambda idx: partition_mi(rest[idx]), seed=s.seed)
        chosen.append(rest[sel.indices])
        objective += sel.objective
    return np.sort(np.concatenate(chosen)), float(objective)


def reduce_pool(pool: DecodedPool, budget: int, out: str, *, partition: str = "label",
                clusters: int | None = None, settings: Settings | None = None) -> dict:
    """Partition, compute MI per partition, select per partition; returns the selection dict."""
    from drmi_ray.optimize import partition_budgets

    s = settings or Settings()
    if budget < 1:
        raise ValueError(f"--budget must be at least 1, got {budget}")
    if budget > len(pool):
        raise ValueError(f"--budget {budget} is larger than the pool ({len(pool)} decodable images, "
                         f"{len(pool.skipped)} skipped)")
    t0 = time.perf_counter()
    keys, parts = partition_pool(pool, partition, clusters=clusters, seed=s.seed)
    budgets = partition_budgets(keys, budget)  # proportional to size, largest remainder, sum = K
    for p in parts:
        p.budget = budgets[p.key]
    sizes = [len(p.members) for p in parts]
    log(f"partition: {partition}, {len(parts)} partition(s) of {min(sizes)}..{max(sizes)} images; "
        f"budgets {min(p.budget for p in parts)}..{max(p.budget for p in parts)} (sum {budget})")
    t_mi = time.perf_counter()
    stores = compute_stores(pool, parts, out, s)
    t_sel = time.perf_counter()
    selected_idx, objective = select_all(keys, parts, stores, budget, s)
    log(f"select: {len(selected_idx)} images, objective {objective:.4f}, {time.perf_counter() - t_sel:.1f} s")
    if len(selected_idx) != budget:
        raise RuntimeError(f"selection has {len(selected_idx)} images, expected {budget}")
    inside = np.zeros(len(pool), dtype=bool)
    inside[selected_idx] = True
    rows = [{"name": p.name, "size": len(p.members), "budget": p.budget, "selected": int(inside[p.members].sum()),
             "store": stores.get(p.key), "manifest": f"{stores[p.key]}/manifest.json" if p.key in stores else None}
            for p in parts]
    return {
        "budget": int(budget),
        "partition": partition,
        "n_files": int(pool.n_files),
        "n_images": int(len(pool)),
        "selected": [pool.paths[i] for i in selected_idx],
        "indices": [int(i) for i in selected_idx],
        "skipped": pool.skipped,
        "objective": objective,
        "partitions": rows,
        "manifests": [r["manifest"] for r in rows if r["manifest"]],
        "seconds": {"mi": round(t_sel - t_mi, 3), "select": round(time.perf_counter() - t_sel, 3),
                    "total": round(time.perf_counter() - t0, 3)},
    }


# --------------------------------------------------------------------------- 6. optional attack

def query_target(target, images: np.ndarray, *, batch: int = 256, retries: int = 3,
                 client: str = "drmi") -> tuple[np.ndarray, list[int]]:
    """Query the target actor batch by batch; returns (labels, -1 where no answer came; starts of
    batches whose answer was lost).

    Never spends a query twice: before each batch the target's spent count is read; if the
    replica dies mid-call, the count read after its restart says whether the batch was counted
    (then its answer is lost and it is not sent again) or not (then it is sent again).
    """
    from ray.exceptions import RayActorError

    from drmi_ray.target import QueryBudgetExceeded

    labels = np.full(len(images), -1, dtype=np.int64)
    lost = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        for attempt in range(retries + 1):
            before = _queries_used(target)
            try:
                answer = np.asarray(ray.get(target.query.remote(chunk, client=client)))
                labels[start:start + len(chunk)] = answer if answer.ndim == 1 else answer.argmax(1)
                break
            except RayActorError as err:
                after = _queries_used(target)  # waits for the restarted replica
                if after >= before + len(chunk):
                    log(f"query: target replica died after counting images {start}..{start + len(chunk) - 1}; "
                        f"their answers are lost and they are not sent again ({err.__class__.__name__})")
                    lost.append(start)
                    break
                log(f"query: target replica died before counting batch {start}; sending it again")
            except QueryBudgetExceeded as err:
                log(f"query: {err}")
                lost.append(start)
                break
        log(f"query: {min(start + batch, len(images))}/{len(images)} images sent")
    return labels, lost


def _queries_used(target, timeout: float = 120.0) -> int:
    """The target's spent count; retried while a crashed replica restarts."""
    from ray.exceptions import RayActorError

    deadline = time.time() + timeout
    while True:
        try:
            return int(ray.get(target.queries_used.remote()))
        except RayActorError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def attack_stage(pool: DecodedPool, result: dict, out: str, args, *, test=None) -> list[dict]:
    """Query the target with the selection, fit a substitute (Ray Train), evaluate and attack.

    ``test``: the referee's held-out (images, labels) at the target's geometry; default: ``--test``
    (a labelled ImageFolder/Parquet URL), else up to ``--test-size`` unselected labelled pool images.
    """
    from drmi_ray import report
    from drmi_ray.attack import AttackConfig, transfer_rate
    from drmi_ray.models import TrainConfig, predict
    from drmi_ray.substitute import evaluate, fit_substitutes
    from drmi_ray.target import BlackBoxTarget, load_checkpoint, load_classifier

    timings = {}
    ckpt = load_checkpoint(args.target)
    size, channels = int(ckpt["image_size"]), int(ckpt["in_channels"])
    mode = "L" if channels == 1 else "RGB"
    want = (size, size) if channels == 1 else (size, size, channels)
    sel = np.asarray(result["indices"], dtype=np.int64)

    def pixels(indices):  # pool images at the target's geometry (decoded again if --size differs)
        images = pool.images(indices)
        if images.shape[1:] == want:
            return images
        if pool._arrays is not None:  # an in-memory pool (cifar10) has no files to decode again
            raise ValueError(f"--target takes images of shape {want}, the pool's are {images.shape[1:]}")
        return redecode([pool.paths[i] for i in indices], size, mode)

    images = pixels(sel)
    if test is None and args.test:
        test_pool = decode_pool(list_pool(args.test, batch_files=args.batch_files), size=size, mode=mode)
        test = (test_pool.images(np.arange(len(test_pool))), test_pool.labels)
    elif test is None:
        rest = np.setdiff1d(np.flatnonzero(pool.labels >= 0), sel)
        rest = np.sort(np.random.default_rng(args.seed).permutation(rest)[: args.test_size])
        if len(rest) == 0:
            raise ValueError("--target: no labelled images left for the referee; pass --test URL")
        test = (pixels(rest), pool.labels[rest])
    test_images, test_labels = test
    keep = test_labels >= 0
    test_images, test_labels = test_images[keep], test_labels[keep]

    answers_url = f"{out}/answers.json"
    saved = _read_json(answers_url)
    if saved and saved.get("selected") == result["selected"] and saved.get("target") == args.target:
        # a rerun: the target already answered (and counted) these queries; never ask twice
        answers, queries = np.asarray(saved["labels"], dtype=np.int64), int(saved["queries"])
        log(f"query: reusing the {int((answers >= 0).sum())} answers in {answers_url} (no new queries)")
    else:
        local_out = out if _is_local(out) else tempfile.mkdtemp(prefix="drmi-imagenet-")
        audit = os.path.join(local_out, "target-audit.jsonl")
        target = BlackBoxTarget.options(max_restarts=3, max_task_retries=0).remote(
            args.target, budget=len(images), audit_path=audit)
        t = time.perf_counter()
        # a seeded shuffle, not the selection's index order (an ImageFolder pool is stored by class)
        from drmi_ray.baselines import seeded_shuffle

        order = seeded_shuffle(np.arange(len(images)), args.seed)
        answers = np.empty(len(images), dtype=np.int64)
        answers[order], lost = query_target(target, images[order], client="drmi-imagenet")
        queries = _queries_used(target)
        ray.kill(target)
        timings["queries"] = time.perf_counter() - t
        report.write_text(answers_url, json.dumps({"target": args.target, "selected": result["selected"],
                                                   "labels": answers.tolist(), "queries": queries,
                                                   "lost_batches": lost}))
        if not _is_local(out):
            with open(audit) as f:
                report.write_text(f"{out}/target-audit.jsonl", f.read())
    log(f"target answered {int((answers >= 0).sum())} of {len(images)} images; it counted {queries} queries")
    ok = answers >= 0
    if ok.sum() < 2:
        raise ValueError("--target: fewer than 2 answers to train a substitute on")

    t = time.perf_counter()
    config = TrainConfig(model=args.substitute, epochs=args.epochs, min_steps=args.min_steps,
                         batch_size=args.train_batch, num_classes=int(ckpt["num_classes"]), seed=args.seed)
    (substitute,) = fit_substitutes([(images[ok], answers[ok], config)], num_workers=args.train_workers,
                                    use_gpu=args.train_gpu)
    timings["substitute training"] = time.perf_counter() - t

    t = time.perf_counter()
    target_model = load_classifier(args.target)
    target_labels = predict(target_model, test_images)
    scores = evaluate(substitute, test_images, test_labels, target_labels)
    attack = AttackConfig(eps=args.eps, steps=args.pgd_steps)
    scores["transfer_rate"] = transfer_rate(substitute, target_model, test_images, test_labels, attack)
    timings["evaluation and PGD transfer"] = time.perf_counter() - t
    rows = [{"method": "drmi", "budget": len(images), "seed": args.seed, "queries": int(queries),
             "accuracy": scores["accuracy"], "fidelity": scores["fidelity"],
             "transfer_rate": scores["transfer_rate"], "substitute": args.substitute,
             "test_images": int(len(test_images))}]
    notes = [f"pool: {args.data} ({result['n_images']} images, {len(result['skipped'])} skipped), "
             f"partition {result['partition']}", f"target: {args.target} ({ckpt['model']})",
             f"substitute: {args.substitute} (random init), test: {args.test or 'unselected labelled pool images'}"]
    report.write_run(out, rows, config={k: v for k, v in vars(args).items()}, timings=timings, notes=notes)
    log(f"substitute {args.substitute}: accuracy {scores['accuracy']:.3f}, fidelity {scores['fidelity']:.3f}, "
        f"transfer rate {scores['transfer_rate']:.3f}")
    return rows


def redecode(paths: list[str], size: int, mode: str) -> np.ndarray:
    """Decode files again at another geometry (the target's), in Ray tasks."""
    if any("#" in p and p.split("#")[0].endswith(".parquet") for p in paths):
        raise ValueError("the target's input size differs from --size and the pool is Parquet; "
                         "rerun with --size equal to the target's image size")
    chunks = [paths[i:i + 256] for i in range(0, len(paths), 256)]
    outs = ray.get([decode_task.remote("folder", c, np.zeros(len(c), np.int64), size, mode)[1] for c in chunks])
    return np.concatenate(outs)


def _read_json(url: str):
    import fsspec

    try:
        with fsspec.open(url, "r") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _is_local(url: str) -> bool:
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fsspec.core.url_to_fs(url)[0], LocalFileSystem)


# --------------------------------------------------------------------------- CLI

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobs/imagenet.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder tree or Parquet shards: path or fsspec URL")
    p.add_argument("--budget", "-k", type=int, required=True, help="K, the number of images to select")
    p.add_argument("--out", help="run folder (path or fsspec URL); default: a new folder under runs/")
    add_reduce_args(p)
    p.add_argument("--size", type=int, default=64, help="MI resolution: images are resized to SIZE x SIZE (default 64)")
    p.add_argument("--rgb", action="store_true", help="decode as RGB (default grey)")
    p.add_argument("--batch-files", type=int, default=256, help="files per decode task (default 256)")
    p.add_argument("--test", help="labelled held-out ImageFolder/Parquet for the optional attack stage "
                                  "(default: unselected labelled pool images)")
    return p


def add_reduce_args(p: argparse.ArgumentParser) -> None:
    """Options shared with jobs/cifar10.py."""
    p.add_argument("--partition", choices=("label", "kmeans", "none"), default="label",
                   help="MI and selection per class (default), per k-means cluster, or global")
    p.add_argument("--clusters", type=int, help=f"k-means clusters (default: one per {IMAGES_PER_CLUSTER} images)")
    p.add_argument("--bins", type=int, default=256, help="MI grey levels (default 256)")
    p.add_argument("--color", choices=("flatten", "luminance"), default="flatten")
    p.add_argument("--tile-size", type=int, default=1300, help="MI tile side (default 1300: one tile per ImageNet class)")
    p.add_argument("--max-in-flight", type=int, default=16, help="MI tiles in flight per partition (default 16)")
    p.add_argument("--gpus-per-tile", type=float, default=0.0, help="GPUs each MI tile task asks for (default 0: CPU)")
    p.add_argument("--parallel-partitions", type=int, default=4, help="partitions reduced at once (default 4)")
    p.add_argument("--dense-max", type=int, default=20000,
                   help="partitions up to this size select on a dense matrix; larger ones use Ray actors")
    p.add_argument("--num-actors", type=int, default=4, help="optimizer actors for partitions above --dense-max")
    p.add_argument("--store-dtype", choices=("float64", "float32"), default="float64",
                   help="MI tile store values (float32 halves the storage; default float64, exact)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", help="a target checkpoint: query it with the selection, fit a substitute, attack")
    p.add_argument("--substitute", default="resnet18", help="substitute architecture (resnet18, resnet152, "
                                                            "inception_v3, or lenet5/c3f2/dnn5); random init")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--min-steps", type=int, default=100)
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--test-size", type=int, default=500, help="referee's held-out images (default 500)")
    p.add_argument("--train-workers", type=int, default=1, help="Ray Train workers for the substitute (default 1)")
    p.add_argument("--train-gpu", action="store_true", help="train the substitute on GPUs")
    p.add_argument("--eps", type=float, default=0.3, help="PGD L-inf radius (default 0.3)")
    p.add_argument("--pgd-steps", type=int, default=40, help="PGD steps (default 40)")
    p.add_argument("--address", help="Ray address (default: the `ray job submit` cluster, else a local Ray)")


def settings_from(args) -> Settings:
    return Settings(bins=args.bins, color=args.color, tile_size=args.tile_size, max_in_flight=args.max_in_flight,
                    gpus_per_tile=args.gpus_per_tile, store_dtype=args.store_dtype, seed=args.seed, dense_max=args.dense_max,
                    num_actors=args.num_actors, parallel_partitions=args.parallel_partitions)


def init_ray(address: str | None) -> None:
    if ray.is_initialized():
        return
    ray.init(address=address) if address else ray.init()
    res = ray.cluster_resources()
    log(f"Ray: {len(ray.nodes())} node(s), {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU")


def write_selection(out: str, result: dict, extra: dict) -> str:
    from drmi_ray import report

    url = f"{out}/selection.json"
    report.write_text(url, json.dumps({**extra, **result}, indent=1))
    return url


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from drmi_ray import report

    out = (args.out or report.new_run_folder("imagenet")).rstrip("/")
    try:
        init_ray(args.address)
        t0 = time.perf_counter()
        listing = list_pool(args.data, batch_files=args.batch_files)
        log(f"list: {listing.n_files} {'files' if listing.kind == 'folder' else 'Parquet shards'} in "
            f"{len(listing.units)} decode units under {args.data}")
        mode = "RGB" if args.rgb else "L"
        pool = decode_pool(listing, size=args.size, mode=mode)
        result = reduce_pool(pool, args.budget, out, partition=args.partition, clusters=args.clusters,
                             settings=settings_from(args))
        extra = {"data": args.data, "size": args.size, "mode": mode, "bins": args.bins, "color": args.color,
                 "seed": args.seed, "tile_size": args.tile_size}
        url = write_selection(out, result, extra)
        log(f"selected {len(result['selected'])} of {result['n_images']} images "
            f"({len(result['skipped'])} skipped) in {time.perf_counter() - t0:.1f} s; wrote {url}")
        if args.target:
            attack_stage(pool, result, out, args)
            log(f"wrote {out}/report.md")
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"jobs/imagenet.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
