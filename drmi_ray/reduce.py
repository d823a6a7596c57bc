"""Reduce: a pool of any size -> the K least redundant images, on Ray; optionally attack with them.

    from drmi_ray.config import ReduceConfig
    from drmi_ray.reduce import run_reduce
    result = run_reduce(ReduceConfig(data="s3://bucket/imagenet/train", budget=10000, size=64), "s3://bucket/run")

``drmi reduce``, ``jobs/imagenet.py`` and ``jobs/cifar10.py`` are front ends to ``run_reduce``.
Stages (each prints progress; a rerun into the same ``out`` resumes the MI stage tile by tile):

1. pool       a named source (``bundled-mnist``, ``mnist:ROOT``, ``cifar10:ROOT``) as arrays, or an
              ImageFolder tree / Parquet shards on any fsspec URL decoded by Ray Data
              (``ingest.py``; bad files are skipped and listed).
2. partition  ``kmeans`` (default, label-free: k-means on 8x8 thumbnails, one cluster per ~1,300
              images or ``clusters``), ``label`` (the pool's own labels: class folders or the
              ``label`` column; only when the user asks) or ``none`` (one global matrix). Budgets are
              proportional to partition size (largest remainder, summing to K).
3. MI         per partition, ``compute_mi_matrix`` into its own tile store ``{out}/mi/NAME``;
              ``parallel_partitions`` at once; tiles ask for ``gpus_per_tile`` GPUs.
4. select     per partition on its dense matrix; a partition above ``dense_max`` images is searched
              by ``select_distributed``'s actors reading its tile store.
5. optional (``target`` set): serve the target checkpoint over HTTP (``service.run_target``, its
              journal in ``{out}/target/``), query it with the selection through an API key of
              budget K (in a seeded shuffle; a rerun gets the stored answers, charged once),
              fit a substitute with Ray Train (its weights come back as a Train checkpoint under
              ``{out}/train``), score it and attack the target with PGD (``experiment.fit_and_score``,
              the tail ``drmi run`` uses); ``results.json`` / ``report.md`` in ``out``.

``{out}/selection.json`` (format ``drmi-selection`` version 1; the README documents every field):
``selected`` (the K image paths), ``indices`` (their rows in the decoded pool), ``skipped``
([{path, reason}]), ``partitions``, ``objective``, ``settings``, ``seconds`` and ``stats``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np

from drmi_ray.config import ReduceConfig
from drmi_ray.data import TORCHVISION_SOURCES, Pool
from drmi_ray.runtime import bounded, init_ray, log, setup_logging, use_cpus

IMAGES_PER_CLUSTER = 1300  # default k-means granularity: about one ImageNet class per cluster


def check_config(c: ReduceConfig) -> None:
    """Refuse settings that cannot run, before any work (no Ray, no image decoded): one-line
    ValueErrors naming the ``drmi reduce`` flag and the fix. A pool URL is listed (not decoded)
    to bound --budget, --pool-size and --clusters by its image count."""
    import dataclasses

    from drmi_ray.config import (ATTACK_FLAGS, MAX_SIZE, SEED_MAX, SUBSTITUTE_FLAGS, check_attack, check_bool,
                                 check_checkpoint, check_choice, check_exists, check_int, check_number,
                                 check_source, check_train, pool_images)
    from drmi_ray.images import MIN_SIDE
    from drmi_ray.mi import COLOR_MODES, LEVELS
    from drmi_ray.spread import LEARN_MODES

    check_int("--budget", c.budget, maximum=10**9, fix="give K, the number of images to select")
    bounds = {"tile_size": 16_384, "max_in_flight": 10_000, "parallel_partitions": 1_000, "dense_max": 50_000,
              "num_actors": 1_024, "batch_files": 100_000, "max_pixels": 10**9, "test_size": 10**7}
    for name, most in bounds.items():
        check_int("--" + name.replace("_", "-"), getattr(c, name), maximum=most)
    check_int("--size", c.size, minimum=MIN_SIDE, maximum=MAX_SIZE, none_ok=True,
              fix=f"images are decoded to SIZE x SIZE; smaller than {MIN_SIDE} leaves nothing to compare")
    check_int("--pool-size", c.pool_size, maximum=10**9, none_ok=True)
    check_int("--clusters", c.clusters, maximum=100_000, none_ok=True)
    if c.pool_size is not None and c.budget > c.pool_size:
        raise ValueError(f"--budget {c.budget} is larger than --pool-size {c.pool_size}; lower the budget or "
                         "enlarge the pool")
    check_int("--seed", c.seed, minimum=0, maximum=SEED_MAX)
    check_int("--serve-port", c.serve_port, minimum=1, maximum=65535, none_ok=True)
    check_choice("--partition", c.partition, ("kmeans", "label", "none"))
    check_choice("--store-dtype", c.store_dtype, ("float64", "float32"))
    check_number("--gpus-per-tile", c.gpus_per_tile, at_least=0, at_most=16, fix="0 computes MI tiles on CPUs")
    check_int("--bins", c.mi.bins, minimum=2, maximum=LEVELS, fix="give the grey levels per pixel (default 256)")
    check_choice("--color", c.mi.color, COLOR_MODES)
    check_choice("--learn", c.learn, LEARN_MODES)
    check_int("--substitute-workers", c.substitute_workers, minimum=0, maximum=1_024,
              fix="0 fits in Ray Train's local mode")
    for name in ("rgb", "download", "substitute_gpu"):
        check_bool("--" + name.replace("_", "-"), getattr(c, name))
    check_train(dataclasses.asdict(c.substitute), lambda f: SUBSTITUTE_FLAGS.get(f, f"substitute.{f}"))
    check_attack(dataclasses.asdict(c.attack), lambda f: ATTACK_FLAGS.get(f, f"attack.{f}"))
    check_source("--data", c.data, download=c.download)
    check_checkpoint("--target", c.target)
    c.endpoint.check()
    if c.endpoint.url and c.target:
        raise ValueError("--target and --target-url: give one (a checkpoint we serve, or an endpoint to attack)")
    if c.endpoint.url and c.endpoint.eval_budget is not None and c.endpoint.eval_budget < 2 * c.test_size:
        raise ValueError(f"--eval-budget {c.endpoint.eval_budget}: the referee may need {2 * c.test_size} queries "
                         f"(the {c.test_size} test images, then their adversarial examples); raise it, or lower --test-size")
    check_exists("--test", c.test, "a labelled ImageFolder tree or Parquet shards")
    n = pool_images(c.data)  # last: a URL is listed
    for option, value in (("--budget", c.budget), ("--pool-size", c.pool_size), ("--clusters", c.clusters)):
        if value is not None and value > n:
            raise ValueError(f"{option} {value} is larger than the pool ({n:,} images in {c.data}); lower {option}")


# --------------------------------------------------------------------------- 1. pool

def load(c: ReduceConfig) -> Pool:
    """The pool, every image named (``paths``) and with thumbnails for k-means."""
    from drmi_ray.data import load_pool
    from drmi_ray.ingest import read_pool, thumbnails

    name, sep, _ = c.data.partition(":")
    if c.data == "bundled-mnist" or (sep and name in TORCHVISION_SOURCES):
        pool = load_pool(c.data, download=c.download)
        if c.size is not None and pool.images.shape[1] != c.size:
            raise ValueError(f"{c.data} images are {pool.images.shape[1]} pixels wide; --size applies to image files only")
        pool.paths = [f"{c.data}#{i}" for i in range(len(pool))]
    else:
        pool = read_pool(c.data, size=c.size, mode="RGB" if c.rgb else "L", max_pixels=c.max_pixels,
                         batch_files=c.batch_files)
    if c.pool_size is not None:
        if c.pool_size > len(pool):
            raise ValueError(f"pool_size {c.pool_size} is larger than the pool ({len(pool)} images); lower it")
        keep = np.sort(np.random.default_rng(c.seed).choice(len(pool), c.pool_size, replace=False))
        pool = Pool(pool.images[keep], pool.labels[keep], [pool.paths[i] for i in keep], pool.classes,
                    pool.skipped, None if pool.thumbs is None else pool.thumbs[keep], pool.stats)
    if pool.thumbs is None:
        pool.thumbs = np.concatenate([thumbnails(pool.images[s:s + 8192]) for s in range(0, len(pool), 8192)])
    return pool


# --------------------------------------------------------------------------- 2. partition

@dataclass
class Partition:
    key: int  # the partition's key in the keys array handed to select_partitioned
    name: str  # folder-safe name: its tile store is {out}/mi/NAME
    members: np.ndarray  # pool indices, ascending
    budget: int = 0
    store: str | None = None  # its MI tile store's URL, once computed


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:60] or "_"


def partition_pool(pool: Pool, how: str, *, clusters: int | None = None,
                   seed: int = 0) -> tuple[np.ndarray, list[Partition]]:
    """Partition keys (int64 (N,)) and the partitions: by k-means cluster of the thumbnails
    (``partition.kmeans_partitions``), by the pool's own labels, or one global partition."""
    from drmi_ray.ingest import THUMB
    from drmi_ray.partition import kmeans_partitions

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
        raise ValueError(f"--partition must be kmeans, label or none, got {how!r}")
    parts = [Partition(int(key), f"{i:04d}-{_safe(names[int(key)])}", np.flatnonzero(keys == key))
             for i, key in enumerate(np.unique(keys))]
    return keys, parts


# --------------------------------------------------------------------------- 3. MI

def partition_store(pool: Pool, part: Partition, out: str, c: ReduceConfig):
    """Compute one partition's MI matrix into its own tile store (resumes a partial one)."""
    from drmi_ray.matrix import compute_mi_matrix

    return compute_mi_matrix(pool.images[part.members], f"{out}/mi/{part.name}", bins=c.mi.bins, color=c.mi.color,
                             tile_size=c.tile_size, max_in_flight=c.max_in_flight,
                             num_gpus_per_task=c.gpus_per_tile, dtype=c.store_dtype,
                             progress=c.parallel_partitions <= 1)


def _bundle_task(items, bins, color, tile_size, dtype):
    """One Ray task: the one-tile stores of a bundle of small partitions."""
    import ray

    from drmi_ray.matrix import compute_small_stores

    device = None
    if ray.get_gpu_ids():
        import torch

        device = "cuda" if torch.cuda.is_available() else None
    use_cpus(1)
    return compute_small_stores(items, bins=bins, color=color, tile_size=tile_size, dtype=dtype, device=device)


def bundles(parts: list[Partition], tile_size: int, cpus: int) -> list[list[Partition]]:
    """Small partitions (one tile each) grouped so that every bundle holds about one full tile's
    pairs (tile_size^2 / 2), or less when that leaves fewer than two bundles per CPU: many small
    partitions share one task instead of paying its cost each, and every CPU still gets work."""
    total = sum(len(p.members) * (len(p.members) - 1) // 2 for p in parts)
    target = max(1, min(tile_size * tile_size // 2, total // (2 * max(cpus, 1))))
    out, current, pairs = [], [], 0
    for p in sorted(parts, key=lambda p: -len(p.members)):
        current.append(p)
        pairs += len(p.members) * (len(p.members) - 1) // 2
        if pairs >= target:
            out.append(current)
            current, pairs = [], 0
    return out + ([current] if current else [])


def compute_stores(pool: Pool, parts: list[Partition], out: str, c: ReduceConfig) -> tuple[dict[int, str], dict]:
    """Tile stores of every partition that selection reads (budget >= 1, size >= 2).

    Partitions of at most ``tile_size`` images are computed in bundles, one Ray task per bundle
    (``matrix.compute_small_stores``); larger ones by ``compute_mi_matrix``, ``parallel_partitions``
    at once so they still fill the cluster. Every store is the same either way (and resumable).
    Returns ({partition key: store URL}, {"pairs", "pairs_computed", "seconds"}).
    """
    import ray

    need = [p for p in parts if p.budget >= 1 and len(p.members) >= 2]
    small = [p for p in need if len(p.members) <= c.tile_size]
    large = [p for p in need if len(p.members) > c.tile_size]
    groups = bundles(small, c.tile_size, int(ray.cluster_resources().get("CPU", 1)))
    pairs = sum(len(p.members) * (len(p.members) - 1) // 2 for p in need)
    log.info(f"MI: {len(need)} partition(s), {pairs:,} pairs: {len(small)} small ones in {len(groups)} task(s), "
             f"{len(large)} of several tiles of {c.tile_size} ({c.parallel_partitions} at a time)")
    stores = {p.key: f"{out}/mi/{p.name}" for p in need}
    state, lock = {"done": 0, "computed": 0, "partitions": 0}, threading.Lock()
    t0 = time.perf_counter()

    def progress(finished: list[Partition], computed: int) -> None:
        with lock:
            state["done"] += sum(len(p.members) * (len(p.members) - 1) // 2 for p in finished)
            state["computed"] += computed
            state["partitions"] += len(finished)
            el = time.perf_counter() - t0
            log.info(f"MI: {state['partitions']}/{len(need)} partitions, {state['done']:,}/{pairs:,} pairs, "
                     f"{state['computed'] / max(el, 1e-9):,.0f} pairs/s computed, "
                     f"ETA {(pairs - state['done']) * el / max(state['done'], 1):.0f} s")

    def run_bundles() -> None:
        task = ray.remote(_bundle_task).options(num_cpus=1, num_gpus=c.gpus_per_tile, max_retries=3)

        def submit(group):
            items = ray.put([(pool.images[p.members], stores[p.key]) for p in group])
            return task.remote(items, c.mi.bins, c.mi.color, c.tile_size, c.store_dtype)

        window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        for group, computed in bounded(submit, groups, window):
            progress(group, sum(computed))

    with ThreadPoolExecutor(max_workers=max(1, c.parallel_partitions) + 1) as ex:
        futures = {ex.submit(partition_store, pool, p, out, c): p for p in large}
        futures[ex.submit(run_bundles)] = None
        for fut in as_completed(futures):
            result = fut.result()
            if futures[fut] is not None:  # a large partition's store
                progress([futures[fut]], result.stats["pairs"])
    return stores, {"pairs": pairs, "pairs_computed": state["computed"], "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- 4. select

def select_all(keys: np.ndarray, parts: list[Partition], stores: dict[int, str], budget: int,
               c: ReduceConfig) -> tuple[np.ndarray, float]:
    """Per-partition selection: ``select_partitioned`` on each partition's dense matrix (read from
    its tile store); a partition above ``dense_max`` images is searched by ``select_distributed``'s
    actors reading its tile store (the matrix never in one process)."""
    from drmi_ray.matrix import TileStore
    from drmi_ray.optimize import select_distributed
    from drmi_ray.partition import select_partitioned

    def partition_mi(indices):
        return TileStore(stores[int(keys[indices[0]])]).to_dense()

    big = [p for p in parts if len(p.members) > c.dense_max and 2 <= p.budget < len(p.members)]
    small = np.ones(len(keys), dtype=bool)
    chosen, objective = [], 0.0
    for p in big:
        log.info(f"select: {p.name} has {len(p.members):,} images > dense_max; {c.num_actors} optimizer actors")
        sel = select_distributed(stores[p.key], p.budget, num_actors=c.num_actors, seed=c.seed)
        chosen.append(p.members[sel.indices])
        objective += sel.objective
        small[p.members] = False
    if small.any():
        rest = np.flatnonzero(small)
        k_rest = budget - sum(p.budget for p in big)
        sel = select_partitioned(keys[rest], k_rest, lambda idx: partition_mi(rest[idx]), seed=c.seed)
        chosen.append(rest[sel.indices])
        objective += sel.objective
    return np.sort(np.concatenate(chosen)), float(objective)


def reduce_pool(pool: Pool, c: ReduceConfig, out: str) -> tuple[dict, list[Partition]]:
    """Partition, compute MI per partition, select per partition; returns selection.json's dict
    and the partitions (their members and tile stores: the attack's pool graph)."""
    from drmi_ray.partition import partition_budgets

    if c.budget > len(pool):
        raise ValueError(f"budget {c.budget} is larger than the pool ({len(pool)} decodable images, "
                         f"{len(pool.skipped)} skipped); lower --budget")
    t0 = time.perf_counter()
    keys, parts = partition_pool(pool, c.partition, clusters=c.clusters, seed=c.seed)
    budgets = partition_budgets(keys, c.budget)  # proportional to size, largest remainder, sum = K
    for p in parts:
        p.budget = budgets[p.key]
    sizes = [len(p.members) for p in parts]
    log.info(f"partition: {c.partition}, {len(parts)} partition(s) of {min(sizes)}..{max(sizes)} images; "
             f"budgets {min(budgets.values())}..{max(budgets.values())} (sum {c.budget})")
    t_mi = time.perf_counter()
    stores, mi_stats = compute_stores(pool, parts, out, c)
    t_sel = time.perf_counter()
    selected, objective = select_all(keys, parts, stores, c.budget, c)
    log.info(f"select: {len(selected)} images, objective {objective:.4f}, {time.perf_counter() - t_sel:.1f} s")
    if len(selected) != c.budget:
        raise RuntimeError(f"selection has {len(selected)} images, expected {c.budget}")
    inside = np.zeros(len(pool), dtype=bool)
    inside[selected] = True
    mi_seconds = t_sel - t_mi
    for p in parts:
        p.store = stores.get(p.key)
    return {
        "format": "drmi-selection", "version": 1,
        "data": c.data, "budget": int(c.budget), "partition": c.partition,
        "settings": {"size": c.size, "mode": "RGB" if pool.images.ndim == 4 else "L",
                     "image_shape": list(pool.images.shape[1:]), "bins": c.mi.bins, "color": c.mi.color,
                     "tile_size": c.tile_size, "store_dtype": c.store_dtype, "clusters": len(parts),
                     "pool_size": c.pool_size, "max_pixels": c.max_pixels, "seed": c.seed},
        "n_files": int(pool.stats.get("files", len(pool))), "n_images": int(len(pool)),
        "selected": [pool.paths[i] for i in selected],
        "indices": [int(i) for i in selected],
        "objective": objective,
        "skipped": pool.skipped,
        "partitions": [{"name": p.name, "size": len(p.members), "budget": p.budget,
                        "selected": int(inside[p.members].sum()), "store": p.store} for p in parts],
        "seconds": {"decode": round(pool.stats.get("seconds", 0.0), 3), "partition": round(t_mi - t0, 3),
                    "mi": round(mi_seconds, 3), "select": round(time.perf_counter() - t_sel, 3)},
        "stats": {"decoded_images_per_s": round(pool.stats.get("images_per_s", 0.0), 1),
                  "mi_pairs": mi_stats["pairs"], "mi_pairs_computed": mi_stats["pairs_computed"],
                  "mi_pairs_per_s": round(mi_stats["pairs_computed"] / max(mi_seconds, 1e-9), 1)},
    }, parts


# --------------------------------------------------------------------------- the whole run

def run_reduce(c: ReduceConfig, out: str, *, address: str | None = None) -> dict:
    """The whole job: pool -> selection.json (and config.json) in ``out``; with ``c.target``, the
    attack with the selection too. Returns the selection dict."""
    import ray

    from drmi_ray import report
    from drmi_ray.config import check_out

    check_config(c)
    out = check_out(out)
    t0 = time.perf_counter()
    setup_logging()
    init_ray(address)
    res = ray.cluster_resources()
    log.info(f"Ray: {len(ray.nodes())} node(s), {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU")
    pool = load(c)
    log.info(f"pool: {len(pool)} images of {pool.images.shape[1:]} from {c.data} ({len(pool.skipped)} skipped)")
    for s in pool.skipped[:20]:
        log.info(f"skipped {s['path']}: {s['reason']}")
    if len(pool.skipped) > 20:
        log.info(f"... and {len(pool.skipped) - 20} more skipped files (all listed in selection.json)")
    result, parts = reduce_pool(pool, c, out)
    result["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    report.write_text(f"{out}/config.json", json.dumps(c.to_dict(), indent=1))
    report.write_text(f"{out}/selection.json", json.dumps(result, indent=1))
    log.info(f"selected {len(result['selected'])} of {result['n_images']} images ({len(result['skipped'])} skipped) "
             f"in {result['seconds']['total']:.1f} s; wrote {out}/selection.json")
    if c.target or c.endpoint.url:
        attack_with_selection(pool, result, c, out, parts)
        log.info(f"wrote {out}/report.md")
    return result


# --------------------------------------------------------------------------- 5. optional attack

def query_target(client, images: np.ndarray, *, batch: int = 256) -> np.ndarray:
    """The target's labels for ``images``, asked batch by batch through its HTTP API."""
    from drmi_ray.client import labels_of

    labels = np.empty(len(images), dtype=np.int64)
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        labels[start:start + len(chunk)] = labels_of(client.query(chunk), len(chunk))
        log.info(f"query: {min(start + batch, len(images))}/{len(images)} images answered")
    return labels


def referee_test(pool: Pool, selected: np.ndarray, c: ReduceConfig, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """The referee's labelled held-out images at the target's geometry: ``c.test``; else a named
    source's own test split (``cifar10:ROOT`` -> ``cifar10-test:ROOT``); else up to ``test_size``
    unselected labelled pool images (the labels are the referee's, never the attacker's)."""
    from drmi_ray.data import load_pool

    rng = np.random.default_rng(c.seed)
    mode = "L" if len(shape) == 2 else "RGB"
    name, _, root = c.data.partition(":")
    if c.test or name in ("mnist", "cifar10"):
        test = load_pool(c.test or f"{name}-test:{root}", size=None if c.test is None else shape[0], mode=mode,
                         download=c.download, on_error="skip")
        pick = np.sort(rng.permutation(len(test))[: c.test_size])
        images, labels = test.images[pick], test.labels[pick]
    else:
        rest = np.setdiff1d(np.flatnonzero(pool.labels >= 0), selected)
        rest = np.sort(rng.permutation(rest)[: c.test_size])
        if len(rest) == 0:
            raise ValueError("--target: no labelled images left for the referee; pass --test URL")
        images, labels = at_geometry(pool, rest, shape), pool.labels[rest]
    keep = labels >= 0
    return images[keep], labels[keep]


def at_geometry(pool: Pool, indices, shape: tuple) -> np.ndarray:
    """Pool images at the target's geometry: decoded again from their files when it differs."""
    from drmi_ray.ingest import Listing, decode_pool

    images = pool.images[np.asarray(indices, dtype=np.int64)]
    if images.shape[1:] == tuple(shape):
        return images
    paths = [pool.paths[i] for i in indices]
    if any("#" in p for p in paths):
        raise ValueError(f"the target takes images of shape {tuple(shape)}, the pool's are {images.shape[1:]}; "
                         "rerun with --size (and --rgb) matching the target")
    listing = Listing("selected files", "folder", [{"start": s, "paths": paths[s:s + 512]}
                                                   for s in range(0, len(paths), 512)], len(paths))
    again = decode_pool(listing, size=shape[0], mode="L" if len(shape) == 2 else "RGB", progress=False)
    if len(again) != len(paths):
        raise ValueError(f"{len(paths) - len(again)} selected files could not be decoded again: {again.skipped[:1]}")
    return np.asarray(again.images)


def pool_graph(pool: Pool, parts: list[Partition]):
    """The whole pool's kNN graph on NMI (``spread.knn_graph``): each partition's graph from its
    own tile store (read a tile-row at a time), so images of different partitions are never linked."""
    import scipy.sparse as sp

    from drmi_ray.matrix import TileStore
    from drmi_ray.spread import knn_graph

    blocks = []
    for p in parts:
        local = knn_graph(TileStore(p.store)).tocoo() if p.store and len(p.members) > 1 else sp.coo_matrix((0, 0))
        blocks.append((p.members[local.row], p.members[local.col], local.data))
    rows, cols, weights = (np.concatenate(x) for x in zip(*blocks))
    return sp.csr_matrix((weights, (rows, cols)), shape=(len(pool), len(pool)))


def attack_with_selection(pool: Pool, result: dict, c: ReduceConfig, out: str,
                          parts: list[Partition] | None = None) -> list[dict]:
    """Query the target with the selection, fit a substitute (Ray Train), score it and attack.
    ``parts``: ``reduce_pool``'s partitions, whose tile stores give the pool graph that
    ``--learn pool`` spreads the answers over."""
    import dataclasses

    from drmi_ray import report
    from drmi_ray.baselines import seeded_shuffle
    from drmi_ray.client import TargetClient
    from drmi_ray.experiment import endpoint_labels, fit_and_score, substitute_job
    from drmi_ray.models import predict
    from drmi_ray.service import run_target
    from drmi_ray.target import load_checkpoint, load_classifier

    timings = {}
    if c.endpoint.url:  # an outside endpoint: the client maps the pool's images to its input
        ckpt = {"model": f"the endpoint {c.endpoint.url} (model {c.endpoint.model!r})",
                "num_classes": c.substitute.num_classes}
        shape = pool.images.shape[1:]
    else:
        ckpt = load_checkpoint(c.target)
        size, channels = int(ckpt["image_size"]), int(ckpt["in_channels"])
        shape = (size, size) if channels == 1 else (size, size, channels)
    selected = np.asarray(result["indices"], dtype=np.int64)
    images = at_geometry(pool, selected, shape)
    test_images, test_labels = referee_test(pool, selected, c, shape)

    # a seeded shuffle, not the selection's index order (an ImageFolder pool is stored by class)
    order = seeded_shuffle(np.arange(len(images)), c.seed)
    answers = np.empty(len(images), dtype=np.int64)
    t = time.perf_counter()
    if c.endpoint.url:
        attack_key, eval_key = c.endpoint.keys()
        client = TargetClient(**c.endpoint.client_settings(attack_key), prefix="drmi-reduce")
        client.request_body(images[:1], "check")  # the endpoint answers and takes these images: one line if not
        answers[order] = query_target(client, images[order])
        queries = client.answered
    else:
        # The run folder's target: a rerun asks the same batches with the same request ids and gets
        # the journal's stored answers, charged once.
        with run_target(c.target, out, port=c.serve_port) as service:
            key = service.create_key("drmi-reduce", budget=len(images))
            client = TargetClient(service.url, key, prefix="drmi-reduce")
            answers[order] = query_target(client, images[order])
            queries = service.usage("drmi-reduce")["used"]
    timings["queries"] = time.perf_counter() - t
    log.info(f"target answered {len(images)} images; it charged {queries} queries")

    t = time.perf_counter()
    train = dataclasses.replace(c.substitute, num_classes=int(ckpt["num_classes"]), seed=c.seed)
    graph = None
    if c.learn != "answers" and parts is not None:
        if pool.images.shape[1:] == tuple(shape):
            t_graph = time.perf_counter()
            graph = pool_graph(pool, parts)
            timings["pool graph"] = time.perf_counter() - t_graph
        else:
            log.info(f"--learn {c.learn}: the pool was decoded at {pool.images.shape[1:]}, the target takes {shape}; "
                     "fitting on the answers alone (decode with --size/--rgb matching the target to use the pool)")
    job, learned = substitute_job(images, answers, selected, train, pool_images=pool.images, graph=graph,
                                  learn=c.learn)
    log.info(f"substitute learns from the {learned['learn']}"
             + (f" ({learned['reached']} pool images reached, {learned['unreached']} not)" if "reached" in learned else ""))
    eval_queries = 0
    if c.endpoint.url:  # the referee scores black-box, on its own key
        referee = c.endpoint.client_settings(eval_key)
        target_labels, eval_queries = endpoint_labels(referee, test_images, "referee-test")
    else:
        referee = c.target
        target_labels = predict(load_classifier(c.target), test_images)
    (scores,) = fit_and_score([job], referee, test_images, test_labels,
                              target_labels, c, storage_path=f"{out}/train", names=["referee-drmi-reduce"])
    eval_queries += scores.get("eval_queries", 0)
    timings["substitute training, evaluation and PGD transfer"] = time.perf_counter() - t
    rows = [{"method": "drmi", "budget": len(images), "seed": c.seed, "queries": int(queries),
             "accuracy": scores["accuracy"], "fidelity": scores["fidelity"],
             "transfer_rate": scores["transfer_rate"], "substitute": c.substitute.model, "learn": learned["learn"],
             "test_images": int(len(test_images))}]
    notes = [f"pool: {c.data} ({result['n_images']} images, {len(result['skipped'])} skipped), "
             f"partition {result['partition']}",
             f"target: {c.target} ({ckpt['model']})" if c.target else
             f"target: {ckpt['model']}, scored black-box: {eval_queries} evaluation queries (the test images and "
             "the adversarial examples, on the evaluation key) beside the attack's",
             f"substitute: {c.substitute.model} (random init), test: {c.test or 'see referee_test'} "
             f"({len(test_images)} images)"]
    report.write_run(out, rows, config=c.to_dict(), timings=timings, notes=notes)
    log.info(f"substitute {c.substitute.model}: accuracy {scores['accuracy']:.3f}, fidelity {scores['fidelity']:.3f}, "
             f"transfer rate {scores['transfer_rate']:.3f}")
    return rows
