"""Reduce torchvision CIFAR-10 with DRMI on Ray (and, optionally, attack with the selection).

    python jobs/cifar10.py --data cifar10:ROOT --budget K --out URL [--download] [--pool-size N]
                           [--partition kmeans|label|none] [--target CHECKPOINT [--substitute resnet18]]
    ray job submit --working-dir . -- python jobs/cifar10.py --data cifar10:/data --budget 1000 --partition none

The pool is CIFAR-10's 50,000 training images (32x32x3; ``--pool-size`` takes a seeded random
subset) under ROOT (torchvision's layout; downloaded only with ``--download``); MI is on the
colour images (``--color flatten``). ``--target`` scores the substitute on CIFAR-10's test split.
The same as ``drmi reduce`` (``drmi reduce --help``); the pipeline is ``drmi_ray/reduce.py``.
"""

import sys

from drmi_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["reduce", *sys.argv[1:]]))
