"""The run folder: results.json, results.csv, report.md (tables) and PNG plots.

Rows are plain dicts with at least ``method, budget, seed, queries, accuracy, fidelity,
transfer_rate``. Cells (method x budget) over several seeds are reported as mean and a 95%
confidence interval (Student t; a single seed has no interval). ``out`` is a local path or any
fsspec URL.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
from collections import defaultdict

import fsspec
import matplotlib
import numpy as np
from scipy import stats

METRICS = ("accuracy", "fidelity", "transfer_rate")


def new_run_folder(name: str, root: str = "runs") -> str:
    """A fresh timestamped folder name under ``root`` (not created yet)."""
    return f"{root}/{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{name}"


def mean_ci(values) -> tuple[float, float]:
    """Mean and half-width of the 95% confidence interval (0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), 0.0
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean()), float(half)


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per (method, budget): n seeds, queries, and mean/ci of each metric."""
    cells = defaultdict(list)
    for row in rows:
        cells[(row["method"], row["budget"])].append(row)
    summary = []
    for (method, budget), cell in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        entry = {"method": method, "budget": budget, "seeds": len(cell),
                 "queries": sorted({r["queries"] for r in cell})}
        for metric in METRICS:
            entry[metric], entry[metric + "_ci"] = mean_ci([r[metric] for r in cell])
            entry[metric + "_seeds"] = [r[metric] for r in sorted(cell, key=lambda r: r["seed"])]
        summary.append(entry)
    return summary


def markdown_table(summary: list[dict]) -> str:
    """Paper-style table: one row per budget, one column group per method."""
    methods = list(dict.fromkeys(s["method"] for s in summary))
    by_cell = {(s["method"], s["budget"]): s for s in summary}
    budgets = sorted({s["budget"] for s in summary})
    lines = []
    for metric in METRICS:
        lines += [f"\n### {metric.replace('_', ' ')} (mean ± 95% CI over seeds; with fewer than "
                  f"{MIN_SEEDS_FOR_CI} seeds, each seed's value)\n",
                  "| budget | " + " | ".join(methods) + " |",
                  "|---:|" + "---:|" * len(methods)]
        for b in budgets:
            cells = []
            for m in methods:
                s = by_cell.get((m, b))
                if s is None:
                    cells.append("—")
                elif s["seeds"] < MIN_SEEDS_FOR_CI:  # too few seeds for an interval: each seed's value
                    cells.append(" / ".join(f"{100 * v:.1f}" for v in s[metric + "_seeds"]))
                else:
                    cells.append(f"{100 * s[metric]:.1f} ± {100 * s[metric + '_ci']:.1f}")
            lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def prada_table(rows: list[dict], delta: float) -> str:
    """Per method and budget: how many seeds' query streams PRADA flagged, and when."""
    cells = defaultdict(list)
    for row in rows:
        cells[(row["method"], row["budget"])].append(row.get("prada_flagged_at"))
    lines = [f"\n### PRADA detector (delta = {delta}): streams flagged / seeds, and at which query\n",
             "| method | budget | flagged | flagged at |", "|---|---:|---:|---|"]
    for (method, budget), flags in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        at = sorted(f for f in flags if f is not None)
        lines.append(f"| {method} | {budget} | {len(at)}/{len(flags)} | {', '.join(map(str, at)) or '—'} |")
    return "\n".join(lines)


MIN_SEEDS_FOR_CI = 3  # fewer seeds: each seed's value is shown, not a Student-t interval


def method_styles(methods) -> dict:
    """A colour and a marker of its own for each method (tab20 has 20 colours, 10 markers cycle)."""
    colours = matplotlib.colormaps["tab20"].colors
    markers = "osD^vP*Xph"
    return {m: {"color": colours[i % 20], "marker": markers[i % len(markers)]} for i, m in enumerate(methods)}


def plot(rows: list[dict]) -> bytes:
    """PNG: accuracy, fidelity and transfer rate against queries, one line per method (its own
    colour and marker). With at least ``MIN_SEEDS_FOR_CI`` seeds a cell shows its mean and 95%
    CI, kept inside 0-100 %; with fewer, the mean line and each seed's own point."""
    matplotlib.use("Agg")  # a file, no display; pyplot only after the backend is chosen
    import matplotlib.pyplot as plt

    summary = summarize(rows)
    methods = list(dict.fromkeys(s["method"] for s in summary))
    styles = method_styles(methods)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5.5 * len(METRICS), 4.5))
    for ax, metric in zip(axes, METRICS):
        for method in methods:
            cell = [s for s in summary if s["method"] == method]
            x = np.array([s["budget"] for s in cell])
            mean = np.array([100 * s[metric] for s in cell])
            if min(s["seeds"] for s in cell) >= MIN_SEEDS_FOR_CI:
                half = np.array([100 * s[metric + "_ci"] for s in cell])
                low, high = np.clip(mean - half, 0, 100), np.clip(mean + half, 0, 100)
                ax.errorbar(x, mean, yerr=[mean - low, high - mean], capsize=3, label=method, **styles[method])
            else:
                ax.plot(x, mean, label=method, **styles[method])
                points = [(r["budget"], 100 * r[metric]) for r in rows if r["method"] == method]
                ax.scatter(*zip(*points), s=12, alpha=0.5, color=styles[method]["color"],
                           marker=styles[method]["marker"])
        ax.set_xlabel("queries to the target")
        ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
        ax.grid(alpha=0.3)
    seeds = min(s["seeds"] for s in summary)
    fig.suptitle("mean and 95% CI over seeds" if seeds >= MIN_SEEDS_FOR_CI else
                 f"mean (line) and each seed (points): fewer than {MIN_SEEDS_FOR_CI} seeds, no interval")
    axes[0].legend(fontsize=8, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_text(url: str, text: str | bytes) -> None:
    mode = "wb" if isinstance(text, bytes) else "w"
    with fsspec.open(url, mode) as f:
        f.write(text)


def write_run(out: str, rows: list[dict], *, config: dict, timings: dict, notes: list[str] = (),
              prada_delta: float | None = None) -> None:
    """Write results.json, results.csv, report.md, results.png and config.json under ``out``."""
    fs, path = fsspec.core.url_to_fs(out)
    fs.makedirs(path, exist_ok=True)
    write_text(f"{out}/results.json", json.dumps(rows, indent=1))
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text(f"{out}/results.csv", buf.getvalue())
    write_text(f"{out}/config.json", json.dumps(config, indent=1))
    summary = summarize(rows)
    write_text(f"{out}/results.png", plot(rows))
    timing_lines = "\n".join(f"| {stage} | {seconds:.1f} |" for stage, seconds in timings.items())
    report = (
        "# drmi-ray run\n\n"
        + "".join(f"- {note}\n" for note in notes)
        + "\nQueries per cell as counted by the target: "
        + ", ".join(f"{s['method']}@{s['budget']}={'/'.join(map(str, s['queries']))}" for s in summary)
        + "\n" + markdown_table(summary)
        + ("\n" + prada_table(rows, prada_delta) if prada_delta is not None else "")
        + "\n\n![results](results.png)\n\n### wall time per stage\n\n| stage | seconds |\n|---|---:|\n"
        + timing_lines + "\n"
    )
    write_text(f"{out}/report.md", report)
