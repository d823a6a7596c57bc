"""The N×N MI matrix of a pool, as upper-triangle tiles computed by Ray tasks into a tile store.

The maths is in ``mi.py`` and the store's on-disk format (manifest, tiles, checks, claims) in
``tiles.py``; this module only cuts the matrix into tiles, schedules one Ray task per tile (sharing
the work with other drivers on the same store, repairing bad tiles on a rerun) and returns the
``TileStore``.

Example::

    store = compute_mi_matrix(images, "runs/mi-store")     # resumable; progress bar
    rows = store.read_rows([0, 5, 9])                      # (3, n), reads only the tiles needed
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import fsspec
import numpy as np
import ray
from tqdm.auto import tqdm

from drmi_ray.mi import LEVELS, mi_block, to_codes
from drmi_ray.mi_cpu import entropy_sums
from drmi_ray.runtime import bounded, init_ray, log, use_cpus
from drmi_ray.tiles import (CLAIM_TIMEOUT_S, DTYPES, TileClaims, TileStore, new_manifest, open_or_create, present_tiles,
                            tile_grid, tile_path, tile_problem, tile_shape, write_tile)

# 1.7M pairs, 13.5 MB of float64: one tile per ImageNet class (1,300 images) and per drmi reduce k-means cluster
DEFAULT_TILE_SIZE = 1300


# ----------------------------------------------------------------------------------------------
# Tiles: the plain compute function the Ray task calls


def tile_pairs(n: int, tile_size: int, i: int, j: int) -> int:
    """Pairs u < v that tile (i, j) computes (a diagonal tile: its upper triangle)."""
    rows, cols = tile_shape(n, tile_size, i, j)
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


def _tile_task(codes, sums, i, j, tile_size, bins, dtype, url, num_cpus, fingerprint):
    """One Ray task: compute and write tile (i, j) (the driver holds its claim). Returns (i, j, pairs)."""
    fs, root = fsspec.core.url_to_fs(url)
    device = None
    if ray.get_gpu_ids():
        import torch  # only on a GPU task

        device = "cuda" if torch.cuda.is_available() else None
    use_cpus(num_cpus)
    block = compute_tile(codes, sums, i, j, tile_size, bins, device=device)
    write_tile(fs, root, i, j, block, dtype, fingerprint)
    return i, j, tile_pairs(len(codes), tile_size, i, j)


# ----------------------------------------------------------------------------------------------
# The job


def compute_mi_matrix(images, store_url: str, *, bins: int = LEVELS, color: str = "flatten",
                      tile_size: int = DEFAULT_TILE_SIZE, max_in_flight: int | None = None,
                      gpus_per_tile: float = 0, num_cpus_per_task: float = 1,
                      dtype: str = "float64", progress: bool = True, check_data: bool = False,
                      claim_timeout_s: float = CLAIM_TIMEOUT_S) -> "TileStore":
    """Compute the pool's full pairwise-MI matrix into a tile store, one Ray task per tile.

    images: uint8 ``(n, H, W)``, ``(n, H, W, C)`` or ``(n, D)`` (validated like ``pairwise_mi``).
    store_url: folder (any fsspec URL) of the tile store; created, or continued when it holds a
        partial matrix of the same pool and settings (a mismatch is a ValueError). Existing tiles
        are checked (footer only) and bad ones recomputed (see ``drmi_ray.tiles``).
    bins, color: as in ``pairwise_mi``. tile_size: rows/columns per tile (default 1300; on GPUs
        4096 amortises the per-task cost better).
    max_in_flight: tasks submitted at once (default 2 × the cluster's CPUs, at least 4); with the
        pool put in the object store once, driver memory is the pool plus O(max_in_flight).
    gpus_per_tile: > 0 runs each tile on the task's GPU with the torch kernel (workers are
        kept across tasks so CUDA starts once per worker). num_cpus_per_task: numba threads per task.
    dtype: ``"float64"`` or ``"float32"`` storage (see ``drmi_ray.tiles``).
    progress: a tqdm bar with pairs/s and ETA, tiles done in its postfix.
    check_data: also read every existing tile's data and verify its page checksums (reads the whole
        store; catches bytes corrupted inside a tile, which the footer check cannot see).
    claim_timeout_s: age after which another driver's tile claim is taken over (default 600 s).
    Calls ``ray.init()`` when Ray is not running. Returns the ``TileStore``, whose ``computed``
    lists the tiles this call computed (the rest were already there, or written by another
    driver) and whose ``stats`` count them (``tiles_repaired``: bad tiles found and recomputed).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if isinstance(tile_size, bool) or not isinstance(tile_size, (int, np.integer)) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive integer, got {tile_size!r}")
    codes = to_codes(images, bins=bins, color=color, name="images")
    n = len(codes)
    fs, root = fsspec.core.url_to_fs(store_url)
    manifest = open_or_create(fs, root, store_url, new_manifest(images, codes, bins, color, tile_size, dtype))
    fingerprint = manifest["fingerprint"]

    init_ray()
    if gpus_per_tile and ray.cluster_resources().get("GPU", 0) < gpus_per_tile:
        raise ValueError(f"gpus_per_tile={gpus_per_tile} but the Ray cluster has "
                         f"{ray.cluster_resources().get('GPU', 0)} GPUs; use 0 for the CPU kernel")
    if max_in_flight is None:
        max_in_flight = max(4, 2 * int(ray.cluster_resources().get("CPU", 1)))

    def problem(i, j, data=False):
        return tile_problem(fs, tile_path(root, i, j), fingerprint, i, j, tile_shape(n, tile_size, i, j),
                            dtype, data=data)

    grid = tile_grid(n, tile_size)
    present = present_tiles(fs, root)
    bad = {t: p for t in grid if t in present and (p := problem(*t, data=check_data))}
    todo = [t for t in grid if t not in present or t in bad]
    if bad:
        log.warning(f"MI store {store_url}: repairing {len(bad)} bad tiles (e.g. tile {next(iter(bad))}: "
                    f"{next(iter(bad.values()))})")
    # GPU tasks default to a fresh worker per call (CUDA start-up per tile); max_calls=0 keeps them
    task = ray.remote(max_calls=0)(_tile_task) if gpus_per_tile else ray.remote(_tile_task)
    task = task.options(num_cpus=num_cpus_per_task, num_gpus=gpus_per_tile, max_retries=3)
    codes_ref, sums_ref = ray.put(codes), ray.put(entropy_sums(codes, bins))  # once, shared by all tasks
    claims = TileClaims(fs, root, claim_timeout_s)
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
        manifest = open_or_create(fs, root, url, new_manifest(images, codes, bins, color, tile_size, dtype))
        path = tile_path(root, 0, 0)
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


# ----------------------------------------------------------------------------------------------
# Many matrices at once: one per partition of a pool (drmi reduce)

def _bundle_task(items, bins, color, tile_size, dtype):
    """One Ray task: the one-tile stores of a bundle of small partitions."""
    use_cpus(1)
    device = "cuda" if ray.get_gpu_ids() else None
    return compute_small_stores(items, bins=bins, color=color, tile_size=tile_size, dtype=dtype, device=device)


def bundles(sizes: dict[str, int], tile_size: int, cpus: int) -> list[list[str]]:
    """Small matrices (one tile each; ``sizes``: name -> images) grouped so that every bundle holds
    about one full tile's pairs (tile_size^2 / 2), or less when that leaves fewer than two bundles
    per CPU: many small partitions share one task instead of paying its cost each, and every CPU
    still gets work."""
    total = sum(n * (n - 1) // 2 for n in sizes.values())
    target = max(1, min(tile_size * tile_size // 2, total // (2 * max(cpus, 1))))
    out, current, pairs = [], [], 0
    for name in sorted(sizes, key=lambda name: -sizes[name]):
        current.append(name)
        pairs += sizes[name] * (sizes[name] - 1) // 2
        if pairs >= target:
            out.append(current)
            current, pairs = [], 0
    return out + ([current] if current else [])


def compute_stores(images: np.ndarray, members: dict[str, np.ndarray], root: str, *, bins: int = LEVELS,
                   color: str = "flatten", tile_size: int = DEFAULT_TILE_SIZE, max_in_flight: int | None = None,
                   gpus_per_tile: float = 0.0, dtype: str = "float64", parallel: int = 4) -> tuple[dict, dict]:
    """The MI matrix of each group of ``images`` rows (``members``: name -> row indices, two or
    more) in its own tile store ``{root}/NAME``.

    Groups of at most ``tile_size`` images are computed in bundles, one Ray task per bundle
    (``compute_small_stores``); larger ones by ``compute_mi_matrix``, ``parallel`` at once so they
    still fill the cluster. Every store is the same either way (and resumable). Returns
    ``({name: store URL}, {"pairs", "pairs_computed", "seconds"})``.
    """
    sizes = {name: len(rows) for name, rows in members.items()}
    stores = {name: f"{root}/{name}" for name in members}
    small = {name: n for name, n in sizes.items() if n <= tile_size}
    large = [name for name, n in sizes.items() if n > tile_size]
    cpus = int(ray.cluster_resources().get("CPU", 1))
    groups = bundles(small, tile_size, cpus)
    pairs = sum(n * (n - 1) // 2 for n in sizes.values())
    log.info(f"MI: {len(sizes)} partition(s), {pairs:,} pairs: {len(small)} small ones in {len(groups)} task(s), "
             f"{len(large)} of several tiles of {tile_size} ({parallel} at a time)")
    state, lock = {"done": 0, "computed": 0, "partitions": 0}, threading.Lock()
    t0 = time.perf_counter()

    def progress(finished: list[str], computed: int) -> None:  # called from the pool's threads
        with lock:
            state["done"] += sum(sizes[name] * (sizes[name] - 1) // 2 for name in finished)
            state["computed"] += computed
            state["partitions"] += len(finished)
            el = time.perf_counter() - t0
            log.info(f"MI: {state['partitions']}/{len(sizes)} partitions, {state['done']:,}/{pairs:,} pairs, "
                     f"{state['computed'] / max(el, 1e-9):,.0f} pairs/s computed, "
                     f"ETA {(pairs - state['done']) * el / max(state['done'], 1):.0f} s")

    def one_large(name: str) -> None:
        store = compute_mi_matrix(images[members[name]], stores[name], bins=bins, color=color,
                                  tile_size=tile_size, max_in_flight=max_in_flight, gpus_per_tile=gpus_per_tile,
                                  dtype=dtype, progress=parallel <= 1)
        progress([name], store.stats["pairs"])

    def all_small() -> None:
        task = ray.remote(_bundle_task).options(num_cpus=1, num_gpus=gpus_per_tile, max_retries=3)

        def submit(group):
            items = ray.put([(images[members[name]], stores[name]) for name in group])
            return task.remote(items, bins, color, tile_size, dtype)

        for group, computed in bounded(submit, groups, max(2, 2 * cpus)):
            progress(group, sum(computed))

    with ThreadPoolExecutor(max_workers=max(1, parallel) + 1) as ex:
        for done in as_completed([ex.submit(one_large, name) for name in large] + [ex.submit(all_small)]):
            done.result()
    return stores, {"pairs": pairs, "pairs_computed": state["computed"], "seconds": time.perf_counter() - t0}
