"""Does the selection beat random? Methods x budgets x seeds on the bundled protocol, with CIs.

    python benchmarks/efficacy.py                       # the full grid (about an hour on 2 cores)
    python benchmarks/efficacy.py --split 1000,3500,500 --methods random,drmi-typical,drmi
    python benchmarks/efficacy.py --from runs/efficacy-...   # re-print the tables of a finished run

Runs the real experiment (``drmi_ray.experiment.run_experiment``: a trained target behind its
actor, every query counted, PRADA watching each cell's stream, substitutes fitted in Ray Train's
local mode, PGD transfer) for every method, budget and seed, then prints per method and budget:

- mean and 95% CI (Student t over seeds) of accuracy, fidelity and transfer rate;
- the paired difference against ``random`` with the same seed (the substitute's initialisation
  and batch order follow the seed, so pairing removes that share of the noise), mean and 95% CI;
- PRADA: how many seeds' streams were flagged and the earliest query of a flag (PRADA can only
  test once more than 100 distances exist, so budgets <= 100 are never flagged).

and whether each method meets the default rule of issue 11: paired accuracy CI above 0 at 50,
100 and 200 queries and not wholly below 0 at 400 and 600. It writes the run folder (results,
report, config, and ``machine.txt``: the machine and command of the run, printed with the tables)
and ``efficacy.png`` (accuracy, transfer rate and the paired accuracy margin over random against
budget, error bars = 95% CI). Seeds are 0..N-1; the methods were tuned on other seeds (100-109), so these are fresh.
``--split T,P,S`` sets the target's training set, the attacker's pool and the test split (of
the 5,000 bundled digits): a larger pool against the same budgets is where selection should
matter more.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import time

import numpy as np

from drmi_ray.config import ExperimentConfig
from drmi_ray.models import TrainConfig
from drmi_ray.report import mean_ci, new_run_folder

METRICS = ("accuracy", "fidelity", "transfer_rate")
RULE_ABOVE = (50, 100, 200)  # paired accuracy CI must lie above 0 here ...
RULE_NOT_BELOW = (400, 600)  # ... and must not lie wholly below 0 here


def paired(rows, method, budget, metric, reference="random"):
    """Mean and CI half-width of ``metric(method) - metric(reference)`` over the shared seeds."""
    a = {r["seed"]: r[metric] for r in rows if r["method"] == method and r["budget"] == budget}
    b = {r["seed"]: r[metric] for r in rows if r["method"] == reference and r["budget"] == budget}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    return mean_ci([a[s] - b[s] for s in seeds])


def pct(mean_and_ci, signed=False):
    if mean_and_ci is None:
        return "—"
    m, c = mean_and_ci
    return f"{100 * m:+.1f} ± {100 * c:.1f}" if signed else f"{100 * m:.1f} ± {100 * c:.1f}"


def tables(rows) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    budgets = sorted({r["budget"] for r in rows})
    cell = {}
    for r in rows:
        cell.setdefault((r["method"], r["budget"]), []).append(r)
    out = []
    for metric in METRICS:
        out += [f"\n{metric}: mean ± 95% CI over seeds",
                "| budget | " + " | ".join(methods) + " |", "|---:|" + "---:|" * len(methods)]
        for b in budgets:
            out.append(f"| {b} | " + " | ".join(
                pct(mean_ci([r[metric] for r in cell[m, b]])) if (m, b) in cell else "—" for m in methods) + " |")
    others = [m for m in methods if m != "random"]
    if "random" in methods and others:
        for metric in METRICS:
            out += [f"\n{metric}: paired difference against random (points, mean ± 95% CI)",
                    "| budget | " + " | ".join(others) + " |", "|---:|" + "---:|" * len(others)]
            for b in budgets:
                out.append(f"| {b} | " + " | ".join(pct(paired(rows, m, b, metric), signed=True) for m in others) + " |")
    out += ["\nPRADA: streams flagged / seeds (earliest flag at query)",
            "| budget | " + " | ".join(methods) + " |", "|---:|" + "---:|" * len(methods)]
    for b in budgets:
        row = []
        for m in methods:
            flags = [r["prada_flagged_at"] for r in cell.get((m, b), []) if r.get("prada_flagged_at") is not None]
            row.append(f"{len(flags)}/{len(cell.get((m, b), []))}" + (f" (q{min(flags)})" if flags else ""))
        out.append(f"| {b} | " + " | ".join(row) + " |")
    if "random" in methods:
        out.append("\nDefault rule (paired accuracy CI > 0 at 50/100/200, not wholly < 0 at 400/600):")
        for m in others:
            verdict = []
            for b in budgets:
                d = paired(rows, m, b, "accuracy")
                if d is None or (b not in RULE_ABOVE and b not in RULE_NOT_BELOW):
                    continue
                ok = d[0] - d[1] > 0 if b in RULE_ABOVE else d[0] + d[1] >= 0
                verdict.append((b, ok))
            missing = [b for b in (*RULE_ABOVE, *RULE_NOT_BELOW) if b not in dict(verdict)]
            status = "MEETS" if all(ok for _, ok in verdict) and not missing else "does not meet"
            detail = ", ".join(f"{b}: {'ok' if ok else 'FAILS'}" for b, ok in verdict)
            out.append(f"  {m}: {status} ({detail}{'; budgets not run: ' + str(missing) if missing else ''})")
    return "\n".join(out)


def machine_and_run(argv) -> str:
    """The machine (hostname, cores, load now) and the command of this run, for the printed tables."""
    command = " ".join(["python benchmarks/efficacy.py", *(sys.argv[1:] if argv is None else argv)])
    return (f"machine {socket.gethostname()} ({os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f} at start); "
            f"run `{command}` started {time.strftime('%Y-%m-%d %H:%M:%S')}")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    budgets = sorted({r["budget"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = [("accuracy", False), ("transfer_rate", False), ("accuracy", True)]
    for ax, (metric, vs_random) in zip(axes, panels):
        for i, m in enumerate(methods):
            if vs_random:
                stats = [paired(rows, m, b, metric) if m != "random" else (0.0, 0.0) for b in budgets]
            else:
                stats = [mean_ci([r[metric] for r in rows if r["method"] == m and r["budget"] == b]) for b in budgets]
            x = np.array(budgets) * (1 + 0.015 * (i - len(methods) / 2))  # spread the error bars
            ax.errorbar(x, [100 * s[0] for s in stats], yerr=[100 * s[1] for s in stats], marker="o",
                        capsize=3, label=m)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_xlabel("queries")
        label = metric.replace("_", " ")
        ax.set_ylabel(f"{label}: method − random (points)" if vs_random else f"{label} (%)")
        if vs_random:
            ax.axhline(0, color="black", lw=0.8)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("mean ± 95% CI over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="random,drmi,drmi-typical,drmi-cover,drmi-mix,drmi-balanced",
                   help="comma-separated methods (random is the reference)")
    p.add_argument("--budgets", default="50,100,200,400,600")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--split", default="2000,2000,1000",
                   help="target training set, attacker pool, test split (of the 5,000 bundled digits)")
    p.add_argument("--substitute", default="lenet5", help="substitute model (lenet5: a fit costs seconds, not a minute)")
    p.add_argument("--out", help="run folder (default: a new folder under runs/)")
    p.add_argument("--from", dest="previous", help="print the tables of a finished run folder instead of running")
    args = p.parse_args(argv)

    if args.previous:
        out = args.previous
        with open(os.path.join(out, "results.json")) as f:
            rows = json.load(f)
        machine_file = os.path.join(out, "machine.txt")
        if os.path.exists(machine_file):
            with open(machine_file) as f:
                machine = f.read().strip()
        else:
            machine = "machine and command not recorded (no machine.txt in the run folder)"
        wall = None
    else:
        from drmi_ray.experiment import run_experiment

        target_train, pool, test = (int(x) for x in args.split.split(","))
        config = ExperimentConfig()
        config.pool = dataclasses.replace(config.pool, target_train=target_train, pool=pool, test=test)
        config.selection = dataclasses.replace(
            config.selection, methods=tuple(args.methods.split(",")),
            budgets=tuple(int(b) for b in args.budgets.split(",")), seeds=args.seeds)
        config.substitute = TrainConfig(model=args.substitute)
        config.substitute_workers = 0  # Train's local mode: hundreds of small fits
        out = args.out or new_run_folder("efficacy")
        machine = machine_and_run(argv)
        start = time.perf_counter()
        rows = run_experiment(config, out)
        wall = time.perf_counter() - start
        with open(os.path.join(out, "machine.txt"), "w") as f:
            f.write(machine + "\n")
    print(f"\nrun folder: {out}\n{machine}")
    print(tables(rows))
    plot(rows, os.path.join(out, "efficacy.png"))
    print(f"\nplot: {os.path.join(out, 'efficacy.png')}")
    if wall is not None:
        print(f"wall time: {wall / 60:.1f} min on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
