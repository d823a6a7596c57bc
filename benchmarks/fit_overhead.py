"""Ray Train's fixed cost per substitute fit: one TorchTrainer.fit per fit vs one run for all.

    python benchmarks/fit_overhead.py [--fits 6] [--images 100] [--steps 20] [--model lenet5]

Times, in one process and one local Ray, ``--fits`` tiny fits (``--model`` on ``--images``
bundled digits, ``--steps`` optimizer steps each, seeds 0..fits-1):

- ``bare loop``: ``models.train_classifier`` in this process, one torch thread (the reference);
- ``one run per fit``: ``fit_substitutes([job])`` per job, one after another: a TorchTrainer.fit
  (controller, one worker, checkpoint) for every fit, as substitutes were fitted before;
- ``one run, N fits``: ``fit_substitutes(jobs, max_concurrent=1)``: one TorchTrainer.fit whose
  worker fits them all one after another;
- with ``--concurrent K`` (default 2) the same two Ray Train ways with K at once: K runs side
  by side from a thread pool vs one run with K workers.

Per-fit seconds, fixed cost per fit (minus the bare loop's per-fit time) and its ratio to the
amortised one. Each row names the machine (hostname) and the run (a timestamp); the load
average before and after is printed, since the figures move with whatever else the machine runs.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from drmi_ray.data import bundled_mnist
from drmi_ray.models import TrainConfig, predict, train_classifier
from drmi_ray.runtime import init_ray
from drmi_ray.substitute import fit_substitutes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fits", type=int, default=6)
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--model", default="lenet5")
    p.add_argument("--concurrent", type=int, default=2, help="0 skips the side-by-side rows")
    args = p.parse_args()

    images, labels = bundled_mnist()
    x, y = images[:args.images], labels[:args.images]
    jobs = [(x, y, TrainConfig(model=args.model, epochs=1, min_steps=args.steps, seed=s))
            for s in range(args.fits)]
    host, run = socket.gethostname(), time.strftime("%Y%m%d-%H%M%S")
    storage = tempfile.mkdtemp(prefix="fit-overhead-")
    torch.set_num_threads(1)  # as a one-CPU Ray Train worker runs
    init_ray("local", include_dashboard=False, log_to_driver=False)  # as drmi run starts Ray
    print(f"# {host} run {run}: {args.fits} fits of {args.model} on {args.images} images, "
          f"{args.steps} steps; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}; "
          f"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S={os.environ.get('RAY_TRAIN_HEALTH_CHECK_INTERVAL_S', 'unset')}")

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out

    fit_substitutes(jobs[:1], storage_path=storage)  # warm-up: worker processes, imports
    rows = []
    bare, plain = timed(lambda: [train_classifier(*job) for job in jobs])
    rows.append(("bare loop, in this process", bare, 1))
    separate, _ = timed(lambda: [fit_substitutes([job], storage_path=storage)[0] for job in jobs])
    rows.append(("one run per fit, 1 at a time", separate, 1))
    one, models = timed(lambda: fit_substitutes(jobs, max_concurrent=1, storage_path=storage))
    rows.append(("one run, N fits, 1 worker", one, 1))
    # the same substitutes as the bare loop (one torch thread both sides)
    same = all((predict(a, x) == predict(b, x)).all() for a, b in zip(plain, models))
    k = args.concurrent
    if k > 1:
        with ThreadPoolExecutor(k) as pool:
            side, _ = timed(lambda: list(pool.map(
                lambda job: fit_substitutes([job], storage_path=storage)[0], jobs)))
        rows.append((f"one run per fit, {k} at a time", side, k))
        many, _ = timed(lambda: fit_substitutes(jobs, max_concurrent=k, storage_path=storage))
        rows.append((f"one run, N fits, {k} workers", many, k))

    # fixed cost per fit: what a fit costs beyond the bare loop, per slot (k slots share the
    # fits when k run at once)
    per_bare = bare / args.fits
    fixed = {way: total * slots / args.fits - per_bare for way, total, slots in rows}
    print(f"{'host':<14} {'run':<16} {'way':<30} {'total s':>8} {'s/fit':>6} {'fixed s/fit':>11}")
    for way, total, _ in rows:
        print(f"{host:<14} {run:<16} {way:<30} {total:8.1f} {total / args.fits:6.2f} "
              f"{fixed[way]:11.2f}")
    for a, b in [(1, 2), (3, 4)][:len(rows) // 2]:  # one run per fit vs one run for all
        a, b = rows[a][0], rows[b][0]
        print(f"{host:<14} {run:<16} fixed cost per fit, {a} / {b}: {fixed[a] / max(fixed[b], 1e-9):.1f}x")
    print(f"# amortised substitutes equal the bare loop's: {same}; "
          f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
