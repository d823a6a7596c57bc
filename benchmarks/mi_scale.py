"""Wall time, pairs/s and peak memory of the tiled Ray MI job as the pool grows.

    python benchmarks/mi_scale.py                          # pools of 2k, 5k, 10k images
    python benchmarks/mi_scale.py --sizes 2000 5000 10000 20000 --tile-size 1024
    python benchmarks/mi_scale.py --sizes 60000 --dtype float32 --store /data/s   # 7.3 GB of tiles
    python benchmarks/mi_scale.py --gpu --sizes 60000 --dtype float32   # tiles on this machine's GPU

With --store, a rerun after a kill continues each store: the tiles column then reads
"computed/total" and pairs/s counts only the pairs this run computed. Without it the stores go to
a temporary folder that is removed at the end.

Pools beyond the 5,000 bundled real digits are copies of them shifted by a different (dy, dx) in
−2..2 each (np.roll; 24 shifts, so up to 125,000 images), so they stay digit-like; the table
counts the exact duplicates. Flat pairs/s across sizes means the O(N²) pairs are all the cost;
flat driver memory means the driver holds only the pool and the tasks in flight.

The ratio column is against a reference timed in this process on this machine before the jobs:
the same kernel computing one off-diagonal tile (tile_size² pairs, ``matrix.compute_tile``) in the
driver, without Ray or the store, so it reads as the job's efficiency. With --gpu a second ratio
is against the numba CPU kernel on all this machine's cores, also timed here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from drmi_ray.data import bundled_mnist  # noqa: E402
from drmi_ray.matrix import DEFAULT_TILE_SIZE, compute_mi_matrix, compute_tile  # noqa: E402
from drmi_ray.mi import LEVELS, pairwise_mi, to_codes  # noqa: E402
from drmi_ray.mi_cpu import entropy_sums, joint_sums_cpu  # noqa: E402
from drmi_ray.tiles import DTYPES, TileStore  # noqa: E402

SHIFTS = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if (dy, dx) != (0, 0)]


def scale_pool(n: int) -> np.ndarray:
    """n digit images: the 5,000 bundled ones, then copies of them shifted by SHIFTS[0], SHIFTS[1], …"""
    digits = bundled_mnist()[0]
    copies = -(-n // len(digits)) - 1
    if copies > len(SHIFTS):
        raise ValueError(f"at most {len(digits) * (len(SHIFTS) + 1)} images, asked for {n}")
    out = [digits] + [np.roll(digits, SHIFTS[k], axis=(1, 2)) for k in range(copies)]
    return np.concatenate(out)[:n]


def distinct_rows(x: np.ndarray) -> int:
    return len(np.unique(x.reshape(len(x), -1), axis=0))


def shifted_pool(n: int, seed: int = 0) -> np.ndarray:
    """n digit images: the bundled ones, then copies shifted by random −2..2 pixels in each
    direction (may repeat a shift, so may hold exact duplicates; used by chaos.py)."""
    digits = bundled_mnist()[0]
    rng = np.random.default_rng(seed)
    out = [digits]
    while sum(len(x) for x in out) < n:
        dy, dx = rng.integers(-2, 3, size=2)
        out.append(np.roll(digits, (int(dy), int(dx)), axis=(1, 2)))
    return np.concatenate(out)[:n]


def _rss_tree(root: int) -> tuple[int, int]:
    """(RSS of root, RSS of root and all its descendants) in bytes, read from /proc (Linux)."""
    parent, rss = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/statm") as f:
                rss[int(pid)] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier and p not in tree]
        tree.update(kids)
        frontier = kids
    return rss.get(root, 0), sum(rss.get(p, 0) for p in tree)


class PeakMemory:
    """Samples RSS of this process and of all its descendants (the local Ray cluster) every 0.2 s."""

    def __init__(self):
        self.driver = self.job = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            driver, job = _rss_tree(os.getpid())
            self.driver, self.job = max(self.driver, driver), max(self.job, job)
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def timed(fn, min_seconds=1.0):
    """Seconds per call of fn: repeated until min_seconds have passed, after one warm-up."""
    fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        if time.perf_counter() - start >= min_seconds:
            return (time.perf_counter() - start) / calls


def references(tile_size: int, gpu: bool) -> dict:
    """Pairs/s timed here, before the jobs: one off-diagonal tile in the driver (the job's kernel,
    no Ray, no store) and, with a GPU, the numba CPU kernel on all cores."""
    import numba

    t = tile_size
    codes = to_codes(scale_pool(2 * t))
    sums = entropy_sums(codes, LEVELS)
    device = None
    if gpu:
        import torch

        device = "cuda"

        def tile():
            compute_tile(codes, sums, 0, 1, t, LEVELS, device=device)
            torch.cuda.synchronize()
    else:
        def tile():
            compute_tile(codes, sums, 0, 1, t, LEVELS)
    refs = {"kernel": t * t / timed(tile)}
    if gpu:
        rows = max(1, min(t, 64))
        refs["numba"] = rows * t / timed(lambda: joint_sums_cpu(codes[:rows], codes[t:], LEVELS))
    refs["threads"] = numba.get_num_threads()
    return refs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000, 10000])
    p.add_argument("--tile-size", type=int, default=None, help=f"default {DEFAULT_TILE_SIZE}, 4096 with --gpu")
    p.add_argument("--num-cpus", type=int, default=None, help="Ray CPUs (default: all)")
    p.add_argument("--gpu", action="store_true", help="tiles on this machine's GPU (Ray tasks with num_gpus)")
    p.add_argument("--gpus-per-task", type=float, default=0.25,
                   help="with --gpu: GPU share per tile task (0.25: 4 tiles in flight, so one writes "
                        "its tile while another computes)")
    p.add_argument("--store", default=None, help="folder for the stores (default: a temp dir, removed)")
    p.add_argument("--dtype", choices=DTYPES, default="float64", help="tile storage (float32 halves the disk)")
    args = p.parse_args()
    tile_size = args.tile_size or (4096 if args.gpu else DEFAULT_TILE_SIZE)
    gpus = args.gpus_per_task if args.gpu else 0

    import ray

    where = f"{socket.gethostname()}, {os.cpu_count()} CPUs"
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            sys.exit("--gpu: no CUDA device")
        where += f", {torch.cuda.get_device_name()}"
    refs = references(tile_size, args.gpu)
    kernel = "GPU kernel (mi_gpu.joint_sums_torch, auto)" if args.gpu else f"numba CPU kernel, {refs['threads']} threads"
    print(f"machine: {where}; load average {os.getloadavg()[0]:.1f}")
    print(f"reference timed here: {kernel} on one {tile_size}x{tile_size} off-diagonal tile in the driver "
          f"(no Ray, no store): {refs['kernel']:,.0f} pairs/s")
    if args.gpu:
        print(f"reference timed here: numba CPU kernel, {refs['threads']} threads: {refs['numba']:,.0f} pairs/s")

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    cpus = int(ray.cluster_resources()["CPU"])
    base = args.store or tempfile.mkdtemp(prefix="mi-scale-")
    # warm-up: workers start and load the compiled kernel before anything is timed
    compute_mi_matrix(scale_pool(600), os.path.join(base, "warmup"), tile_size=200, progress=False,
                      gpus_per_tile=gpus)

    print(f"tiled Ray MI job, tile_size {tile_size}, {cpus} Ray CPUs"
          + (f", {gpus} GPU per tile task" if gpus else "") + f", {args.dtype} tiles; stores in {base}")
    print("pool: the 5,000 bundled real MNIST digits (28x28), then copies shifted by a different "
          "(dy, dx) in -2..2 each")
    print(f"{'images':>8s} {'distinct':>9s} {'pairs':>14s} {'tiles':>9s} {'wall s':>8s} {'pairs/s':>12s} "
          f"{'x kernel':>9s}" + (f" {'x numba':>8s}" if args.gpu else "")
          + f" {'driver peak MB':>15s} {'job peak MB':>12s} {'store MB':>9s}")
    try:
        for n in args.sizes:
            images = scale_pool(n)
            url = os.path.join(base, f"n{n}")
            with PeakMemory() as mem:
                start = time.perf_counter()
                store = compute_mi_matrix(images, url, tile_size=tile_size, dtype=args.dtype, progress=False,
                                          gpus_per_tile=gpus)
                wall = time.perf_counter() - start
            pairs, computed, skipped = (store.stats[k] for k in ("pairs", "tiles_computed", "tiles_skipped"))
            tiles_column = f"{computed}/{computed + skipped}" if skipped else str(computed)
            tiles_dir = os.path.join(url, "tiles")
            size = sum(os.path.getsize(os.path.join(tiles_dir, f)) for f in os.listdir(tiles_dir))
            rate = pairs / wall
            print(f"{n:8d} {distinct_rows(images):9d} {pairs:14,d} {tiles_column:>9s} {wall:8.1f} {rate:12,.0f} "
                  f"{rate / refs['kernel']:9.2f}" + (f" {rate / refs['numba']:8.1f}" if args.gpu else "")
                  + f" {mem.driver / 2**20:15.0f} {mem.job / 2**20:12.0f} {size / 2**20:9.0f}", flush=True)
            # spot check: two rows read back from the store equal the direct computation
            rows = [0, n - 1]
            direct = pairwise_mi(images[rows], images).astype(args.dtype)
            assert np.array_equal(TileStore(url).read_rows(rows), direct), "store rows differ from pairwise_mi"
    finally:
        if args.store is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
