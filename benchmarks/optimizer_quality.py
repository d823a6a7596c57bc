"""Subset optimizer quality and speed: random / greedy / swap search / iterated local search /
parallel search on Ray, against the exact optimum (small N) or the best found (large N).

    python benchmarks/optimizer_quality.py                 # quick: a few minutes on 2 cores
    python benchmarks/optimizer_quality.py --long-restarts 20 --long-seconds 30   # the issue's goal
    python benchmarks/optimizer_quality.py --scale 20000   # sharded global search, N=20k (float32 .npy)
    python benchmarks/optimizer_quality.py --scale 60000 --scale-dtype float16    # K=600 of 60k

Tables:
  1. small random MI-like instances (N=30, K=8): gap to the exact optimum (brute force oracle);
  2. N=5,000, K=600 (real digits, MI from pairwise_mi, cached under /tmp; and a random MI-like
     instance): objective, gap to the best found, time to within 0.1% of it; then the goal: the
     best of ``--long-restarts`` single-process restarts of ``--long-seconds`` each (restart s uses
     seed s) against the parallel search (restarts on actors, and shards; seeds of their own,
     printed), as time to the same objective value (equal up to float rounding, ``SAME``) on both
     sides: the parallel search's (actor start-up included) against the fastest single-process
     restart's;
  3. speed-up with 1, 2, 4 actors for a fixed amount of work (this machine has 2 cores: expect at
     most 2x, and less while other work runs);
  4. (--scale N) sharded global selection from an N×N memory-mapped matrix.
Every table is printed with its machine (hostname, cores, load) and run (command, start time).
Times are wall seconds on a shared machine; compare ratios within one run.
"""

import argparse
import os
import resource
import socket
import sys
import tempfile
import time

import numpy as np

from drmi_ray import optimize as opt
from drmi_ray.optimize.distributed import _restart_seeds
from drmi_ray.optimize.search import _DenseState

DIGITS_MI = os.path.join(tempfile.gettempdir(), "drmi_digits_mi5000.npy")
SAME = 1e-9  # "the same objective value": equal to 1e-9 relative (float rounding of the kept sums)
WITHIN = 1e-3  # "within 0.1%"
PARALLEL_SEED, SHARD_SEED = 1000, 2000  # the parallel searches' seeds: none is a single-process restart's
COMMAND, STARTED = " ".join(["python"] + sys.argv), time.strftime("%Y-%m-%d %H:%M:%S")


def machine_and_run():
    machine = f"machine {socket.gethostname()} ({os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f} now)"
    return f"{machine}; run `{COMMAND}` started {STARTED}"


def mi_like(n, *, d=8, clusters=5, seed=0, dtype=np.float64, out=None):
    """Gaussian MI −½ log(1 − ρ²) between n clustered random unit vectors (MI-shaped, symmetric).
    With ``out`` (a .npy path) it is written block by block to a memory map and the path returned."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(clusters, d))[rng.integers(clusters, size=n)] + rng.normal(size=(n, d))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    f = lambda a: -0.5 * np.log1p(-np.clip((z[a] @ z.T) ** 2, 0, 0.999))  # noqa: E731
    if out is None:
        return f(slice(None)).astype(dtype)
    if not os.path.exists(out):
        mm = np.lib.format.open_memmap(out + ".tmp.npy", mode="w+", dtype=dtype, shape=(n, n))
        block = max(1, 2**24 // n)  # rows per write: ~128 MiB of float64 temporaries
        for a in range(0, n, block):
            mm[a : a + block] = f(slice(a, a + block))
        mm.flush()
        del mm
        os.replace(out + ".tmp.npy", out)
    return out


def digits_mi():
    if not os.path.exists(DIGITS_MI):
        from drmi_ray.data import bundled_mnist
        from drmi_ray.mi import pairwise_mi

        t = time.perf_counter()
        mi = pairwise_mi(bundled_mnist()[0])
        np.save(DIGITS_MI + ".tmp.npy", mi)
        os.replace(DIGITS_MI + ".tmp.npy", DIGITS_MI)
        print(f"[computed the 5000x5000 digit MI matrix in {time.perf_counter() - t:.0f}s, cached at {DIGITS_MI}]")
    return DIGITS_MI


def random_objective(mi, k, seed):
    return opt.objective(mi, np.random.default_rng(seed).choice(len(mi), k, replace=False))


def greedy_objective(mi, k, seed):
    rng = np.random.default_rng(seed)
    return _DenseState.greedy(np.ascontiguousarray(mi), k, int(rng.integers(len(mi)))).objective()


def reach(history, target, rel):
    """First time the history's best is at most ``target * (1 + rel)`` (None if never)."""
    return next((t for t, f in history if f <= target * (1 + rel)), None)


def fmt_t(t):
    return "never" if t is None else f"{t:.2f}"


def secs(t):
    return "never" if t is None else f"{t:.2f}s"


def table(rows, header):
    widths = [max(len(str(r[c])) for r in rows + [header]) for c in range(len(header))]
    line = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    print()


def small(args, ray):
    n, k = 30, 8
    gaps = {m: [] for m in ["random", "greedy", "swap search", "select (ILS)", "parallel (2 actors)"]}
    path = os.path.join(tempfile.mkdtemp(), "small.npy")
    for t in range(args.small):
        mi = mi_like(n, seed=1000 + t)
        best = opt.exact_select(mi, k).objective
        gaps["random"].append(random_objective(mi, k, t) / best - 1)
        gaps["greedy"].append(greedy_objective(mi, k, t) / best - 1)
        gaps["swap search"].append(opt.select(mi, k, seed=t, iterations=0).objective / best - 1)
        gaps["select (ILS)"].append(opt.select(mi, k, seed=t).objective / best - 1)
        if t < args.small_parallel:
            np.save(path, mi)
            sel = opt.select_distributed(path, k, seed=PARALLEL_SEED + t, num_actors=2, restarts=2, iterations=100)
            gaps["parallel (2 actors)"].append(sel.objective / best - 1)
    rows = []
    for m, g in gaps.items():
        g = np.array(g)
        rows.append([m, len(g), f"{100 * (g <= 1e-9).mean():.0f}%", f"{100 * g.mean():.2f}", f"{100 * g.max():.2f}"])
    print(f"## 1. Random MI-like instances, N={n}, K={k}: gap to the exact optimum (brute force)\n")
    print(f"{machine_and_run()}; instance t: seed t for the single-process methods, {PARALLEL_SEED} + t for the parallel one\n")
    table(rows, ["method", "instances", "exact optimum", "mean gap %", "max gap %"])


def large(args, ray, name, path):
    k = 600
    mi = np.load(path, mmap_mode="r")
    dense = np.ascontiguousarray(mi)
    print(f"## 2. {name}: N={len(mi)}, K={k}\n")
    print(machine_and_run() + "\n")
    results = {}
    t = time.perf_counter()
    results["random (best of 10)"] = (min(random_objective(dense, k, s) for s in range(10)), None, time.perf_counter() - t)
    t = time.perf_counter()
    results["greedy"] = (greedy_objective(dense, k, 0), None, time.perf_counter() - t)
    t = time.perf_counter()
    sel = opt.select(dense, k, seed=0, iterations=0)
    results["swap search (greedy + local search)"] = (sel.objective, sel.history, time.perf_counter() - t)
    long = []  # restart s uses seed s
    for s in range(args.long_restarts):
        t = time.perf_counter()
        sel = opt.select(dense, k, seed=s, iterations=10**9, time_limit=args.long_seconds)
        long.append((sel, time.perf_counter() - t))
    best_long = min(sel.objective for sel, _ in long)
    results[f"select (ILS), restart 0 (seed 0) of {args.long_restarts}, {args.long_seconds:g}s"] = (long[0][0].objective, long[0][0].history, long[0][1])
    results[f"best of {args.long_restarts} single-process restarts (seeds 0-{args.long_restarts - 1})"] = (best_long, None, sum(w for _, w in long))
    seeds_used = set(range(args.long_restarts))
    seed_lines = []
    for i, a in enumerate(args.actors_parallel):
        seed = PARALLEL_SEED + i
        seed_lines.append(f"{a} restarts on {a} actors: seeds {own_seeds(seeds_used, seed, a)}")
        t = time.perf_counter()
        sel = opt.select_distributed(path, k, seed=seed, num_actors=a, restarts=a, mode="restarts", iterations=10**9, time_limit=args.parallel_seconds)
        results[f"parallel: {a} restarts on {a} actors, {args.parallel_seconds:g}s each"] = (sel.objective, sel.history, time.perf_counter() - t)
    seed_lines.append(f"2 shard actors: seed {own_seeds(seeds_used, SHARD_SEED, 1)}")
    t = time.perf_counter()
    sel = opt.select_distributed(path, k, seed=SHARD_SEED, num_actors=2, mode="shards", iterations=args.shard_iterations)
    results[f"parallel: 2 shard actors, {args.shard_iterations} kicks"] = (sel.objective, sel.history, time.perf_counter() - t)
    best = min(f for f, _, _ in results.values())
    rows = [[m, f"{f:.3f}", f"{100 * (f / best - 1):.3f}", fmt_t(reach(h, best, WITHIN)) if h else "", f"{wall:.1f}"]
            for m, (f, h, wall) in results.items()]
    table(rows, ["method", "objective", "gap to best %", "s to within 0.1% of best", "wall s"])
    print(f"seeds: greedy and swap search seed 0 (the start of restart 0); single-process restart s seed s"
          f" (0-{args.long_restarts - 1}); parallel: " + "; ".join(seed_lines) + "\n")

    # The goal, time to the same value on both sides: the parallel search (seconds since its call
    # began, actor start-up included) against the fastest single-process restart to that value.
    single = [(reach(sel.history, best_long, SAME), s) for s, (sel, _) in enumerate(long)]
    t_single, s_single = min((t, s) for t, s in single if t is not None)
    t_single_01 = min(t for t in (reach(sel.history, best_long, WITHIN) for sel, _ in long) if t is not None)
    print(f"goal: the best of {args.long_restarts} single-process restarts ({args.long_seconds:g}s each) is {best_long:.3f};"
          f" the fastest of them to that value (restart {s_single}) reached it after {t_single:.2f}s,"
          f" the fastest to within 0.1% of it after {t_single_01:.2f}s. The parallel searches, timed from the start of"
          f" their call (actor start-up included):")
    for m, (f, h, w) in results.items():
        if not m.startswith("parallel"):
            continue
        t_same, t_01 = reach(h, best_long, SAME), reach(h, best_long, WITHIN)
        ratio = f", single-process / parallel = {t_single / t_same:.2f}" if t_same else ""
        met = "MET" if t_same is not None and t_same < t_single else "NOT met"
        print(f"  {m}: time to {best_long:.3f} {secs(t_same)} (single-process {t_single:.2f}s{ratio}) -> {met};"
              f" time to within 0.1% of it {secs(t_01)} (single-process {t_single_01:.2f}s); whole call {w:.1f}s")
    print()
    return dense


def own_seeds(seeds_used, seed, restarts):
    """The seeds select_distributed(seed=seed, restarts=restarts) runs, checked against every seed
    run before in this table (each restart must have its own)."""
    seeds = _restart_seeds(seed, restarts)
    if seeds_used & set(seeds) or len(set(seeds)) < len(seeds):
        raise SystemExit(f"seed {seed} repeats a seed already run: {sorted(seeds_used & set(seeds))}")
    seeds_used.update(seeds)
    return ", ".join(map(str, seeds))


def speedup(args, ray, dense_digits):
    k, r = 600, 4
    rows = []
    path = os.path.join(tempfile.mkdtemp(), "speed.npy")
    np.save(path, dense_digits)
    base = {}
    for a in (1, 2, 4):
        t = time.perf_counter()
        opt.select_distributed(path, k, seed=0, num_actors=a, restarts=r, mode="restarts", iterations=0)
        t_0 = time.perf_counter() - t  # actor start-up, greedy and first local search only
        t = time.perf_counter()
        opt.select_distributed(path, k, seed=0, num_actors=a, restarts=r, mode="restarts", iterations=args.speed_iterations)
        t_r = time.perf_counter() - t
        base.setdefault("r", t_r)
        base.setdefault("s", t_r - t_0)
        rows.append([a, f"{t_r:.1f}", f"{base['r'] / t_r:.2f}x", f"{t_0:.1f}", f"{t_r - t_0:.1f}", f"{base['s'] / max(t_r - t_0, 1e-9):.2f}x"])
    print(f"## 3. Speed-up with 1, 2, 4 actors: {r} restarts x {args.speed_iterations} kicks, digits N=5000, K=600 (the same seeds for every actor count)\n")
    print(machine_and_run() + "\n")
    table(rows, ["actors", "wall s", "speed-up", "start-up s (0 kicks)", "search s", "search speed-up"])


def scale(args, ray):
    n, k = args.scale, 600
    dtype = np.dtype(args.scale_dtype)
    path = os.path.join(tempfile.gettempdir(), f"drmi_mi_like_{n}_{dtype.name}.npy")
    t = time.perf_counter()
    mi_like(n, seed=7, dtype=dtype, out=path)
    t_make = time.perf_counter() - t
    rows = []
    for a in args.scale_actors:
        t = time.perf_counter()
        sel = opt.select_distributed(path, k, seed=0, num_actors=a, mode="shards", iterations=args.scale_iterations)
        wall = time.perf_counter() - t
        greedy_f = sel.history[0][1]
        rows.append([n, k, a, f"{greedy_f:.2f}", f"{sel.objective:.2f}", f"{100 * (1 - sel.objective / greedy_f):.2f}", sel.iterations, f"{wall:.0f}"])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"## 4. Sharded global selection, N={n}, K={k}, {dtype.name} memory map ({n * n * dtype.itemsize / 2**30:.1f} GiB; written in {t_make:.0f}s)\n")
    print(machine_and_run() + "\n")
    table(rows, ["N", "K", "shard actors", "greedy objective", "final objective", "% below greedy", "kicks", "wall s"])
    print(f"driver peak RSS {rss:.2f} GiB (the driver holds members and g: O(N))\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", type=int, default=100, help="random N=30, K=8 instances (default 100)")
    p.add_argument("--small-parallel", type=int, default=5, help="of those, how many also through Ray (default 5)")
    p.add_argument("--long-restarts", type=int, default=4, help="single-process restarts for the best found (issue goal: 20)")
    p.add_argument("--long-seconds", type=float, default=10, help="time limit of each long restart (default 10)")
    p.add_argument("--parallel-seconds", type=float, default=3, help="time limit per restart of the parallel search")
    p.add_argument("--actors-parallel", type=int, nargs="+", default=[2], help="actor counts for the parallel search (default 2)")
    p.add_argument("--shard-iterations", type=int, default=20, help="kicks in shard mode (default 20)")
    p.add_argument("--speed-iterations", type=int, default=1000, help="kicks per restart in the speed-up table (default 1000)")
    p.add_argument("--random-n", type=int, default=5000, help="size of the random MI-like large instance (0 = skip)")
    p.add_argument("--skip", nargs="*", default=[], choices=["small", "digits", "random", "speedup"])
    p.add_argument("--scale", type=int, default=0, help="also run sharded selection on an N x N random MI-like memory map")
    p.add_argument("--scale-dtype", default="float32", choices=["float16", "float32"])
    p.add_argument("--scale-actors", type=int, nargs="+", default=[2])
    p.add_argument("--scale-iterations", type=int, default=20)
    args = p.parse_args()

    import ray

    # address="local": never attach to another process's Ray on this shared machine
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    if "small" not in args.skip:
        small(args, ray)
    dense = None
    if "digits" not in args.skip:
        dense = large(args, ray, "Real digits (bundled MNIST, pairwise_mi)", digits_mi())
    if "random" not in args.skip and args.random_n:
        path = mi_like(args.random_n, seed=5, out=os.path.join(tempfile.gettempdir(), f"drmi_mi_like_{args.random_n}_float64.npy"))
        large(args, ray, "Random MI-like instance", path)
    if "speedup" not in args.skip:
        speedup(args, ray, dense if dense is not None else np.load(digits_mi()))
    if args.scale:
        scale(args, ray)
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
