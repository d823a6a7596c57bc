"""Ray Train's cost of substitute fits: a fixed cost per run and a cost per fit, against the bare loop.

    python benchmarks/fit_overhead.py [--sizes 1,4] [--repeats 1] [--images 100] [--steps 100] [--model lenet5]

Times, in one process and one local Ray, tiny fits (``--model`` on ``--images`` bundled digits,
``--steps`` optimizer steps each, seeds 0, 1, ...):

- ``bare loop``: ``models.train_classifier`` in this process, one torch thread (the reference),
  for as many fits as the largest size;
- ``one run, N fits``: ``fit_substitutes(jobs[:N], max_concurrent=1)``, one TorchTrainer.fit
  whose one worker fits the N substitutes one after another, for each N of ``--sizes`` (two);
  ``--repeats`` times, the sizes interleaved, the median kept (min-max printed beside it).

A run of N fits takes ``fixed + N · per_fit`` seconds: the two sizes give the fixed cost per run
(the intercept: controller, worker start, checkpoint) and the cost per fit inside a run (the
slope), printed beside the bare loop's seconds per fit. A fit in a run of its own costs
``fixed + per_fit``; N fits in one run cost ``fixed / N + per_fit`` each. The slope is only as
good as the fits are long against the run-to-run noise of the fixed cost (seconds on a loaded
machine): hence 100 steps a fit by default, and a note when the slope comes out below zero. Each
row names the
machine (hostname) and the run (a timestamp); the load average before and after is printed,
since the figures move with whatever else the machine runs.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time

import numpy as np
import torch

from drmi_ray.data import bundled_mnist
from drmi_ray.models import TrainConfig, predict, train_classifier
from drmi_ray.runtime import init_ray
from drmi_ray.substitute import fit_substitutes


def two_sizes(text: str) -> tuple[int, int]:
    sizes = tuple(int(s) for s in text.split(","))
    if len(sizes) != 2 or sizes[0] == sizes[1] or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"give two different fit counts >= 1, like 1,4; got {text!r}")
    return tuple(sorted(sizes))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=two_sizes, default=(1, 4), help="the two fit counts N per run (default 1,4)")
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per size, interleaved (median kept)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--model", default="lenet5")
    args = p.parse_args()
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")

    small, large = args.sizes
    images, labels = bundled_mnist()
    x, y = images[:args.images], labels[:args.images]
    jobs = [(x, y, TrainConfig(model=args.model, epochs=1, min_steps=args.steps, seed=s))
            for s in range(large)]
    host, run = socket.gethostname(), time.strftime("%Y%m%d-%H%M%S")
    storage = tempfile.mkdtemp(prefix="fit-overhead-")
    torch.set_num_threads(1)  # as a one-CPU Ray Train worker runs
    init_ray("local", include_dashboard=False, log_to_driver=False)  # as drmi run starts Ray
    print(f"# {host} run {run}: {args.model} on {args.images} images, {args.steps} steps per fit, "
          f"runs of N = {small} and {large} fits; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}; "
          f"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S={os.environ.get('RAY_TRAIN_HEALTH_CHECK_INTERVAL_S', 'unset')}")

    def timed(fn, *fn_args, **fn_kwargs):
        start = time.perf_counter()
        out = fn(*fn_args, **fn_kwargs)
        return time.perf_counter() - start, out

    fit_substitutes(jobs[:1], storage_path=storage)  # warm-up: worker processes, imports
    bare, plain = timed(lambda: [train_classifier(*job) for job in jobs])
    totals = {small: [], large: []}
    for _ in range(args.repeats):
        for n in (small, large):
            seconds, models = timed(fit_substitutes, jobs[:n], max_concurrent=1, storage_path=storage)
            totals[n].append(seconds)
    run_small, run_large = (float(np.median(totals[n])) for n in (small, large))
    per_fit = (run_large - run_small) / (large - small)  # the slope
    fixed = run_small - small * per_fit  # the intercept
    # the same substitutes as the bare loop (one torch thread both sides)
    same = all((predict(a, x) == predict(b, x)).all() for a, b in zip(plain, models))

    spread = {n: f"{min(t):.1f}-{max(t):.1f}" if len(t) > 1 else "" for n, t in totals.items()}
    rows = [("bare loop in this process, per fit", bare / large, ""),
            (f"one run of N={small} fits, total", run_small, spread[small]),
            (f"one run of N={large} fits, total", run_large, spread[large]),
            ("fixed cost per run (intercept)", fixed, ""),
            ("cost per fit in a run (slope)", per_fit, "")]
    print(f"{'host':<14} {'run':<16} {'measure':<36} {'seconds':>8}  {'min-max' if args.repeats > 1 else ''}".rstrip())
    for measure, seconds, low_high in rows:
        print(f"{host:<14} {run:<16} {measure:<36} {seconds:8.2f}  {low_high}".rstrip())
    print(f"{host:<14} {run:<16} {'cost per fit in a run / bare loop':<36} {per_fit / (bare / large):7.1f}x")
    if per_fit <= 0:
        print(f"# the runs of {small} and {large} fits differ by less than their noise: "
              "raise --steps, the larger size or --repeats")
    print(f"# amortised substitutes equal the bare loop's: {same}; "
          f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
