"""The main job: DRMI vs random on the bundled real MNIST digits (same as `drmi run`).

    python jobs/mnist.py [--quick] [--out PATH_OR_URL] [--budgets 50,100,...] [--seeds N]
    ray job submit --working-dir . -- python jobs/mnist.py

Inside `ray job submit` (RAY_ADDRESS is set) ray.init() attaches to the cluster; run directly,
it starts a local Ray.
"""

import sys

from drmi_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
