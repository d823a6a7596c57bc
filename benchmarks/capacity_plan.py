"""Capacity plan: what the MI matrix costs for ImageNet-1k and CIFAR-10, from measured throughput.

    python benchmarks/capacity_plan.py                       # measure CPU here, GPU from --gpu-pairs-per-s
    python benchmarks/capacity_plan.py --gpu-pairs-per-s 64x64:2.1e6,32x32x3:2.7e6 --gpus 1,8,64

For each scenario (pool size, resolution, partitioning) it prints: pairs, tiles, GPU-hours, the
tile store's size and the wall time on N GPUs (and on the CPU of this machine, for scale).

Inputs, all printed with the table:
  * CPU pairs/s: measured here by ``compute_mi_matrix`` (Ray tasks, tile store on local disk,
    everything included) on ``--measure-n`` synthetic natural-like images (smoothed random fields,
    full 0..255 range: their joint histograms spread like photographs', unlike digits' mostly
    black background) at each scenario's resolution; or given with ``--cpu-pairs-per-s``.
  * GPU pairs/s per GPU at each resolution: measured on an H100/H200 with ``--measure-gpu`` (one
    tile's task body: ``matrix.compute_tile`` with the torch kernel + ``write_tile``, no Ray, so it
    runs where Ray is not installed) or given with ``--gpu-pairs-per-s RES:RATE,...``.
    Without either, the figures recorded on one H200 (``H200_PAIRS_PER_S``) are used for --size 64.
  * per-tile overhead (Ray scheduling, the tile's PUT to the store): ``--tile-overhead-s``.
  * tile side ``--tile-size`` (default 1300 per class partition: one tile per class; 4096 for
    global matrices) and
    bytes per stored MI value (``--bytes-per-value``: 8 by default, the tile store's float64; 4 with
    ``--store-dtype float32``; tiles are written uncompressed).

Model: wall time on G GPUs = tiles/G rounded up x (tile pairs / rate + overhead); per-class
partitions have few tiles each, so they are scheduled across partitions (one tile queue for all).
GPU-hours = G x wall time. Storage = tiles x tile_size² x bytes (diagonal tiles stored square).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

IMAGENET_TRAIN = 1_281_167  # ILSVRC-2012 train images
IMAGENET_CLASSES = 1000
CIFAR10_TRAIN = 50_000
# Measured on one NVIDIA H200 (device tool, 2026-11-26, mi.py's default CUDA path: Triton for
# d <= 4096, sort-search above): one tile's task body (torch kernel + Parquet write, no Ray) on
# natural-like images, 256 levels; 2048- and 4096-wide tiles within 3% (mean taken).
H200_PAIRS_PER_S = {"64x64": 4.24e6, "64x64x3": 1.15e6, "32x32x3": 4.36e6}


@dataclass
class Scenario:
    name: str
    n_images: int
    partitions: int  # equal-size partitions (1 = global)
    shape: tuple  # (H, W) or (H, W, C): what one image is at the MI resolution
    tile_size: int

    @property
    def res(self) -> str:
        return "x".join(map(str, self.shape))

    @property
    def d(self) -> int:
        return int(np.prod(self.shape))


def partition_sizes(n: int, parts: int) -> list[int]:
    base, extra = divmod(n, parts)
    return [base + 1] * extra + [base] * (parts - extra)


def count(s: Scenario) -> dict:
    """Pairs (i<j), tiles (upper triangle incl. diagonal tiles), stored values."""
    pairs = tiles = stored = 0
    sizes = partition_sizes(s.n_images, s.partitions)
    for n, reps in ((sz, sizes.count(sz)) for sz in sorted(set(sizes))):
        b = math.ceil(n / s.tile_size)
        pairs += reps * n * (n - 1) // 2
        tiles += reps * b * (b + 1) // 2
        stored += reps * _stored_values(n, s.tile_size)
    return {"pairs": pairs, "tiles": tiles, "stored_values": stored,
            "partition_size": sizes[0], "tile_pairs": pairs / tiles}


def _stored_values(n: int, t: int) -> int:
    edges = [min(t, n - i) for i in range(0, n, t)]
    return sum(edges[i] * edges[j] for i in range(len(edges)) for j in range(i, len(edges)))


def plan_row(s: Scenario, rate: float | None, gpus: int, overhead_s: float, bytes_per_value: int) -> dict:
    c = count(s)
    row = {"scenario": s.name, "res": s.res, "pairs": c["pairs"], "tiles": c["tiles"],
           "storage_gb": c["stored_values"] * bytes_per_value / 1e9, "gpus": gpus}
    if rate is None:
        row.update(gpu_hours=None, wall_h=None)
        return row
    per_tile = c["tile_pairs"] / rate + overhead_s
    waves = math.ceil(c["tiles"] / gpus)
    wall = waves * per_tile
    row.update(gpu_hours=c["tiles"] * per_tile / 3600, wall_h=wall / 3600)
    return row


# --------------------------------------------------------------------------- measuring

def natural_like(n: int, shape: tuple, seed: int = 0) -> np.ndarray:
    """Smoothed random fields stretched to 0..255: a stand-in for photographs (no data set here)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    h, w = shape[:2]
    c = shape[2] if len(shape) == 3 else 1
    out = np.empty((n, h, w, c), dtype=np.uint8)
    for i in range(n):
        x = gaussian_filter(rng.standard_normal((h, w, c)), sigma=(h / 16, w / 16, 0.7))
        x += 0.15 * rng.standard_normal((h, w, c))
        lo, hi = np.percentile(x, (1, 99))
        out[i] = np.clip((x - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8)
    return out[..., 0] if len(shape) == 2 else out


def measure_cpu(shape: tuple, n: int, tile_size: int) -> float:
    """pairs/s of compute_mi_matrix (Ray tasks + tile store) on this machine."""
    import ray

    from drmi_ray.matrix import compute_mi_matrix

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    images = natural_like(n, shape)
    compute_mi_matrix(images[:tile_size], tempfile.mkdtemp(prefix="cap-warm-"), tile_size=tile_size,
                      progress=False)  # compile the kernels in the workers
    with tempfile.TemporaryDirectory(prefix="cap-") as tmp:
        t0 = time.perf_counter()
        compute_mi_matrix(images, f"{tmp}/mi", tile_size=tile_size, progress=False)
        seconds = time.perf_counter() - t0
    return n * (n - 1) / 2 / seconds


def measure_tile(shape: tuple, tile: int, device=None, repeats: int = 2) -> float:
    """pairs/s of one off-diagonal tile's task body without Ray: ``matrix.compute_tile`` (numba
    CPU kernel with ``device=None``, torch kernel on ``device``) plus ``write_tile`` (Parquet on
    local disk), the best of ``repeats`` after a warm-up."""
    import fsspec

    from drmi_ray.matrix import compute_tile, write_tile
    from drmi_ray.mi import entropy_sums, to_codes

    images = natural_like(2 * tile, shape)
    codes = to_codes(images)
    sums = entropy_sums(codes, 256)
    fs = fsspec.filesystem("file")
    best = float("inf")
    with tempfile.TemporaryDirectory(prefix="cap-tile-") as tmp:
        fs.makedirs(f"{tmp}/tiles", exist_ok=True)
        compute_tile(codes[: tile // 8], sums[: tile // 8], 0, 1, tile // 16, 256, device=device)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            block = compute_tile(codes, sums, 0, 1, tile, 256, device=device)
            write_tile(fs, tmp, 0, 1, block, "float64")
            best = min(best, time.perf_counter() - t0)
    return tile * tile / best


# --------------------------------------------------------------------------- table

def fmt(x, spec: str) -> str:
    return "unknown" if x is None else format(x, spec)


def scenarios(size: int, imagenet_tile: int, global_tile: int) -> list[Scenario]:
    return [
        Scenario(f"ImageNet-1k, per class ({IMAGENET_CLASSES} partitions)", IMAGENET_TRAIN, IMAGENET_CLASSES,
                 (size, size), imagenet_tile),
        Scenario(f"ImageNet-1k, per class, RGB", IMAGENET_TRAIN, IMAGENET_CLASSES, (size, size, 3), imagenet_tile),
        Scenario("ImageNet-1k, global", IMAGENET_TRAIN, 1, (size, size), global_tile),
        Scenario("CIFAR-10 train, global", CIFAR10_TRAIN, 1, (32, 32, 3), global_tile),
    ]


def parse_rates(text: str | None) -> dict:
    rates = {}
    for item in (text or "").split(","):
        if item.strip():
            res, rate = item.split(":")
            rates[res.strip()] = float(rate)
    return rates


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64, help="ImageNet MI resolution (default 64x64)")
    p.add_argument("--tile-size", type=int, default=1300,
                   help="tile side for per-class partitions (default 1300: one tile per ImageNet class)")
    p.add_argument("--global-tile-size", type=int, default=4096, help="tile side for global matrices (default 4096)")
    p.add_argument("--gpus", default="1,8,64", help="GPU counts for the wall-time columns (default 1,8,64)")
    p.add_argument("--cpu-pairs-per-s", help="RES:RATE,... instead of measuring here (RES like 64x64, 32x32x3)")
    p.add_argument("--gpu-pairs-per-s", help="RES:RATE,... per GPU, e.g. from notes/mi_engine.md")
    p.add_argument("--gpu-source", default="", help="where the GPU rates come from (printed)")
    p.add_argument("--cpu-source", default="", help="where the CPU rates come from (printed)")
    p.add_argument("--measure-gpu", action="store_true", help="measure the GPU rates on this machine's GPU")
    p.add_argument("--gpu-tile", type=int, default=2048, help="tile side for --measure-gpu (default 2048)")
    p.add_argument("--measure-tile-cpu", action="store_true",
                   help="measure CPU rates as one tile's task body without Ray (numba, all cores), not compute_mi_matrix")
    p.add_argument("--measure-n", type=int, default=384, help="images per CPU measurement (default 384)")
    p.add_argument("--tile-overhead-s", type=float, default=0.1,
                   help="fixed cost per tile task (default 0.1 s: 6 ms measured here with a local store, "
                        "0.1 s allowed for an object-store PUT on a cluster)")
    p.add_argument("--bytes-per-value", type=int, default=8,
                   help="bytes per stored MI value (default 8: the tile store's float64; 4 with --store-dtype float32)")
    args = p.parse_args(argv)

    scen = scenarios(args.size, args.tile_size, args.global_tile_size)
    resolutions = list(dict.fromkeys(s.res for s in scen))
    shapes = {s.res: s.shape for s in scen}
    cpu = parse_rates(args.cpu_pairs_per_s)
    cpu_source = (args.cpu_source or "given (--cpu-pairs-per-s)") if cpu else ""
    if not cpu and args.measure_tile_cpu:
        cpu_source = f"measured here: one 512x512 tile's task body (numba, no Ray), {os.cpu_count()} CPU cores"
        cpu = {res: measure_tile(shapes[res], 512) for res in resolutions}
    elif not cpu:
        cpu_source = (f"measured here: compute_mi_matrix on {args.measure_n} natural-like images per resolution, "
                      f"tile {min(args.measure_n, 256)}, {os.cpu_count()} CPU cores")
        for res in resolutions:
            cpu[res] = measure_cpu(shapes[res], args.measure_n, min(args.measure_n, 256))
    gpu = parse_rates(args.gpu_pairs_per_s)
    gpu_source = args.gpu_source or "given (--gpu-pairs-per-s)"
    if not gpu and not args.measure_gpu:
        gpu = dict(H200_PAIRS_PER_S) if args.size == 64 else {}
        gpu_source = ("recorded: one NVIDIA H200, one tile's task body (torch kernel + Parquet write), "
                      "2026-11-26; see notes/cluster.md" if gpu else "unknown at this --size (pass --gpu-pairs-per-s)")
    if args.measure_gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--measure-gpu: no CUDA device here")
        gpu = {res: measure_tile(shapes[res], args.gpu_tile, device="cuda") for res in resolutions}
        gpu_source = (f"measured here on {torch.cuda.get_device_name(0)}: one {args.gpu_tile}x{args.gpu_tile} "
                      "tile (torch kernel + Parquet write, no Ray) per resolution")
    gpu_counts = [int(g) for g in args.gpus.split(",")]

    print("# Capacity plan: the MI matrix for ImageNet-1k and CIFAR-10\n")
    print("Inputs:")
    print(f"- ImageNet-1k train: {IMAGENET_TRAIN:,} images, {IMAGENET_CLASSES} classes (~{IMAGENET_TRAIN // IMAGENET_CLASSES:,} per class); "
          f"CIFAR-10 train: {CIFAR10_TRAIN:,} images at 32x32x3")
    print(f"- MI resolution for ImageNet: {args.size}x{args.size} grey (and RGB flattened); 256 levels")
    print(f"- tiles: {args.tile_size} per class partition, {args.global_tile_size} for global matrices; "
          f"{args.bytes_per_value} bytes per stored value; {args.tile_overhead_s} s fixed cost per tile")
    if cpu_source.startswith("measured here"):
        print(f"- load average here while measuring: {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
              f"(other work on the machine slows the CPU figures)")
    print(f"- CPU pairs/s ({cpu_source}): " + ", ".join(f"{r} {cpu[r]:,.0f}" for r in resolutions))
    print(f"- GPU pairs/s per GPU ({gpu_source}): "
          + (", ".join(f"{r} {gpu[r]:,.0f}" for r in resolutions if r in gpu) or "unknown"))
    print()
    head = ("| scenario | MI res | pairs | tiles | tile store | wall, CPU source | GPU-hours | "
            + " | ".join(f"wall, {g} GPU{'s' if g > 1 else ''}" for g in gpu_counts) + " |")
    print(head)
    print("|" + "---|" * 2 + "---:|" * (head.count("|") - 3))
    for s in scen:
        c = count(s)
        cpu_h = c["pairs"] / cpu[s.res] / 3600  # the CPU source's machine, all its cores
        rows = [plan_row(s, gpu.get(s.res), g, args.tile_overhead_s, args.bytes_per_value) for g in gpu_counts]
        walls = " | ".join(_hours(r["wall_h"]) for r in rows)
        print(f"| {s.name} | {s.res} | {c['pairs']:.3g} | {c['tiles']:,} | {_bytes(rows[0]['storage_gb'])} | "
              f"{_hours(cpu_h)} | {fmt(rows[0]['gpu_hours'], ',.1f')} | {walls} |")
    print()
    per_class = count(scen[0])
    glob = count(scen[2])
    print(f"Per-class partitioning computes {glob['pairs'] / per_class['pairs']:,.0f}x fewer pairs than the global "
          f"ImageNet matrix ({per_class['pairs']:.3g} vs {glob['pairs']:.3g}); each class's matrix "
          f"({per_class['partition_size']:,}^2 float64 = {per_class['partition_size'] ** 2 * 8 / 1e6:.0f} MB) fits in memory for selection.")
    return 0


def _hours(h) -> str:
    if h is None:
        return "unknown"
    if h < 1 / 60:
        return f"{h * 3600:.0f} s"
    if h < 1:
        return f"{h * 60:.0f} min"
    if h < 48:
        return f"{h:.1f} h"
    return f"{h / 24:.0f} days"


def _bytes(gb: float) -> str:
    if gb >= 1000:
        return f"{gb / 1000:.1f} TB"
    if gb >= 1:
        return f"{gb:.1f} GB"
    return f"{gb * 1000:.0f} MB"


if __name__ == "__main__":
    sys.exit(main())
