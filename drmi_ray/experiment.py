"""The experiment: every stage of the pipeline (ARCHITECTURE.md) for methods x budgets x seeds.

pool (``pools.load_data``) -> target (trained or loaded) -> MI matrix -> acquisition through the
target's HTTP API (one Ray task per cell) -> the referee (``referee.py``: substitutes fitted with
Ray Train, concurrently; evaluation and PGD transfer as Ray tasks) -> run folder.

The attacker's side (selection, querying, substitute training) sees the target only through its
HTTP API (``drmi_ray.service``, served by Ray Serve for the run): each cell holds a
``TargetClient`` with its own API key, whose budget is that cell's. The referee's side
(ground-truth accuracy, fidelity, transfer rate) loads the target checkpoint itself: those
predictions are measurements, not the attacker's queries.

An outside endpoint (``config.endpoint.url``, ``--target-url``) replaces the target of ours:
every cell queries it on the attack's key, and the referee, holding no weights, asks it for its
labels of the test split and of each substitute's adversarial examples on the evaluation key
(``referee.evaluate_cell``), and the report states how many queries that took.

Reruns: the target's journal and operator key live in ``{out}/target/``, finished cells'
acquisitions in ``{out}/acquired/``, the trained target in ``{out}/target.pt``: running the same
``--out`` again resumes, and nothing the target answered is charged twice.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from contextlib import contextmanager

import fsspec
import numpy as np
import ray
from fsspec.implementations.local import LocalFileSystem
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from drmi_ray import report
from drmi_ray.acquisition import MI_METHODS, acquire
from drmi_ray.checks import check_out
from drmi_ray.client import TargetClient
from drmi_ray.config import PROTOCOLS, ExperimentConfig
from drmi_ray.ledger import key_conflicts
from drmi_ray.matrix import compute_mi_matrix
from drmi_ray.pools import load_data
from drmi_ray.referee import fit_and_score, substitute_job, target_labels
from drmi_ray.runtime import completed, init_ray, log, setup_logging, use_cpus
from drmi_ray.service import run_target, service_record
from drmi_ray.service_journal import check_service, read_journal
from drmi_ray.spread import knn_graph
from drmi_ray.target import train_target


class Timings(dict):
    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        log.info(f"{name} ...")
        yield
        self[name] = time.perf_counter() - start
        log.info(f"{name} done in {self[name]:.1f} s")


def apply_protocol(config: ExperimentConfig, protocol: str, root: str = "data") -> ExperimentConfig:
    """Settings of the paper's experiments.

    ``bundled-mnist``: the 5,000 bundled digits, split 2,000 / 2,000 / 1,000 (target / pool / test).
    ``paper-mnist``: torchvision MNIST under ``root``; the target trains on the 60k training set,
    the attacker's pool and the test split are disjoint halves of the 10k test set.
    ``paper-cifar10``: the same with CIFAR-10 (50k training set; 5k pool, 5k test) and ResNet18 as
    target and substitute; PGD with eps 8/255, step 2/255, 10 steps.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    r = dataclasses.replace
    if protocol == "bundled-mnist":
        return r(config, pool=r(config.pool, protocol=protocol, source="bundled-mnist"))
    name = "mnist" if protocol == "paper-mnist" else "cifar10"
    config = r(config, pool=r(config.pool, protocol=protocol, source=f"{name}:{root}",
                              target_train=60000 if name == "mnist" else 50000, pool=5000, test=5000))
    if name == "cifar10":
        config.target = r(config.target, train=r(config.target.train, model="resnet18", epochs=30))
        config.substitute = r(config.substitute, model="resnet18")
        config.attack = r(config.attack, eps=8 / 255, step_size=2 / 255, steps=10)
    return config


def quick(config: ExperimentConfig) -> ExperimentConfig:
    """The few-minute version: smaller pool and test set, two budgets, a LeNet-5 target and LeNet-5
    substitutes (a LeNet-5 fit and its PGD take seconds of CPU where C3F2's take half a minute:
    the target trains in 5 s instead of 33 s, to 95% instead of 96% on the test split)."""
    config = dataclasses.replace(config)
    config.pool = dataclasses.replace(config.pool, pool=600, test=500)
    config.selection = dataclasses.replace(config.selection, budgets=(50, 200))
    config.substitute = dataclasses.replace(config.substitute, model="lenet5")
    if config.target.train.model == "c3f2":  # the digits' target (paper-cifar10 keeps its ResNet)
        config.target = dataclasses.replace(config.target, train=dataclasses.replace(config.target.train, model="lenet5"))
    return config


def cell_name(cell) -> str:
    """A cell's client name at the target (its API key's name and request-id prefix)."""
    method, budget, seed = cell
    return f"{method}-{budget}-{seed}"


@ray.remote(num_cpus=1)
def acquire_cell(cell, pool_images, mi, client_settings, substitute_config):
    """The attacker for one cell: spend ``budget`` queries with ``method`` through the target's
    HTTP API (``client_settings``: ``TargetClient``'s URL, API key and options; the request ids
    are the cell's; nothing else of the target). Returns the answered images, their answers and
    pool indices, and how many images the target answered."""
    use_cpus()
    method, budget, seed = cell
    client = TargetClient(**client_settings, prefix=cell_name(cell))
    got = acquire(method, pool_images, budget, client.query, seed=seed, mi=mi, substitute_config=substitute_config)
    return got.images, got.labels, got.indices, client.answered


def acquire_all(cells, config, service, pool_ref, mi_ref, saved_dir):
    """Run every cell's acquisition as a Ray task, each through the target's HTTP API.

    ``service``: our target (``run_target``): each cell gets its own API key whose budget is the
    cell's, and the queries charged are the target's own count; None: the outside endpoint of
    ``config.endpoint``, every cell on the attack's key, the queries counted by the client.
    A finished cell's images and the target's answers are saved in ``saved_dir`` (the attacker's
    copy): a rerun of the run folder reuses them, and a cell cut short is asked again with the
    same request ids (our target returns its stored answers without charging them twice; an
    outside endpoint may charge them again).
    Returns {cell: (images, labels, pool indices, queries charged, PRADA flag of its key or None)}.
    """
    os.makedirs(saved_dir, exist_ok=True)
    task = acquire_cell
    if service and config.target.host in ("127.0.0.1", "localhost") and len([n for n in ray.nodes() if n["Alive"]]) > 1:
        # the service listens on this node's loopback only: run the cells here
        here = ray.get_runtime_context().get_node_id()
        task = acquire_cell.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False))
    refs, got = {}, {}
    for cell in cells:
        saved = os.path.join(saved_dir, f"{cell_name(cell)}.npz")
        if service:
            key = service.create_key(cell_name(cell), **config.target.key_settings(cell[1]))
            settings = {"url": service.url, "key": key, "max_batch": config.target.client_batch()}
        else:
            settings = config.endpoint.client_settings(config.endpoint.keys()[0])
        if os.path.exists(saved):
            with np.load(saved) as f:
                if "indices" in f:  # older run folders saved no indices: asked again, free (same request ids)
                    got[cell] = (f["images"], f["labels"], f["indices"], int(f["answered"]) if "answered" in f else -1)
                    continue
        ref = task.remote(cell, pool_ref, mi_ref if cell[0] in MI_METHODS else None, settings,
                          dataclasses.replace(config.substitute, seed=cell[2]))
        refs[ref] = cell
    if got:
        log.info(f"  reusing {len(got)} finished acquisitions from {saved_dir}")
    running = list(refs.values())
    for i, (images, labels, indices, answered) in completed(list(refs), what="acquired"):
        cell = running[i]
        got[cell] = images, labels, indices, answered
        saved = os.path.join(saved_dir, f"{cell_name(cell)}.npz")
        np.savez(saved + ".tmp.npz", images=images, labels=labels, indices=indices, answered=answered)
        os.replace(saved + ".tmp.npz", saved)
    results = {}
    for cell in cells:
        if service:
            usage = service.usage(cell_name(cell))
            results[cell] = (*got[cell][:3], usage["used"], usage["prada_flagged_at"])
        else:
            results[cell] = (*got[cell][:3], got[cell][3], None)
    return results


def check_resume(config: ExperimentConfig, work: str) -> None:
    """A rerun of a run folder resumes it only with the same target: refuse up front when its
    journal was written for another checkpoint or output, or holds one of this run's keys with
    another budget, rate limit or detector."""
    journal = os.path.join(work, "target", "journal.jsonl")
    records = read_journal(journal)
    tc = config.target
    checkpoint = tc.checkpoint or os.path.join(work, "target.pt")
    if records and os.path.exists(checkpoint):
        check_service(journal, records, service_record(checkpoint, tc.output, tc.decimals))
    sel = config.selection
    wanted = {cell_name((m, b, s)): tc.key_settings(b)
              for b in sel.budgets for s in range(sel.first_seed, sel.first_seed + sel.seeds) for m in sel.methods}
    clash = key_conflicts(records, wanted)
    if clash:
        raise ValueError(f"--out {work}: its target already has client {clash[0]!r} with other settings "
                         f"(rate limit, burst or PRADA); rerun with the settings of its config.json to resume, "
                         "or use a new --out")


def run_experiment(config: ExperimentConfig, out: str, *, address: str | None = None) -> list[dict]:
    """Run the whole experiment and write the run folder ``out`` (path or fsspec URL), on the Ray
    cluster at ``address`` (``runtime.init_ray``: default ``ray job submit``'s, else a local one)."""
    config.check()
    out = check_out(out)
    checked = None
    if config.endpoint.url:  # the endpoint answers and has the model, before anything starts
        checked = TargetClient(**config.endpoint.client_settings(config.endpoint.keys()[0]))
        checked.contract()
    setup_logging()
    init_ray(address)
    fs, out_path = fsspec.core.url_to_fs(out)
    local = isinstance(fs, LocalFileSystem)
    work = out_path if local else tempfile.mkdtemp(prefix="drmi-run-")
    check_resume(config, work)
    timings = Timings()

    with timings.stage("pool"):
        data = load_data(config.pool)

    endpoint = config.endpoint
    if endpoint.url:  # an outside endpoint: the referee asks it, on the evaluation key
        checked.request_body(data.pool[:1], "check")  # the input takes the pool's images (nothing is sent)
        referee = endpoint.client_settings(endpoint.keys()[1])
    else:
        referee = config.target.checkpoint
        if referee is None:
            referee = os.path.join(work, "target.pt")
            if os.path.exists(referee):  # a rerun: the target its journal was written for
                log.info(f"target: reusing {referee}")
            else:
                with timings.stage("target training"):
                    train_target(data.target_images, data.target_labels, referee, config=config.target.train)
    with timings.stage("referee: the target's labels of the test split"):
        labels_of_target, eval_queries = target_labels(referee, data.test_images)
    target_accuracy = float((labels_of_target == data.test_labels).mean())
    log.info(f"target accuracy on the test split: {100 * target_accuracy:.1f}%")

    sel = config.selection
    mi = None
    if any(m in MI_METHODS for m in sel.methods) or config.learn != "answers":
        with timings.stage("MI matrix"):
            store = compute_mi_matrix(data.pool, f"{out.rstrip('/')}/mi", **config.mi.store_options())
            mi = store.to_dense()

    cells = [(method, budget, seed) for budget in sel.budgets for seed in range(sel.first_seed, sel.first_seed + sel.seeds) for method in sel.methods]
    tc = config.target
    with timings.stage("selection and queries"):
        if endpoint.url:
            log.info(f"target: the endpoint {endpoint.url}/v2/models/{endpoint.model}/infer")
            acquired = acquire_all(cells, config, None, ray.put(data.pool), ray.put(mi), os.path.join(work, "acquired"))
        else:
            with run_target(referee, out, **tc.service_options()) as service:
                log.info(f"target: serving at {service.url}/v2/models/{service.model}/infer")
                acquired = acquire_all(cells, config, service, ray.put(data.pool), ray.put(mi),
                                       os.path.join(work, "acquired"))

    graph = None
    if config.learn != "answers":
        with timings.stage("MI graph of the pool"):
            graph = knn_graph(mi)
    with timings.stage("substitute training, evaluation and PGD transfer"):
        jobs, learned = [], []
        for c in cells:
            images, labels, indices = acquired[c][:3]
            job, info = substitute_job(images, labels, indices, dataclasses.replace(config.substitute, seed=c[2]),
                                       pool_images=data.pool, graph=graph, learn=config.learn)
            jobs.append(job)
            learned.append(info)
        scores = fit_and_score(jobs, referee, data.test_images, data.test_labels, labels_of_target, config,
                               storage_path=os.path.join(work, "train"), names=[f"referee-{cell_name(c)}" for c in cells])
    eval_queries += sum(sc.get("eval_queries", 0) for sc in scores)

    rows = []
    for cell, sc, info in zip(cells, scores, learned):
        _, _, _, queries, flagged_at = acquired[cell]
        rows.append({"method": cell[0], "budget": cell[1], "seed": cell[2], "queries": queries,
                     "accuracy": sc["accuracy"], "fidelity": sc["fidelity"], "transfer_rate": sc["transfer_rate"],
                     "prada_flagged_at": flagged_at, "learn": info["learn"]})
    pc = config.pool
    notes = [
        f"protocol: {pc.protocol} ({pc.source}); target trained on {len(data.target_images)}, "
        f"attacker pool {len(data.pool)}, test {len(data.test_images)} images",
        f"target: {config.target.train.model}, accuracy {100 * target_accuracy:.1f}% on the test split; "
        f"answers: {config.target.output}" if not endpoint.url else
        f"target: the endpoint {endpoint.url} (model {endpoint.model!r}), accuracy {100 * target_accuracy:.1f}% on the "
        f"test split; scored black-box: the test split and each substitute's adversarial examples cost "
        f"{eval_queries} evaluation queries (on the evaluation key), beside the attack's "
        f"{sum(a[3] for a in acquired.values())} queries",
        f"substitute: {config.substitute.model}, augment {config.substitute.augment}, learns from "
        f"{config.learn} (per cell: the results' learn column); MI: bins={config.mi.bins}, color={config.mi.color}; "
        f"PGD: eps={config.attack.eps:.3g}, step={config.attack.step_size:.3g}, steps={config.attack.steps}",
    ]
    report.write_run(work if local else out, rows, config=config.to_dict(), timings=dict(timings), notes=notes,
                     prada_delta=config.target.prada_delta)
    if not local:  # the target checkpoint and the attacker's saved acquisitions
        fs.put(work.rstrip("/") + "/", out_path, recursive=True)
    return rows
