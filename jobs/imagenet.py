"""Reduce an ImageNet-sized pool with DRMI on a Ray cluster (and, optionally, attack with it).

    python jobs/imagenet.py --data URL --budget K --out URL [--size 64] [--rgb]
                            [--partition kmeans|label|none] [--clusters C]
                            [--target CHECKPOINT [--substitute resnet18] [--test URL]]
    ray job submit --working-dir . -- python jobs/imagenet.py --data s3://... --budget 10000 --out s3://...

The same as ``drmi reduce`` (``drmi reduce --help`` lists every option), with images decoded at
64x64 unless ``--size`` says otherwise. The pipeline is ``drmi_ray/reduce.py``. Under
``ray job submit`` (RAY_ADDRESS set) it attaches to the cluster; run directly, it starts a local Ray.
"""

import sys

from drmi_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["reduce", "--size", "64", *sys.argv[1:]]))  # a later --size overrides this one
