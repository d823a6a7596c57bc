"""Reduce torchvision CIFAR-10 with DRMI on Ray (and, optionally, attack with the selection).

    python jobs/cifar10.py --root DATA --budget K --out URL [--download] [--partition label|kmeans|none]
                           [--pool-size N] [--target CHECKPOINT [--substitute resnet18]]
    ray job submit --working-dir . -- python jobs/cifar10.py --root /data/cifar10 --budget 1000 --partition none

The pool is CIFAR-10's 50,000 training images (32x32x3; ``--pool-size`` takes a seeded random
subset), read from ``--root`` (torchvision's layout; downloaded only with ``--download``). MI is
on the colour images (``--color flatten``, every channel a position; ``luminance`` for grey), per
class by default or globally with ``--partition none`` (the capacity plan's CIFAR-10 scenario).
The rest is jobs/imagenet.py's pipeline: per-partition tile stores under ``{out}/mi``,
proportional budgets, ``{out}/selection.json`` with ``selected`` ("cifar10/train/INDEX") and
``indices``. ``--target`` queries the target (trained on 32x32x3), fits a substitute and attacks,
with CIFAR-10's test split as the referee's held-out truth.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import imagenet  # noqa: E402  (jobs/imagenet.py: the shared pipeline)

log = imagenet.log


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobs/cifar10.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="folder holding torchvision's CIFAR-10 (cifar-10-batches-py)")
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR-10 into --root")
    p.add_argument("--budget", "-k", type=int, required=True, help="K, the number of images to select")
    p.add_argument("--out", help="run folder (path or fsspec URL); default: a new folder under runs/")
    p.add_argument("--pool-size", type=int, help="use a seeded random subset of this many training images")
    imagenet.add_reduce_args(p)
    return p


def load(args):
    from drmi_ray.data import torchvision_pool

    train = torchvision_pool("cifar10", args.root, train=True, download=args.download)
    idx = np.arange(len(train))
    if args.pool_size:
        if args.pool_size > len(train):
            raise ValueError(f"--pool-size {args.pool_size} is larger than CIFAR-10's {len(train)} training images")
        idx = np.sort(np.random.default_rng(args.seed).choice(len(train), args.pool_size, replace=False))
    paths = [f"cifar10/train/{i}" for i in idx]
    return imagenet.DecodedPool.from_arrays(train.images[idx], train.labels[idx], paths, train.classes), train


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from drmi_ray import report

    out = (args.out or report.new_run_folder("cifar10")).rstrip("/")
    try:
        imagenet.init_ray(args.address)
        t0 = time.perf_counter()
        pool, _ = load(args)
        log(f"pool: {len(pool)} CIFAR-10 training images from {args.root}")
        result = imagenet.reduce_pool(pool, args.budget, out, partition=args.partition, clusters=args.clusters,
                                      settings=imagenet.settings_from(args))
        extra = {"data": f"cifar10:{args.root}", "size": 32, "mode": "RGB", "bins": args.bins, "color": args.color,
                 "seed": args.seed, "tile_size": args.tile_size}
        url = imagenet.write_selection(out, result, extra)
        log(f"selected {len(result['selected'])} of {result['n_images']} images in "
            f"{time.perf_counter() - t0:.1f} s; wrote {url}")
        if args.target:
            from drmi_ray.data import torchvision_pool

            test = torchvision_pool("cifar10", args.root, train=False, download=args.download)
            n = min(args.test_size, len(test))
            pick = np.sort(np.random.default_rng(args.seed).choice(len(test), n, replace=False))
            args.data, args.test = f"cifar10:{args.root}", None
            imagenet.attack_stage(pool, result, out, args, test=(test.images[pick], test.labels[pick]))
            log(f"wrote {out}/report.md")
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"jobs/cifar10.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
