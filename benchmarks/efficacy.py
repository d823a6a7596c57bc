"""Does the selection beat random, and does the new substitute recipe beat today's? Methods x
budgets x seeds x recipes on the bundled protocol, paired by seed, with CIs.

    python benchmarks/efficacy.py                                 # the reported grid
    python benchmarks/efficacy.py --split-seed 0 --seed-offset 100 --seeds 3   # a tuning run
    python benchmarks/efficacy.py --from runs/efficacy-...        # re-print a finished run's tables
    python benchmarks/efficacy.py --from RUN1,RUN2                # the cells of two runs of one split together

Runs the real experiment (``drmi_ray.experiment.run_experiment``: a trained target behind its
HTTP API, every query counted, PRADA watching each cell's stream, substitutes fitted in Ray
Train's local mode, PGD transfer) once per substitute recipe (``--recipes``):

- ``today``: the substitute learns from its K answers alone, no augmentation
  (``learn="answers"``, ``augment="none"``);
- ``pool-only`` (``learn="auto"``, ``augment="none"``): the target's answers spread over the whole
  unlabeled pool through the MI graph (``drmi_ray/spread.py``); the recipe that passed with LeNet-5
  substitutes (README), opt-in;
- ``new``: ``learn="auto"``, ``augment="auto"``: the pool and augmentation;
- ``augment-only`` (``learn="answers"``, ``augment="auto"``).

The recipes query the same images (same split, target, methods and seeds; the second run
reuses nothing but is deterministic). Printed per recipe, method and budget: mean and 95% CI
(Student t over seeds; fewer than 3 seeds: each seed's value) of accuracy, fidelity and
transfer rate; the paired difference against ``random`` with the same seed and recipe; the
paired difference of each recipe - today for each method; PRADA flags. A paired cell is **bold** when its
95% CI lies above 0; each table says how many comparisons it holds (no multiplicity
correction: with 15 cells, about one may clear 0 by chance at 95%). The default rule of issue
11: paired accuracy CI above 0 at 50, 100 and 200 queries and not wholly below 0 at 400 and 600.

Seeds are ``--seed-offset`` .. ``--seed-offset + --seeds - 1`` and the split (which 2,000
digits train the target, which 2,000 are the pool, which 1,000 the test) is ``--split-seed``:
the new recipe was tuned on split seed 0 (seeds 0-1, ``drmi_ray/spread.py:use_pool``), so the
reported runs use split seed 1 (the default here), which tuning never saw.
It writes the run folder (``results.json`` with a ``recipe`` column, ``machine.txt``: the
machine and command of the run) and ``efficacy.png``.
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
from drmi_ray.report import MIN_SEEDS_FOR_CI, mean_ci, method_styles, new_run_folder

METRICS = ("accuracy", "fidelity", "transfer_rate")
RULE_ABOVE = (50, 100, 200)  # paired accuracy CI must lie above 0 here ...
RULE_NOT_BELOW = (400, 600)  # ... and must not lie wholly below 0 here
RECIPES = {"today": {"learn": "answers", "augment": "none"}, "new": {"learn": "auto", "augment": "auto"},
           # the new recipe's two halves apart: which one costs the transfer rate
           "pool-only": {"learn": "auto", "augment": "none"}, "augment-only": {"learn": "answers", "augment": "auto"}}


def paired(rows, method, budget, metric, reference="random", *, recipe=None, reference_recipe=None):
    """Mean and CI half-width of ``metric(method) - metric(reference)`` over the shared seeds
    (``recipe``/``reference_recipe``: which recipe's rows; None: the rows as given)."""
    def values(m, rec):
        return {r["seed"]: r[metric] for r in rows if r["method"] == m and r["budget"] == budget
                and (rec is None or r.get("recipe") == rec)}

    a, b = values(method, recipe), values(reference, reference_recipe if reference_recipe else recipe)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    return mean_ci([a[s] - b[s] for s in seeds])


def pct(mean_and_ci, signed=False, values=None):
    if mean_and_ci is None:
        return "—"
    m, c = mean_and_ci
    if values is not None and len(values) < MIN_SEEDS_FOR_CI:
        return " / ".join(f"{100 * v:.1f}" for v in values)
    if signed:
        text = f"{100 * m:+.1f} ± {100 * c:.1f}"
        return f"**{text}**" if m - c > 0 and c > 0 else text
    return f"{100 * m:.1f} ± {100 * c:.1f}"


def _grid(title, methods, budgets, cell):
    out = [title, "| budget | " + " | ".join(methods) + " |", "|---:|" + "---:|" * len(methods)]
    out += [f"| {b} | " + " | ".join(cell(m, b) for m in methods) + " |" for b in budgets]
    return out


def tables(rows) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    budgets = sorted({r["budget"] for r in rows})
    recipes = list(dict.fromkeys(r.get("recipe", "today") for r in rows))
    for r in rows:
        r.setdefault("recipe", "today")
    out = []
    for recipe in recipes:
        mine = [r for r in rows if r["recipe"] == recipe]
        cell = {}
        for r in mine:
            cell.setdefault((r["method"], r["budget"]), []).append(r)
        for metric in METRICS:
            def show(m, b):
                values = [r[metric] for r in cell.get((m, b), [])]
                return pct(mean_ci(values), values=values) if values else "—"
            out += _grid(f"\n[{recipe}] {metric}: mean ± 95% CI over seeds", methods, budgets, show)
        others = [m for m in methods if m != "random"]
        if "random" in methods and others:
            for metric in METRICS:
                out += _grid(f"\n[{recipe}] {metric}: paired difference against random (points; "
                             f"{len(others) * len(budgets)} comparisons)", others, budgets,
                             lambda m, b: pct(paired(mine, m, b, metric), signed=True))
            out.append(f"\n[{recipe}] default rule (paired accuracy CI > 0 at 50/100/200, not wholly < 0 at 400/600):")
            for m in others:
                verdict = []
                for b in budgets:
                    d = paired(mine, m, b, "accuracy")
                    if d is None or (b not in RULE_ABOVE and b not in RULE_NOT_BELOW):
                        continue
                    verdict.append((b, d[0] - d[1] > 0 if b in RULE_ABOVE else d[0] + d[1] >= 0))
                missing = [b for b in (*RULE_ABOVE, *RULE_NOT_BELOW) if b not in dict(verdict)]
                status = "MEETS" if all(ok for _, ok in verdict) and not missing else "does not meet"
                detail = ", ".join(f"{b}: {'ok' if ok else 'FAILS'}" for b, ok in verdict)
                out.append(f"  {m}: {status} ({detail}{'; budgets not run: ' + str(missing) if missing else ''})")
        out += _grid(f"\n[{recipe}] PRADA: streams flagged / seeds (earliest flag at query)", methods, budgets,
                     lambda m, b: _flags(cell.get((m, b), [])))
    for recipe in [r for r in recipes if r != "today"] if "today" in recipes else []:
        for metric in METRICS:
            out += _grid(f"\n{recipe} recipe minus today's, {metric}, paired by method and seed (points; "
                         f"{len(methods) * len(budgets)} comparisons)", methods, budgets,
                         lambda m, b: pct(paired(rows, m, b, metric, m, recipe=recipe, reference_recipe="today"),
                                          signed=True))
    return "\n".join(out)


def _flags(cell_rows):
    flags = [r["prada_flagged_at"] for r in cell_rows if r.get("prada_flagged_at") is not None]
    return f"{len(flags)}/{len(cell_rows)}" + (f" (q{min(flags)})" if flags else "")


def machine_and_run(argv) -> str:
    """The machine (hostname, cores, load now) and the command of this run, for the printed tables."""
    command = " ".join(["python benchmarks/efficacy.py", *(sys.argv[1:] if argv is None else argv)])
    return (f"machine {socket.gethostname()} ({os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f} at start); "
            f"run `{command}` started {time.strftime('%Y-%m-%d %H:%M:%S')}")


def plot(rows, path):
    """Accuracy and transfer rate against budget per method and recipe (each method its own colour
    and marker, "today" dashed), and the paired accuracy margin over random; intervals clipped to
    0-100 %, and with fewer than 3 seeds each seed's point instead of an interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    recipes = list(dict.fromkeys(r.get("recipe", "today") for r in rows))
    budgets = sorted({r["budget"] for r in rows})
    styles = method_styles(methods)
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    panels = [("accuracy", False), ("transfer_rate", False), ("accuracy", True)]
    for ax, (metric, vs_random) in zip(axes, panels):
        for recipe in recipes:
            mine = [r for r in rows if r.get("recipe", "today") == recipe]
            for i, m in enumerate(methods):
                if vs_random and m == "random":
                    continue
                cells = [[r for r in mine if r["method"] == m and r["budget"] == b] for b in budgets]
                if vs_random:
                    stats = [paired(mine, m, b, metric) or (np.nan, 0.0) for b in budgets]
                else:
                    stats = [mean_ci([r[metric] for r in c]) if c else (np.nan, 0.0) for c in cells]
                x = np.array(budgets) * (1 + 0.012 * (i - len(methods) / 2))
                mean = np.array([100 * s[0] for s in stats])
                half = np.array([100 * s[1] for s in stats])
                line = "--" if recipe == "today" and len(recipes) > 1 else "-"
                label = m if len(recipes) == 1 else f"{m} ({recipe})"
                if min(len(c) for c in cells) >= MIN_SEEDS_FOR_CI:
                    low, high = mean - half, mean + half
                    if not vs_random:
                        low, high = np.clip(low, 0, 100), np.clip(high, 0, 100)
                    ax.errorbar(x, mean, yerr=[mean - low, high - mean], capsize=3, linestyle=line,
                                label=label, **styles[m])
                else:
                    ax.plot(x, mean, linestyle=line, label=label, **styles[m])
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_xlabel("queries")
        label = metric.replace("_", " ")
        ax.set_ylabel(f"{label}: method − random (points)" if vs_random else f"{label} (%)")
        if vs_random:
            ax.axhline(0, color="black", lw=0.8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("mean ± 95% CI over seeds (fewer than 3 seeds: means only); dashed: today's recipe")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="random,drmi,drmi-cover,drmi-typical",
                   help="comma-separated methods (random is the reference)")
    p.add_argument("--budgets", default="50,100,200,400,600")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--seed-offset", type=int, default=0, help="first seed (tuning runs: 100 and up)")
    p.add_argument("--split-seed", type=int, default=1, help="the protocol's split (tuning used 0)")
    p.add_argument("--recipes", default="today,new", help=f"substitute recipes, of {', '.join(RECIPES)}")
    p.add_argument("--split", default="2000,2000,1000",
                   help="target training set, attacker pool, test split (of the 5,000 bundled digits)")
    p.add_argument("--substitute", default="lenet5", help="substitute model (lenet5: a fit costs seconds, not a minute)")
    p.add_argument("--out", help="run folder (default: a new folder under runs/); with --from: where the combined "
                                 "rows, machine lines and plot go")
    p.add_argument("--from", dest="previous",
                   help="print the tables of finished run folders instead of running (comma-separated: the cells of "
                        "several runs of the same split together; the runs are deterministic, so a cell run twice is "
                        "the same row)")
    args = p.parse_args(argv)

    if args.previous:
        rows, machines, seen = [], [], set()
        for folder in args.previous.split(","):  # several runs of one split: their cells together
            with open(os.path.join(folder, "results.json")) as f:
                for r in json.load(f):
                    key = (r.get("recipe", "today"), r["method"], r["budget"], r["seed"])
                    if key not in seen:  # a cell in two runs: the first run's row (both are the same)
                        seen.add(key)
                        rows.append(r)
            machine_file = os.path.join(folder, "machine.txt")
            if os.path.exists(machine_file):
                with open(machine_file) as f:
                    machines.append(f.read().strip())
            else:
                machines.append(f"{folder}: machine and command not recorded (no machine.txt in the run folder)")
        out, machine, wall = args.previous.split(",")[0], "\n".join(machines), None
    else:
        from drmi_ray.experiment import run_experiment

        target_train, pool, test = (int(x) for x in args.split.split(","))
        out = args.out or new_run_folder("efficacy")
        machine = machine_and_run(argv)
        start = time.perf_counter()
        rows = []
        for recipe in args.recipes.split(","):
            config = ExperimentConfig()
            config.pool = dataclasses.replace(config.pool, target_train=target_train, pool=pool, test=test,
                                              split_seed=args.split_seed)
            config.selection = dataclasses.replace(
                config.selection, methods=tuple(args.methods.split(",")),
                budgets=tuple(int(b) for b in args.budgets.split(",")), seeds=args.seeds,
                first_seed=args.seed_offset)
            config.substitute = TrainConfig(model=args.substitute, augment=RECIPES[recipe]["augment"])
            config.learn = RECIPES[recipe]["learn"]
            config.substitute_workers = 0  # Train's local mode: hundreds of small fits
            rows += [{**r, "recipe": recipe} for r in run_experiment(config, os.path.join(out, recipe))]
        wall = time.perf_counter() - start
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(rows, f, indent=1)
        with open(os.path.join(out, "machine.txt"), "w") as f:
            f.write(machine + "\n")
    print(f"\nrun folder: {out}\n{machine}")
    print(tables(rows))
    if args.previous and args.out:  # the combined tables' plot and rows go to their own folder
        out = args.out
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(rows, f, indent=1)
        with open(os.path.join(out, "machine.txt"), "w") as f:
            f.write(f"{machine}\ncombined by `python benchmarks/efficacy.py --from {args.previous} --out {out}`\n")
    plot(rows, os.path.join(out, "efficacy.png"))
    print(f"\nplot: {os.path.join(out, 'efficacy.png')}")
    if wall is not None:
        print(f"wall time: {wall / 60:.1f} min on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
