"""When does PRADA flag each method's query stream? Every method, on the bundled protocol's pool.

    python benchmarks/prada_streams.py [--methods all] [--budgets 200,400,600] [--seeds 5]

The pool is the bundled protocol's 2,000 digits in their seeded random order (not the file's
class order), and each method sends its queries in its own natural order (``acquisition``'
docstring). A target (C3F2, as in the default run) answers every query; a PRADA detector
(``prada.PradaDetector``, delta 0.95, as the target's ledger runs one per API key) watches each
stream. Only selection
runs here: no substitute is fitted on the answers (methods that train substitutes to choose,
cpb, trace and jbda, still do), so the whole grid of rivals takes minutes. Prints, per method
and budget, how many seeds' streams were flagged and at which query, under the machine
(hostname, cores, load at start) and the command of the run.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time

from drmi_ray.acquisition import METHODS, MI_METHODS, acquire
from drmi_ray.config import ExperimentConfig
from drmi_ray.pools import load_data
from drmi_ray.mi import pairwise_mi
from drmi_ray.models import TrainConfig, predict
from drmi_ray.prada import PradaDetector
from drmi_ray.target import load_classifier, train_target


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="all")
    p.add_argument("--budgets", default="200,400,600")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--target", help="a trained target checkpoint (default: train the default run's target)")
    args = p.parse_args(argv)
    methods = METHODS if args.methods == "all" else tuple(args.methods.split(","))
    budgets = [int(b) for b in args.budgets.split(",")]

    command = " ".join(["python benchmarks/prada_streams.py", *(sys.argv[1:] if argv is None else argv)])
    machine = (f"machine {socket.gethostname()} ({os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f} at start); "
               f"run `{command}` started {time.strftime('%Y-%m-%d %H:%M:%S')}")
    start = time.perf_counter()
    config = ExperimentConfig()
    data = load_data(config.pool)
    checkpoint = args.target
    if checkpoint is None:
        checkpoint = os.path.join(tempfile.mkdtemp(prefix="drmi-prada-"), "target.pt")
        train_target(data.target_images, data.target_labels, checkpoint, config=config.target.train)
    target = load_classifier(checkpoint)
    mi = pairwise_mi(data.pool)
    substitute = TrainConfig(model="lenet5")  # for cpb, trace and jbda's own choices

    flags = {}
    for method in methods:
        for budget in budgets:
            for seed in range(args.seeds):
                got = acquire(method, data.pool, budget, lambda x: predict(target, x), seed=seed,
                              mi=mi if method in MI_METHODS else None, substitute_config=substitute)
                detector = PradaDetector(config.target.prada_delta)
                detector.observe(got.images, got.labels)
                flags.setdefault((method, budget), []).append(detector.flagged_at)
            print(f"  {method} {budget}: {flags[method, budget]}", flush=True)

    print("\nPRADA (delta 0.95): streams flagged / seeds (earliest flag at query)")
    print(machine)
    print("| method | " + " | ".join(str(b) for b in budgets) + " |")
    print("|---|" + "---:|" * len(budgets))
    for method in methods:
        cells = []
        for b in budgets:
            f = [x for x in flags[method, b] if x is not None]
            cells.append(f"{len(f)}/{args.seeds}" + (f" (q{min(f)})" if f else ""))
        print(f"| {method} | " + " | ".join(cells) + " |")
    print(f"\nwall time: {(time.perf_counter() - start) / 60:.1f} min on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
