"""Reduce: a pool of any size -> the K least redundant images, on Ray; optionally attack with them.

    from drmi_ray.config import ReduceConfig, ReducePoolConfig, ReduceSelectionConfig
    from drmi_ray.reduce import run_reduce
    config = ReduceConfig(pool=ReducePoolConfig(source="s3://bucket/imagenet/train", size=64),
                          selection=ReduceSelectionConfig(budget=10000))
    result = run_reduce(config, "s3://bucket/run")

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
              ``{out}/train``), score it and attack the target with PGD (``referee.fit_and_score``,
              the tail ``drmi run`` uses); ``results.json`` / ``report.md`` in ``out``.

``{out}/selection.json`` (format ``drmi-selection`` version 1; the README documents every field):
``selected`` (the K image paths), ``indices`` (their rows in the decoded pool), ``skipped``
([{path, reason}]), ``partitions``, ``objective``, ``settings``, ``seconds`` and ``stats``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass

import numpy as np
import ray
import scipy.sparse as sp

from drmi_ray import report
from drmi_ray.checks import check_out
from drmi_ray.client import TargetClient, labels_of
from drmi_ray.config import IMAGES_PER_CLUSTER, ReduceConfig
from drmi_ray.data import Pool
from drmi_ray.drmi import seeded_shuffle
from drmi_ray.ingest import THUMB
from drmi_ray.matrix import compute_stores
from drmi_ray.optimize import select_distributed
from drmi_ray.partition import kmeans_partitions, partition_budgets, select_partitioned
from drmi_ray.pools import at_geometry, load_reduce_pool, referee_test
from drmi_ray.referee import fit_and_score, substitute_job, target_labels
from drmi_ray.runtime import init_ray, log, setup_logging
from drmi_ray.service import run_target
from drmi_ray.spread import knn_graph
from drmi_ray.target import load_checkpoint
from drmi_ray.tiles import TileStore

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

# --------------------------------------------------------------------------- 4. select

def select_all(keys: np.ndarray, parts: list[Partition], stores: dict[int, str], budget: int,
               c: ReduceConfig) -> tuple[np.ndarray, float]:
    """Per-partition selection: ``select_partitioned`` on each partition's dense matrix (read from
    its tile store); a partition above ``dense_max`` images is searched by ``select_distributed``'s
    actors reading its tile store (the matrix never in one process)."""
    def partition_mi(indices):
        return TileStore(stores[int(keys[indices[0]])]).to_dense()

    big = [p for p in parts if len(p.members) > c.selection.dense_max and 2 <= p.budget < len(p.members)]
    small = np.ones(len(keys), dtype=bool)
    chosen, objective = [], 0.0
    for p in big:
        log.info(f"select: {p.name} has {len(p.members):,} images > dense_max; {c.selection.num_actors} optimizer actors")
        sel = select_distributed(stores[p.key], p.budget, num_actors=c.selection.num_actors, seed=c.selection.seed)
        chosen.append(p.members[sel.indices])
        objective += sel.objective
        small[p.members] = False
    if small.any():
        rest = np.flatnonzero(small)
        k_rest = budget - sum(p.budget for p in big)
        sel = select_partitioned(keys[rest], k_rest, lambda idx: partition_mi(rest[idx]), seed=c.selection.seed)
        chosen.append(rest[sel.indices])
        objective += sel.objective
    return np.sort(np.concatenate(chosen)), float(objective)


def reduce_pool(pool: Pool, c: ReduceConfig, out: str) -> tuple[dict, list[Partition]]:
    """Partition, compute MI per partition, select per partition; returns selection.json's dict
    and the partitions (their members and tile stores: the attack's pool graph)."""
    if c.selection.budget > len(pool):
        raise ValueError(f"budget {c.selection.budget} is larger than the pool ({len(pool)} decodable images, "
                         f"{len(pool.skipped)} skipped); lower --budget")
    t0 = time.perf_counter()
    keys, parts = partition_pool(pool, c.selection.partition, clusters=c.selection.clusters, seed=c.selection.seed)
    budgets = partition_budgets(keys, c.selection.budget)  # proportional to size, largest remainder, sum = K
    for p in parts:
        p.budget = budgets[p.key]
    sizes = [len(p.members) for p in parts]
    log.info(f"partition: {c.selection.partition}, {len(parts)} partition(s) of {min(sizes)}..{max(sizes)} images; "
             f"budgets {min(budgets.values())}..{max(budgets.values())} (sum {c.selection.budget})")
    t_mi = time.perf_counter()
    need = [p for p in parts if p.budget >= 1 and len(p.members) >= 2]  # the stores selection reads
    urls, mi_stats = compute_stores(pool.images, {p.name: p.members for p in need}, f"{out}/mi",
                                    parallel=c.selection.parallel_partitions, **c.mi.store_options())
    stores = {p.key: urls[p.name] for p in need}
    t_sel = time.perf_counter()
    selected, objective = select_all(keys, parts, stores, c.selection.budget, c)
    log.info(f"select: {len(selected)} images, objective {objective:.4f}, {time.perf_counter() - t_sel:.1f} s")
    if len(selected) != c.selection.budget:
        raise RuntimeError(f"selection has {len(selected)} images, expected {c.selection.budget}")
    inside = np.zeros(len(pool), dtype=bool)
    inside[selected] = True
    mi_seconds = t_sel - t_mi
    for p in parts:
        p.store = stores.get(p.key)
    return {
        "format": "drmi-selection", "version": 1,
        "data": c.pool.source, "budget": int(c.selection.budget), "partition": c.selection.partition,
        "settings": {"size": c.pool.size, "mode": "RGB" if pool.images.ndim == 4 else "L",
                     "image_shape": list(pool.images.shape[1:]), "bins": c.mi.bins, "color": c.mi.color,
                     "tile_size": c.mi.tile_size, "store_dtype": c.mi.store_dtype, "clusters": len(parts),
                     "pool_size": c.pool.pool, "max_pixels": c.pool.max_pixels, "seed": c.selection.seed},
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
    """The whole job: pool -> selection.json (and config.json) in ``out``; with ``c.target.checkpoint``, the
    attack with the selection too. Returns the selection dict."""
    c.check()
    out = check_out(out)
    t0 = time.perf_counter()
    setup_logging()
    init_ray(address)
    res = ray.cluster_resources()
    log.info(f"Ray: {len(ray.nodes())} node(s), {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU")
    pool = load_reduce_pool(c.pool, c.selection.seed)
    log.info(f"pool: {len(pool)} images of {pool.images.shape[1:]} from {c.pool.source} ({len(pool.skipped)} skipped)")
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
    if c.target.checkpoint or c.endpoint.url:
        attack_with_selection(pool, result, c, out, parts)
        log.info(f"wrote {out}/report.md")
    return result


# --------------------------------------------------------------------------- 5. optional attack

def query_target(client, images: np.ndarray, *, batch: int = 256) -> np.ndarray:
    """The target's labels for ``images``, asked batch by batch through its HTTP API."""
    labels = np.empty(len(images), dtype=np.int64)
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        labels[start:start + len(chunk)] = labels_of(client.query(chunk), len(chunk))
        log.info(f"query: {min(start + batch, len(images))}/{len(images)} images answered")
    return labels


def pool_graph(pool: Pool, parts: list[Partition]):
    """The whole pool's kNN graph on NMI (``spread.knn_graph``): each partition's graph from its
    own tile store (read a tile-row at a time), so images of different partitions are never linked."""
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
    timings = {}
    if c.endpoint.url:  # an outside endpoint: the client maps the pool's images to its input
        ckpt = {"model": f"the endpoint {c.endpoint.url} (model {c.endpoint.model!r})",
                "num_classes": c.substitute.num_classes}
        shape = pool.images.shape[1:]
    else:
        ckpt = load_checkpoint(c.target.checkpoint)
        size, channels = int(ckpt["image_size"]), int(ckpt["in_channels"])
        shape = (size, size) if channels == 1 else (size, size, channels)
    selected = np.asarray(result["indices"], dtype=np.int64)
    images = at_geometry(pool, selected, shape)
    test_images, test_labels = referee_test(pool, selected, c.pool, shape, c.selection.seed)

    # a seeded shuffle, not the selection's index order (an ImageFolder pool is stored by class)
    order = seeded_shuffle(np.arange(len(images)), c.selection.seed)
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
        with run_target(c.target.checkpoint, out, **c.target.service_options()) as service:
            key = service.create_key("drmi-reduce", **c.target.key_settings(len(images)))
            client = TargetClient(service.url, key, prefix="drmi-reduce", max_batch=c.target.client_batch())
            answers[order] = query_target(client, images[order])
            queries = service.usage("drmi-reduce")["used"]
    timings["queries"] = time.perf_counter() - t
    log.info(f"target answered {len(images)} images; it charged {queries} queries")

    t = time.perf_counter()
    train = dataclasses.replace(c.substitute, num_classes=int(ckpt["num_classes"]), seed=c.selection.seed)
    graph = None
    if c.learn != "answers" and parts is not None:
        if pool.images.shape[1:] == tuple(shape):
            graph = pool_graph(pool, parts)
        else:
            log.info(f"--learn {c.learn}: the pool was decoded at {pool.images.shape[1:]}, the target takes {shape}; "
                     "fitting on the answers alone (decode with --size/--rgb matching the target to use the pool)")
    job, learned = substitute_job(images, answers, selected, train, pool_images=pool.images, graph=graph,
                                  learn=c.learn)
    log.info(f"substitute learns from the {learned['learn']}"
             + (f" ({learned['reached']} pool images reached, {learned['unreached']} not)" if "reached" in learned else ""))
    if c.learn != "answers":
        timings["pool graph and label spreading"] = time.perf_counter() - t
    t = time.perf_counter()
    referee = c.endpoint.client_settings(eval_key) if c.endpoint.url else c.target.checkpoint  # black-box: its own key
    labels_of_target, eval_queries = target_labels(referee, test_images)
    (scores,) = fit_and_score([job], referee, test_images, test_labels,
                              labels_of_target, c, storage_path=f"{out}/train", names=["referee-drmi-reduce"])
    eval_queries += scores.get("eval_queries", 0)
    timings["substitute training, evaluation and PGD transfer"] = time.perf_counter() - t
    rows = [{"method": "drmi", "budget": len(images), "seed": c.selection.seed, "queries": int(queries),
             "accuracy": scores["accuracy"], "fidelity": scores["fidelity"],
             "transfer_rate": scores["transfer_rate"], "substitute": c.substitute.model, "learn": learned["learn"],
             "test_images": int(len(test_images))}]
    notes = [f"pool: {c.pool.source} ({result['n_images']} images, {len(result['skipped'])} skipped), "
             f"partition {result['partition']}",
             f"target: {c.target.checkpoint} ({ckpt['model']})" if c.target.checkpoint else
             f"target: {ckpt['model']}, scored black-box: {eval_queries} evaluation queries (the test images and "
             "the adversarial examples, on the evaluation key) beside the attack's",
             f"substitute: {c.substitute.model} (random init), test: {c.pool.test_source or 'see referee_test'} "
             f"({len(test_images)} images)"]
    report.write_run(out, rows, config=c.to_dict(), timings=timings, notes=notes)
    log.info(f"substitute {c.substitute.model}: accuracy {scores['accuracy']:.3f}, fidelity {scores['fidelity']:.3f}, "
             f"transfer rate {scores['transfer_rate']:.3f}")
    return rows
