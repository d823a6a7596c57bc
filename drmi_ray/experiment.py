"""The experiment: every stage of DESIGN.md's pipeline, once, for methods x budgets x seeds.

pool -> target (trained or loaded) -> MI matrix -> selections -> queries through the target actor
-> substitutes (Ray Train, concurrently) -> evaluation and PGD transfer (Ray tasks) -> run folder.

The attacker's side (selection, querying, substitute training) sees the target only through the
BlackBoxTarget actor. The referee's side (ground-truth accuracy, fidelity, transfer rate) loads
the target checkpoint itself: those predictions are measurements, not the attacker's queries.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from contextlib import contextmanager

import fsspec
from fsspec.implementations.local import LocalFileSystem
import numpy as np
import ray

from drmi_ray import report
from drmi_ray.attack import transfer_rate
from drmi_ray.config import ExperimentConfig
from drmi_ray.data import load_pool, split_indices
from drmi_ray.matrix import compute_mi_matrix
from drmi_ray.optimize import select
from drmi_ray.substitute import evaluate, fit_substitutes
from drmi_ray.target import BlackBoxTarget, load_classifier, predict, train_target

METHODS = ("drmi", "random")


def choose(method: str, mi: np.ndarray, budget: int, seed: int) -> np.ndarray:
    """The pool indices a method spends its budget on (sorted)."""
    if method == "drmi":
        return select(mi, budget, seed=seed).indices
    if method == "random":
        return np.sort(np.random.default_rng(seed).choice(len(mi), size=budget, replace=False))
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def check_config(config: ExperimentConfig) -> None:
    """Refuse a configuration that cannot run, before any work is done."""
    sel = config.selection
    unknown = [m for m in sel.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if not sel.budgets or min(sel.budgets) < 2:
        raise ValueError(f"budgets must each be at least 2 queries, got {list(sel.budgets)}")
    if max(sel.budgets) > config.pool.pool:
        raise ValueError(
            f"budget {max(sel.budgets)} is larger than the attacker's pool ({config.pool.pool} images); "
            "lower the budget or enlarge the pool"
        )
    if sel.seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {sel.seeds}")


class Timings(dict):
    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        print(f"[drmi] {name} ...", flush=True)
        yield
        self[name] = time.perf_counter() - start
        print(f"[drmi] {name} done in {self[name]:.1f} s", flush=True)


@ray.remote
def evaluate_cell(checkpoint, substitute, test_images, test_labels, target_labels, attack_config):
    """Referee: the substitute's accuracy and fidelity, and the transfer rate of its PGD examples."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    target_model = load_classifier(checkpoint)
    scores = evaluate(substitute, test_images, test_labels, target_labels)
    scores["transfer_rate"] = transfer_rate(substitute, target_model, test_images, test_labels, attack_config)
    return scores


def run_experiment(config: ExperimentConfig, out: str) -> list[dict]:
    """Run the whole experiment and write the run folder ``out`` (path or fsspec URL)."""
    check_config(config)
    if not ray.is_initialized():
        ray.init()
    fs, out_path = fsspec.core.url_to_fs(out)
    local = isinstance(fs, LocalFileSystem)
    work = out_path if local else tempfile.mkdtemp(prefix="drmi-run-")
    os.makedirs(work, exist_ok=True)
    timings = Timings()

    with timings.stage("pool"):
        pool = load_pool(config.pool.source, size=config.pool.size, download=config.pool.download)
        pc = config.pool
        splits = split_indices(len(pool), target_train=pc.target_train, pool=pc.pool, test=pc.test, seed=pc.split_seed)
        attacker_images = pool.images[splits.pool]  # the attacker never reads pool.labels[splits.pool]
        test_images, test_labels = pool.images[splits.test], pool.labels[splits.test]

    checkpoint = config.target.checkpoint
    if checkpoint is None:
        with timings.stage("target training"):
            checkpoint = os.path.join(work, "target.pt")
            train_target(pool.images[splits.target_train], pool.labels[splits.target_train], checkpoint,
                         config=config.target.train)
    target_model = load_classifier(checkpoint)
    target_labels = predict(target_model, test_images)
    target_accuracy = float((target_labels == test_labels).mean())
    print(f"[drmi] target accuracy on the test split: {100 * target_accuracy:.1f}%", flush=True)

    with timings.stage("MI matrix"):
        store = compute_mi_matrix(attacker_images, f"{out.rstrip('/')}/mi", bins=config.mi.bins, color=config.mi.color)
        mi = store.to_dense()

    cells = [(method, budget, seed) for budget in config.selection.budgets
             for seed in range(config.selection.seeds) for method in config.selection.methods]
    with timings.stage("selection"):
        chosen = {cell: choose(cell[0], mi, cell[1], cell[2]) for cell in cells}

    with timings.stage("queries"):
        os.makedirs(os.path.join(work, "audit"), exist_ok=True)
        answers, queries = {}, {}
        for cell in cells:
            method, budget, seed = cell
            target = BlackBoxTarget.remote(
                checkpoint, budget=budget, rate_limit=config.target.rate_limit, output=config.target.output,
                audit_path=os.path.join(work, "audit", f"{method}-{budget}-{seed}.jsonl"),
            )
            answer = np.asarray(ray.get(target.query.remote(attacker_images[chosen[cell]])))
            answers[cell] = answer if answer.ndim == 1 else answer.argmax(axis=1)
            queries[cell] = ray.get(target.queries_used.remote())
            ray.kill(target)

    with timings.stage("substitute training"):
        jobs = [(attacker_images[chosen[c]], answers[c], dataclasses.replace(config.substitute, seed=c[2])) for c in cells]
        substitutes = fit_substitutes(jobs)

    with timings.stage("evaluation and PGD transfer"):
        refs = [ray.put(x) for x in (test_images, test_labels, target_labels)]
        scores = ray.get([evaluate_cell.remote(checkpoint, s, *refs, config.attack) for s in substitutes])

    rows = [
        {"method": m, "budget": b, "seed": s, "queries": queries[(m, b, s)],
         "accuracy": sc["accuracy"], "fidelity": sc["fidelity"], "transfer_rate": sc["transfer_rate"]}
        for (m, b, s), sc in zip(cells, scores)
    ]
    notes = [
        f"pool: {config.pool.source}; target trained on {pc.target_train}, attacker pool {pc.pool}, test {pc.test} images",
        f"target: {config.target.train.model}, accuracy {100 * target_accuracy:.1f}% on the test split",
        f"substitute: {config.substitute.model}; MI: bins={config.mi.bins}, color={config.mi.color}",
    ]
    report.write_run(work if local else out, rows, config=config.to_dict(),
                     timings=dict(timings), notes=notes)
    if not local:
        fs.put(work, out_path, recursive=True)
    return rows
