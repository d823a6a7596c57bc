"""Decode throughput: the Ray Data ingest (ingest.decode_pool) against its alternatives, in one process.

    python benchmarks/decode_throughput.py [--images 10000] [--size 64] [--repeats 2] [--cpus N]
    python benchmarks/decode_throughput.py --folder ~/.cache/drmi-ray/reduce-scale/digits100k

Generates (once, under --cache) an ImageFolder of small JPEGs: bundled real digits resized to
``size x size``, shifted and noised, 100 class folders (or takes ``--folder``). Lists it once
(timed apart: every decoder needs the listing), then decodes it to ``size x size`` grey four
ways, each ``--repeats`` times (the first repeat includes worker start-up), and prints images/s
and the ratio to one plain PIL process timed in the same process, under the machine (hostname,
cores, load at start) and the command of the run:

  pil-1-process     read + decode + resize in this process, no Ray
  ray-tasks         hand-scheduled Ray tasks, 256 files each, every task in flight at once
                    (the job's decoder before Ray Data)
  read_binary_files ``ray.data.read_binary_files(include_paths=True)`` + ``map_batches`` decode
  ingest            ``drmi_ray.ingest.decode_pool``: units of files as rows, ``map_batches`` decodes a
                    unit, the driver streams the blocks into a disk-backed array (thumbnails and
                    skip reasons included)
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import sys
import time

import numpy as np


def make_folder(root: str, n: int, size: int) -> str:
    from PIL import Image

    from drmi_ray.data import bundled_mnist

    folder = os.path.join(root, f"digits-{n}-{size}")
    if len(glob.glob(os.path.join(folder, "*", "*.jpg"))) == n:
        return folder
    images, _ = bundled_mnist()
    rng = np.random.default_rng(0)
    for i in range(n):
        cls = os.path.join(folder, f"c{i % 100:03d}")
        os.makedirs(cls, exist_ok=True)
        img = np.asarray(Image.fromarray(images[rng.integers(len(images))]).resize((size, size)), dtype=np.float64)
        img = np.roll(img, tuple(rng.integers(-3, 4, 2)), axis=(0, 1)) + rng.normal(0, 8, img.shape)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(os.path.join(cls, f"{i:06d}.jpg"), quality=90)
    return folder


def decode_files(paths, size):
    from drmi_ray.data import decode_image

    out = []
    for p in paths:
        with open(p, "rb") as f:
            out.append(decode_image(f.read(), size=size))
    return np.stack(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cpus", type=int, help="Ray CPUs (default: all)")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/drmi-ray"))
    p.add_argument("--folder", help="decode this ImageFolder instead of generating one")
    args = p.parse_args()

    import ray
    import ray.data

    from drmi_ray.ingest import decode_pool, list_pool

    folder = os.path.expanduser(args.folder) if args.folder else make_folder(args.cache, args.images, args.size)
    files = sorted(glob.glob(os.path.join(folder, "*", "*.jpg")))
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cpus = int(ray.cluster_resources()["CPU"])
    t = time.perf_counter()
    listing = list_pool(folder, cpus=cpus)
    print(f"machine {platform.node()} ({os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f} at start, Ray CPUs {cpus}); "
          f"run `{' '.join(['python benchmarks/decode_throughput.py', *sys.argv[1:]])}` started {time.strftime('%Y-%m-%d %H:%M:%S')}")
    print(f"{len(files)} JPEGs of "
          f"{args.size}x{args.size} under {folder}; ingest.list_pool took {time.perf_counter() - t:.1f} s "
          f"(not in the rates below)")

    task = ray.remote(decode_files)

    def pil():
        decode_files(files, args.size)

    def tasks():
        ray.get([task.remote(files[i:i + 256], args.size) for i in range(0, len(files), 256)])

    def binary():
        def dec(batch):
            from drmi_ray.data import decode_image

            return {"image": np.stack([decode_image(b, size=args.size) for b in batch["bytes"]]), "path": batch["path"]}

        ds = ray.data.read_binary_files(folder, include_paths=True, file_extensions=["jpg"]).map_batches(dec, batch_size=256)
        for _ in ds.iter_batches(batch_size=None):
            pass

    def ingest():
        decode_pool(listing, size=args.size, progress=False)

    rates = {}
    for name, fn in (("pil-1-process", pil), ("ray-tasks", tasks), ("read_binary_files", binary), ("ingest", ingest)):
        for r in range(args.repeats):
            t = time.perf_counter()
            fn()
            rate = len(files) / (time.perf_counter() - t)
            rates.setdefault(name, []).append(rate)
    ref = max(rates["pil-1-process"])
    print("\n| decoder | images/s per repeat | best | best / pil-1-process |\n|---|---|---:|---:|")
    for name, rs in rates.items():
        print(f"| {name} | {', '.join(f'{x:,.0f}' for x in rs)} | {max(rs):,.0f} | {max(rs) / ref:.2f} |")


if __name__ == "__main__":
    main()
