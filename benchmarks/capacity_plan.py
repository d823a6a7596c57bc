"""Capacity plan: what decoding and the MI matrix cost for ImageNet-1k and CIFAR-10, from measured throughput.

    python benchmarks/capacity_plan.py                       # measure CPU here; GPU and decode rates recorded
    python benchmarks/capacity_plan.py --gpu-pairs-per-s 64x64:2.1e6,32x32x3:2.7e6 --gpus 1,8,64
    python benchmarks/capacity_plan.py --decode-images-per-s-per-core 400 --decode-source "reduce_scale, 16 cores"

For each scenario (pool size, resolution, partitioning) it prints: pairs, the pair values each
kernel computes, tiles, GPU-hours, the tile store's size and the wall time on N GPUs (and on the
CPU of the machine the CPU rate comes from, for scale); then the decode stage of the 1.28M ImageNet
train images on the node types of cluster.yaml.

Every rate is printed with where it comes from: "measured here" (this run, this machine),
"recorded" (a named earlier measurement: its machine and the command that produced it, kept in
``RECORDED`` below), "given" (a command-line option; its ``--*-source`` text is printed) or
"assumed" (a placeholder nobody measured).

Inputs, all printed with the table:
  * CPU pairs/s: measured here by ``compute_mi_matrix`` (Ray tasks, tile store on local disk,
    everything included) on ``--measure-n`` synthetic natural-like images (smoothed random fields,
    full 0..255 range: their joint histograms spread like photographs', unlike digits' mostly
    black background) at each scenario's resolution; or given with ``--cpu-pairs-per-s``.
  * GPU pairs/s per GPU at each resolution (an off-diagonal tile's tile_size² / s): measured on an H100/H200 with ``--measure-gpu`` (one
    tile's task body: ``matrix.compute_tile`` with the torch kernel + ``write_tile``, no Ray, so it
    runs where Ray is not installed) or given with ``--gpu-pairs-per-s RES:RATE,...``.
    Without either, the figures recorded on one H200 (``RECORDED["h200-tile"]``) are used for --size 64.
  * decode rate, images/s per CPU core (read + decode + resize one ImageNet-sized JPEG,
    ``data.decode_image``): ``--decode-images-per-s-per-core``; default ``DECODE_IMAGES_PER_S_PER_CORE``
    (``RECORDED["decode-photos10k"]``). ``benchmarks/reduce_scale.py`` measures it
    ("images per CPU-second" of the photos tree).
  * per-tile overhead (Ray scheduling, the tile's PUT to the store): ``--tile-overhead-s`` (default
    ``TILE_OVERHEAD_S`` = 0.1 s, assumed).
  * tile side ``--tile-size`` (default 1300 per class partition: one tile per class; 4096 for
    global matrices) and
    bytes per stored MI value (``--bytes-per-value``: 8 by default, the tile store's float64; 4 with
    ``--store-dtype float32``; tiles are written uncompressed).

Pairs the kernels compute: both the numba CPU kernel (``mi_cpu.joint_sums_cpu``) and the default GPU
kernel (``mi_gpu.joint_sums_torch`` with ``method="triton"``) compute only the upper triangle u < v of a
diagonal tile (``codes_b=None``) and mirror it, so time = pairs (u < v) / rate on either. (The torch
fallbacks, sort and one-hot, compute a diagonal tile by row chunks, somewhat over half of it; the
plan assumes the Triton kernel.) The rates are measured on an off-diagonal tile (tile_size² pairs).

Model: wall time on G GPUs = tiles/G rounded up x (mean pairs per tile / rate + overhead);
per-class partitions have few tiles each, so they are scheduled across partitions (one tile queue
for all). GPU-hours = G x wall time. Storage = tiles x tile_size² x bytes (diagonal tiles stored
square). Decode: 1,281,167 images / (rate per core x CPUs), CPUs from cluster.yaml's node types
(the head has CPU 0: it runs no tasks); the read bandwidth that rate needs per node is printed
beside it (files of ``--imagenet-file-kb``, assumed).
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

IMAGENET_TRAIN = 1_281_167  # ILSVRC-2012 train images
IMAGENET_CLASSES = 1000
IMAGENET_FILE_KB = 115  # assumed mean JPEG size of the train set (ILSVRC2012_img_train.tar: about 148 GB)
TILE_OVERHEAD_S = 0.1  # assumed fixed cost per tile task on a cluster (scheduling, the tile's PUT)
CIFAR10_TRAIN = 50_000
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Measurement:
    """A rate measured earlier: what, on which machine, with which command, when."""

    name: str
    values: dict  # resolution -> pairs/s, or "decode" -> images/s per core
    machine: str
    command: str
    what: str
    date: str
    status: str = "recorded"  # or "provisional": a figure to replace with a better run's

    def describe(self) -> str:
        return (f"{self.status}: measurement {self.name!r} ({self.date}; {self.machine}; {self.what}; "
                f"command: {self.command})")


RECORDED = {
    # mi.py's default CUDA path (Triton for d <= 4096, sort-search above) on natural_like images,
    # 256 levels; 2048- and 4096-wide tiles within 3% (mean taken). Printed by the command below;
    # the figures are kept only here (this file has held them since commit 8c96766). The machine's
    # hostname was not recorded: rerun the command on a GPU to replace them with a labelled run.
    "h200-tile": Measurement(
        "h200-tile", {"64x64": 4.24e6, "64x64x3": 1.15e6, "32x32x3": 4.36e6},
        machine="one NVIDIA H200, 16 CPU cores (the project's lent device machine; hostname not recorded)",
        command="python benchmarks/capacity_plan.py --measure-gpu --gpu-tile 2048, and --gpu-tile 4096",
        what="one off-diagonal tile's task body, matrix.compute_tile (torch/Triton) + write_tile, no Ray; "
             "pair values/s; the Triton kernel of then: commit 6dc4848 rewrote it (over non-zero positions) and "
             "the shipped kernel is not yet measured on a GPU", date="2026-11-26"),
    # The photos10k tree's one-process decode in the full reduce_scale run: 300 of the 10,000
    # synthetic 400x350 RGB JPEGs (~97 KB, quality 90) read and decoded to 64x64 grey with
    # data.decode_image, counted per CPU-second of the process. In the same run the job's Ray Data
    # decode stage did 455 images/s on the 2 cores (0.66 of 2 x 345: start-up and the driver).
    "decode-photos10k": Measurement(
        "decode-photos10k", {"decode": 345.0},
        machine="2-core shared container (hostname vm), Python 3.11, Pillow 13",
        command="python benchmarks/reduce_scale.py  (photos10k decode_one_process, images per CPU-second)",
        what="read + decode + resize to 64x64 grey of ~100 KB 400x350 JPEGs, one process, no Ray",
        date="2026-11-27"),
}
H200_PAIRS_PER_S = RECORDED["h200-tile"].values
# The decode rate the plan uses unless --decode-images-per-s-per-core is given: images/s one CPU
# core reads, decodes and resizes (ImageNet-sized JPEG -> 64x64). Plug reduce_scale.py's measured
# figure in here (and its Measurement above) or pass it on the command line.
DECODE_IMAGES_PER_S_PER_CORE = RECORDED["decode-photos10k"]


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
    """Pairs (i<j), tiles (upper triangle incl. diagonal tiles), stored values.

    ``pairs`` is what the CPU and Triton kernels compute (the upper triangle of a diagonal tile);
    ``stored_values`` counts diagonal tiles as full squares, as the store keeps them."""
    pairs = tiles = stored = 0
    sizes = partition_sizes(s.n_images, s.partitions)
    for n, reps in ((sz, sizes.count(sz)) for sz in sorted(set(sizes))):
        b = math.ceil(n / s.tile_size)
        pairs += reps * n * (n - 1) // 2
        tiles += reps * b * (b + 1) // 2
        stored += reps * _stored_values(n, s.tile_size)
    return {"pairs": pairs, "tiles": tiles, "stored_values": stored, "partition_size": sizes[0], "tile_pairs": pairs / tiles}


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
    per_tile = c["tile_pairs"] / rate + overhead_s  # mean pairs per tile (diagonal tiles: u < v)
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

    from drmi_ray.matrix import compute_tile
    from drmi_ray.mi import to_codes
    from drmi_ray.mi_cpu import entropy_sums
    from drmi_ray.tiles import write_tile

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
        Scenario("ImageNet-1k, per class, RGB", IMAGENET_TRAIN, IMAGENET_CLASSES, (size, size, 3), imagenet_tile),
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


@dataclass
class Rates:
    """Rates by resolution (pairs/s) and where they come from (printed beside them)."""

    values: dict
    source: str


def cpu_rates(args, resolutions, shapes) -> Rates:
    given = parse_rates(args.cpu_pairs_per_s)
    if given:
        return Rates(given, f"given (--cpu-pairs-per-s): {args.cpu_source or 'source not named (--cpu-source)'}")
    here = f"{socket.gethostname()}, {os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f} at start"
    if args.measure_tile_cpu:
        return Rates({res: measure_tile(shapes[res], 512) for res in resolutions},
                     f"measured here in this run ({here}): one 512x512 off-diagonal tile's task body "
                     "(numba, all cores, no Ray) per resolution")
    tile = min(args.measure_n, 256)
    return Rates({res: measure_cpu(shapes[res], args.measure_n, tile) for res in resolutions},
                 f"measured here in this run ({here}): compute_mi_matrix (Ray tasks + local tile store) on "
                 f"{args.measure_n} natural-like images per resolution, tile {tile}; pairs u < v per second")


def gpu_rates(args, resolutions, shapes) -> Rates:
    if args.measure_gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--measure-gpu: no CUDA device here")
        return Rates({res: measure_tile(shapes[res], args.gpu_tile, device="cuda") for res in resolutions},
                     f"measured here in this run on {torch.cuda.get_device_name(0)} ({socket.gethostname()}): one "
                     f"{args.gpu_tile}x{args.gpu_tile} off-diagonal tile (torch kernel + Parquet write, no Ray) "
                     "per resolution; pair values/s")
    given = parse_rates(args.gpu_pairs_per_s)
    if given:
        return Rates(given, f"given (--gpu-pairs-per-s): {args.gpu_source or 'source not named (--gpu-source)'}")
    if args.size == 64:
        return Rates(dict(RECORDED["h200-tile"].values), RECORDED["h200-tile"].describe())
    return Rates({}, f"none recorded at --size {args.size}: pass --gpu-pairs-per-s or --measure-gpu")


def decode_rate(args) -> tuple[float, str]:
    if args.decode_images_per_s_per_core is not None:
        return args.decode_images_per_s_per_core, (f"given (--decode-images-per-s-per-core): "
                                                   f"{args.decode_source or 'source not named (--decode-source)'}")
    m = DECODE_IMAGES_PER_S_PER_CORE
    return m.values["decode"], m.describe()


def node_types(path: str) -> list[dict]:
    """Worker node types of a Ray cluster launcher config: name, instance, CPU, GPU, max_workers."""
    import yaml

    with open(path) as f:
        config = yaml.safe_load(f)
    head = config.get("head_node_type")
    out = []
    for name, node in config.get("available_node_types", {}).items():
        res = node.get("resources", {})
        out.append({"name": name, "instance": node.get("node_config", {}).get("InstanceType", "?"),
                    "cpus": int(res.get("CPU", 0)), "gpus": int(res.get("GPU", 0)), "head": name == head,
                    "max_workers": int(node.get("max_workers", 0))})
    return out


def decode_lines(rate: float, nodes: list[dict], file_kb: float, yaml_name: str) -> list[str]:
    """The decode stage of the ImageNet train set on the cluster's worker node types."""
    lines = ["| nodes | CPUs | decode wall | read per node |", "|---|---:|---:|---:|"]

    def row(label, cpus, per_node_cpus):
        wall_h = IMAGENET_TRAIN / (rate * cpus) / 3600
        gbit = rate * per_node_cpus * file_kb * 1e3 * 8 / 1e9
        lines.append(f"| {label} | {cpus:,} | {_hours(wall_h)} | {gbit:.2f} Gbit/s |")

    row("1 CPU core (for scale)", 1, 1)
    workers = [n for n in nodes if not n["head"] and n["cpus"] > 0]
    for n in workers:
        row(f"1 x {n['instance']} ({n['name']})", n["cpus"], n["cpus"])
        if n["max_workers"] > 1:
            row(f"{n['max_workers']} x {n['instance']} (its max_workers)", n["max_workers"] * n["cpus"], n["cpus"])
    if len(workers) > 1:
        total = sum(n["max_workers"] * n["cpus"] for n in workers)
        label = " + ".join(f"{n['max_workers']} x {n['instance']}" for n in workers)
        lines.append(f"| every worker type at max_workers ({label}) | {total:,} | "
                     f"{_hours(IMAGENET_TRAIN / (rate * total) / 3600)} | as above per node |")
    heads = [n for n in nodes if n["head"]]
    note = (f"(head {heads[0]['instance']}: CPU {heads[0]['cpus']} in {yaml_name}, runs no decode tasks; "
            "the autoscaler starts CPU workers for decode tasks, GPU nodes only for GPU work)") if heads else ""
    return lines + [note] if note else lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64, help="ImageNet MI resolution (default 64x64)")
    p.add_argument("--tile-size", type=int, default=1300,
                   help="tile side for per-class partitions (default 1300: one tile per ImageNet class)")
    p.add_argument("--global-tile-size", type=int, default=4096, help="tile side for global matrices (default 4096)")
    p.add_argument("--gpus", default="1,8,64", help="GPU counts for the wall-time columns (default 1,8,64)")
    p.add_argument("--cpu-pairs-per-s", help="RES:RATE,... instead of measuring here (RES like 64x64, 32x32x3)")
    p.add_argument("--cpu-source", default="", help="the machine and command the --cpu-pairs-per-s rates come from (printed)")
    p.add_argument("--gpu-pairs-per-s", help="RES:RATE,... pair values/s per GPU (an off-diagonal tile's tile_size^2 / s)")
    p.add_argument("--gpu-source", default="", help="the machine and command the --gpu-pairs-per-s rates come from (printed)")
    p.add_argument("--measure-gpu", action="store_true", help="measure the GPU rates on this machine's GPU")
    p.add_argument("--gpu-tile", type=int, default=2048, help="tile side for --measure-gpu (default 2048)")
    p.add_argument("--measure-tile-cpu", action="store_true",
                   help="measure CPU rates as one tile's task body without Ray (numba, all cores), not compute_mi_matrix")
    p.add_argument("--measure-n", type=int, default=384, help="images per CPU measurement (default 384)")
    p.add_argument("--tile-overhead-s", type=float,
                   help=f"fixed cost per tile task (default {TILE_OVERHEAD_S} s, assumed: an allowance for scheduling "
                        "and an object-store PUT on a cluster)")
    p.add_argument("--bytes-per-value", type=int, default=8,
                   help="bytes per stored MI value (default 8: the tile store's float64; 4 with --store-dtype float32)")
    p.add_argument("--decode-images-per-s-per-core", type=float,
                   help=f"decode rate, images/s per CPU core (default {DECODE_IMAGES_PER_S_PER_CORE.values['decode']:g}: "
                        f"measurement {DECODE_IMAGES_PER_S_PER_CORE.name!r}, {DECODE_IMAGES_PER_S_PER_CORE.status})")
    p.add_argument("--decode-source", default="", help="the machine and command the decode rate comes from (printed)")
    p.add_argument("--imagenet-file-kb", type=float, default=IMAGENET_FILE_KB,
                   help=f"mean ImageNet train JPEG size for the read bandwidth column (default {IMAGENET_FILE_KB}, assumed)")
    p.add_argument("--cluster-yaml", default=os.path.join(REPO, "cluster.yaml"),
                   help="Ray cluster launcher config whose node types the decode stage is planned on")
    args = p.parse_args(argv)
    overhead_source = "given (--tile-overhead-s)" if args.tile_overhead_s is not None else "assumed"
    if args.tile_overhead_s is None:
        args.tile_overhead_s = TILE_OVERHEAD_S

    scen = scenarios(args.size, args.tile_size, args.global_tile_size)
    resolutions = list(dict.fromkeys(s.res for s in scen))
    shapes = {s.res: s.shape for s in scen}
    cpu = cpu_rates(args, resolutions, shapes)
    gpu = gpu_rates(args, resolutions, shapes)
    decode, decode_source = decode_rate(args)
    gpu_counts = [int(g) for g in args.gpus.split(",")]
    yaml_name = os.path.relpath(args.cluster_yaml, REPO) if args.cluster_yaml.startswith(REPO) else args.cluster_yaml

    print("# Capacity plan: decoding and the MI matrix for ImageNet-1k and CIFAR-10\n")
    print("Inputs:")
    print(f"- ImageNet-1k train: {IMAGENET_TRAIN:,} images, {IMAGENET_CLASSES} classes (~{IMAGENET_TRAIN // IMAGENET_CLASSES:,} per class); "
          f"CIFAR-10 train: {CIFAR10_TRAIN:,} images at 32x32x3")
    print(f"- MI resolution for ImageNet: {args.size}x{args.size} grey (and RGB flattened); 256 levels")
    print(f"- tiles: {args.tile_size} per class partition, {args.global_tile_size} for global matrices; "
          f"{args.bytes_per_value} bytes per stored value")
    print(f"- fixed cost per tile: {args.tile_overhead_s} s ({overhead_source})")
    print("- CPU pairs/s: " + ", ".join(f"{r} {cpu.values[r]:,.0f}" for r in resolutions)
          + f"\n  source: {cpu.source}")
    print("- GPU pairs/s per GPU: "
          + (", ".join(f"{r} {gpu.values[r]:,.0f}" for r in resolutions if r in gpu.values) or "unknown")
          + f"\n  source: {gpu.source}")
    print(f"- decode: {decode:,.0f} images/s per CPU core\n  source: {decode_source}")
    print("- pair counts: the CPU and Triton kernels compute a diagonal tile's upper triangle only (u < v, "
          "mirrored): CPU time = pairs / CPU rate; GPU time = pairs / GPU rate + fixed cost per tile.")
    print()
    head = ("| scenario | MI res | pairs (u<v) | tiles | tile store | "
            "wall on the CPU-rate machine | GPU-hours | " + " | ".join(f"wall, {g} GPU{'s' if g > 1 else ''}" for g in gpu_counts) + " |")
    print(head)
    print("|" + "---|" * 2 + "---:|" * (head.count("|") - 3))
    for s in scen:
        c = count(s)
        cpu_h = c["pairs"] / cpu.values[s.res] / 3600  # the CPU source's machine, all its cores
        rows = [plan_row(s, gpu.values.get(s.res), g, args.tile_overhead_s, args.bytes_per_value) for g in gpu_counts]
        walls = " | ".join(_hours(r["wall_h"]) for r in rows)
        print(f"| {s.name} | {s.res} | {c['pairs']:.3g} | {c['tiles']:,} | "
              f"{_bytes(rows[0]['storage_gb'])} | {_hours(cpu_h)} | {fmt(rows[0]['gpu_hours'], ',.1f')} | {walls} |")
    print()
    per_class = count(scen[0])
    glob = count(scen[2])
    print(f"Per-class partitioning computes {glob['pairs'] / per_class['pairs']:,.0f}x fewer pairs than the global "
          f"ImageNet matrix ({per_class['pairs']:.3g} vs {glob['pairs']:.3g}); each class's matrix "
          f"({per_class['partition_size']:,}^2 float64 = {per_class['partition_size'] ** 2 * 8 / 1e6:.0f} MB) fits in memory for selection.")
    print(f"\n## Decode: {IMAGENET_TRAIN:,} ImageNet train JPEGs at {decode:,.0f} images/s per core "
          f"(node types from {yaml_name}; read per node at {args.imagenet_file_kb:g} KB per file, assumed)\n")
    for line in decode_lines(decode, node_types(args.cluster_yaml), args.imagenet_file_kb, yaml_name):
        print(line)
    print("Decode wall = images / (rate per core x CPUs): the CPU-bound decode alone, every CPU busy; listing, "
          "Ray Data start-up, the driver gathering the decoded pool and storage limits (the read column) are not in it.")
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
