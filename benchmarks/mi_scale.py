"""Wall time, pairs/s and peak memory of the tiled Ray MI job as the pool grows.

    python benchmarks/mi_scale.py                          # pools of 2k, 5k, 10k images
    python benchmarks/mi_scale.py --sizes 2000 5000 10000 20000 --tile-size 1024
    python benchmarks/mi_scale.py --sizes 60000 --dtype float32 --store /data/s   # 7.3 GB of tiles

With --store, a rerun after a kill continues each store: the tiles column then reads
"computed/total" and pairs/s counts only the pairs this run computed.

Pools beyond the 5,000 bundled real digits are the same digits shifted by up to ±2 pixels
(np.roll), so they stay digit-like. Flat pairs/s across sizes means the O(N²) pairs are all the
cost; flat driver memory means the driver holds only the pool and the tasks in flight.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from drmi_ray.data import bundled_mnist  # noqa: E402
from drmi_ray.matrix import DEFAULT_TILE_SIZE, DTYPES, TileStore, compute_mi_matrix  # noqa: E402
from drmi_ray.mi import pairwise_mi  # noqa: E402


def shifted_pool(n: int, seed: int = 0) -> np.ndarray:
    """n digit images: the bundled ones, then copies shifted by −2..2 pixels in each direction."""
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000, 10000])
    p.add_argument("--tile-size", type=int, default=DEFAULT_TILE_SIZE)
    p.add_argument("--num-cpus", type=int, default=None, help="Ray CPUs (default: all)")
    p.add_argument("--store", default=None, help="folder for the stores (default: a temp dir)")
    p.add_argument("--dtype", choices=DTYPES, default="float64", help="tile storage (float32 halves the disk)")
    args = p.parse_args()

    import ray

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    cpus = int(ray.cluster_resources()["CPU"])
    base = args.store or tempfile.mkdtemp(prefix="mi-scale-")
    # warm-up: workers start and load the compiled kernel before anything is timed
    compute_mi_matrix(shifted_pool(600), os.path.join(base, "warmup"), tile_size=200, progress=False)

    print(f"tiled Ray MI job, tile_size {args.tile_size}, {cpus} Ray CPUs on {os.cpu_count()} cores; stores in {base}")
    print(f"{'images':>8s} {'pairs':>14s} {'tiles':>9s} {'wall s':>8s} {'pairs/s':>12s} "
          f"{'driver peak MB':>15s} {'job peak MB':>12s} {'store MB':>9s}")
    for n in args.sizes:
        images = shifted_pool(n)
        url = os.path.join(base, f"n{n}")
        with PeakMemory() as mem:
            start = time.perf_counter()
            store = compute_mi_matrix(images, url, tile_size=args.tile_size, dtype=args.dtype, progress=False)
            wall = time.perf_counter() - start
        pairs, computed, skipped = (store.stats[k] for k in ("pairs", "tiles_computed", "tiles_skipped"))
        tiles_column = f"{computed}/{computed + skipped}" if skipped else str(computed)
        size = sum(os.path.getsize(os.path.join(url, "tiles", f)) for f in os.listdir(os.path.join(url, "tiles")))
        print(f"{n:8d} {pairs:14,d} {tiles_column:>9s} {wall:8.1f} {pairs / wall:12,.0f} "
              f"{mem.driver / 2**20:15.0f} {mem.job / 2**20:12.0f} {size / 2**20:9.0f}", flush=True)
        # spot check: two rows read back from the store equal the direct computation
        rows = [0, n - 1]
        direct = pairwise_mi(images[rows], images).astype(args.dtype)
        assert np.array_equal(TileStore(url).read_rows(rows), direct), "store rows differ from pairwise_mi"


if __name__ == "__main__":
    main()
