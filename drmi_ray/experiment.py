"""The experiment: every stage of the pipeline (ARCHITECTURE.md) for methods x budgets x seeds.

pool -> target (trained or loaded) -> MI matrix -> acquisition through the target's HTTP API
(one Ray task per cell) -> substitutes (Ray Train, concurrently) -> evaluation and PGD transfer
(Ray tasks) -> run folder.

The attacker's side (selection, querying, substitute training) sees the target only through its
HTTP API (``drmi_ray.service``, served by Ray Serve for the run): each cell holds a
``TargetClient`` with its own API key, whose budget is that cell's. The referee's side
(ground-truth accuracy, fidelity, transfer rate) loads the target checkpoint itself: those
predictions are measurements, not the attacker's queries.

An outside endpoint (``config.endpoint.url``, ``--target-url``) replaces the target of ours:
every cell queries it on the attack's key, and the referee, holding no weights, asks it for its
labels of the test split and of each substitute's adversarial examples on the evaluation key
(``evaluate_cell``), and the report states how many queries that took.

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

from drmi_ray import report
from drmi_ray.attack import transfer, transfer_rate
from drmi_ray.baselines import METHODS, MI_METHODS, acquire
from drmi_ray.config import ExperimentConfig
from drmi_ray.data import load_pool, split_indices
from drmi_ray.matrix import compute_mi_matrix
from drmi_ray.models import TrainConfig, predict
from drmi_ray.substitute import evaluate, fit_substitutes
from drmi_ray.client import TargetClient, labels_of
from drmi_ray.runtime import completed, gather, init_ray, log, setup_logging, use_cpus
from drmi_ray.service import run_target
from drmi_ray.target import load_classifier, train_target


@dataclasses.dataclass
class Data:
    target_images: np.ndarray  # the target's training set (never the attacker's)
    target_labels: np.ndarray
    pool: np.ndarray  # the attacker's unlabeled pool
    test_images: np.ndarray  # the referee's held-out truth
    test_labels: np.ndarray


def load_data(config: ExperimentConfig) -> Data:
    """The protocol's three disjoint parts (see ``config.apply_protocol``)."""
    pc = config.pool
    if pc.protocol == "bundled-mnist" or not pc.protocol.startswith("paper-"):
        pool = load_pool(pc.source, size=pc.size, download=pc.download)
        s = split_indices(len(pool), target_train=pc.target_train, pool=pc.pool, test=pc.test, seed=pc.split_seed)
        return Data(pool.images[s.target_train], pool.labels[s.target_train], pool.images[s.pool],
                    pool.images[s.test], pool.labels[s.test])
    train = load_pool(pc.source, download=pc.download)
    name, _, root = pc.source.partition(":")
    held_out = load_pool(f"{name}-test:{root}", download=pc.download)
    if pc.pool + pc.test > len(held_out):
        raise ValueError(f"pool ({pc.pool}) + test ({pc.test}) exceed the {len(held_out)} held-out images of {name}")
    rng = np.random.default_rng(pc.split_seed)
    target_idx = rng.permutation(len(train))[: pc.target_train]
    order = rng.permutation(len(held_out))  # kept in this seeded order (see split_indices)
    pool_idx, test_idx = order[: pc.pool], order[pc.pool: pc.pool + pc.test]
    return Data(train.images[target_idx], train.labels[target_idx], held_out.images[pool_idx],
                held_out.images[test_idx], held_out.labels[test_idx])


def check_config(config: ExperimentConfig) -> None:
    """Refuse a configuration that cannot run, before any work is done (no Ray, no image decoded;
    a pool URL is listed to bound the splits by its image count).

    Each refusal is a ValueError of one line naming the ``drmi run`` flag (or, for settings with
    no flag, the ``config.json`` key) and the fix.
    """
    from drmi_ray.config import (MAX_SIZE, PAPER_HELD_OUT, PROTOCOLS, SEED_MAX, check_attack, check_bool,
                                 check_checkpoint, check_choice, check_int, check_number, check_source,
                                 check_train, pool_images)
    from drmi_ray.images import MIN_SIDE
    from drmi_ray.mi import COLOR_MODES, LEVELS
    from drmi_ray.service import OUTPUTS
    from drmi_ray.spread import LEARN_MODES

    pc, sel, tc = config.pool, config.selection, config.target
    unknown = [m for m in sel.methods if m not in METHODS]
    if isinstance(sel.methods, str) or not sel.methods or unknown:
        raise ValueError(f"--methods: unknown method(s) {unknown or list(sel.methods)}; "
                         f"choose from {', '.join(METHODS)} (or 'all')")
    if not sel.budgets or isinstance(sel.budgets, str):
        raise ValueError(f"--budgets must list at least one budget, like 50,100,200; got {sel.budgets!r}")
    for budget in sel.budgets:
        check_int("--budgets", budget, minimum=2, fix="each budget must be at least 2 queries")
    check_int("--seeds", sel.seeds, maximum=1_000, fix="give the number of seeds per (method, budget) cell")
    check_int("selection.first_seed (config.json)", sel.first_seed, minimum=0, maximum=SEED_MAX)
    # pool and splits
    check_choice("--protocol", pc.protocol, PROTOCOLS)
    check_int("--pool-size", pc.pool, maximum=10**8)
    check_int("--test-size", pc.test, maximum=10**8)
    check_int("pool.target_train (config.json)", pc.target_train, maximum=10**8)
    check_int("pool.split_seed (config.json)", pc.split_seed, minimum=0, maximum=SEED_MAX)
    check_int("pool.size (config.json)", pc.size, minimum=MIN_SIDE, maximum=MAX_SIZE, none_ok=True)
    check_bool("--download", pc.download)
    if max(sel.budgets) > pc.pool:
        raise ValueError(f"--budgets: budget {max(sel.budgets)} is larger than the attacker's pool ({pc.pool} images); "
                         "lower the budget or enlarge the pool with --pool-size")
    check_source("--pool", pc.source, download=pc.download)
    if pc.protocol.startswith("paper-"):
        if pc.pool + pc.test > PAPER_HELD_OUT:
            raise ValueError(f"--pool-size {pc.pool} + --test-size {pc.test} exceed the {PAPER_HELD_OUT} held-out "
                             "images of the paper protocols; lower them")
    else:
        n = pool_images(pc.source)  # a URL is listed
        if pc.target_train + pc.pool + pc.test > n:
            raise ValueError(f"--pool-size {pc.pool} + --test-size {pc.test} + {pc.target_train} target training "
                             f"images exceed the {n:,} images of {pc.source}; lower --pool-size or --test-size")
    # MI
    check_int("--bins", config.mi.bins, minimum=2, maximum=LEVELS, fix="give the grey levels per pixel (default 256)")
    check_choice("--color", config.mi.color, COLOR_MODES)
    # the target
    check_checkpoint("--target", tc.checkpoint)
    config.endpoint.check()
    if config.endpoint.url:
        if tc.checkpoint:
            raise ValueError("--target and --target-url: give one (a checkpoint we serve, or an endpoint to attack)")
        cells = len(sel.methods) * len(sel.budgets) * sel.seeds
        most = pc.test * (1 + cells)  # the test split once, then each substitute's adversarial examples
        if config.endpoint.eval_budget is not None and config.endpoint.eval_budget < most:
            raise ValueError(f"--eval-budget {config.endpoint.eval_budget}: the referee may need {most} queries (the "
                             f"{pc.test} test images, then up to {pc.test} adversarial examples for each of {cells} "
                             "substitutes); raise it, or lower --test-size")
    check_number("--rate-limit", tc.rate_limit, above=0, at_most=1e9, none_ok=True,
                 fix="give images/s, or leave the flag out for no limit")
    check_number("--burst", tc.burst, above=0, at_most=1e9, fix="give how many images may pass at once (default 1)")
    check_int("--target-replicas", tc.replicas, maximum=256)
    check_int("--serve-port", tc.port, minimum=1, maximum=65535, none_ok=True)
    check_choice("--output", tc.output, OUTPUTS)
    check_int("target.decimals (config.json)", tc.decimals, minimum=0, maximum=10)
    check_number("target.prada_delta (config.json)", tc.prada_delta, above=0, at_most=1, none_ok=True,
                 fix="use --no-prada to switch the detector off")
    check_train(dataclasses.asdict(tc.train), lambda f: f"target.train.{f} (config.json)")
    # substitutes and PGD
    check_train(dataclasses.asdict(config.substitute),
                lambda f: "--substitute" if f == "model" else f"substitute.{f} (config.json)")
    check_attack(dataclasses.asdict(config.attack), lambda f: f"attack.{f} (config.json)")
    check_choice("--learn", config.learn, LEARN_MODES)
    check_int("--substitute-workers", config.substitute_workers, minimum=0, maximum=1_024,
              fix="0 fits in Ray Train's local mode")
    check_bool("substitute_gpu (config.json)", config.substitute_gpu)


class Timings(dict):
    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        log.info(f"{name} ...")
        yield
        self[name] = time.perf_counter() - start
        log.info(f"{name} done in {self[name]:.1f} s")


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


def endpoint_labels(client_settings: dict, images: np.ndarray, prefix: str) -> tuple[np.ndarray, int]:
    """An outside endpoint's labels for ``images`` (the referee's queries, request ids
    ``{prefix}-N``) and how many images it answered."""
    client = TargetClient(**client_settings, prefix=prefix)
    return labels_of(client.query(images)), client.answered


@ray.remote(num_cpus=1)
def evaluate_cell(target, substitute, test_images, test_labels, target_labels, attack_config, name="referee"):
    """Referee: the substitute's accuracy and fidelity, and the transfer rate of its PGD examples.

    ``target``: the target's checkpoint, or an outside endpoint's client settings (its
    evaluation key): the adversarial examples are then sent to the endpoint (request ids
    ``{name}-N``) and ``eval_queries`` counts them."""
    use_cpus()
    scores = evaluate(substitute, test_images, test_labels, target_labels)
    if isinstance(target, str):
        scores["transfer_rate"] = transfer_rate(substitute, load_classifier(target), test_images, test_labels,
                                                attack_config)
        return scores
    asked = []

    def answer(images):
        labels, answered = endpoint_labels(target, images, f"{name}-{len(asked)}")
        asked.append(answered)
        return labels

    scores["transfer_rate"] = transfer(substitute, answer, test_images, test_labels, attack_config,
                                       target_labels=target_labels)["transfer_rate"]
    scores["eval_queries"] = sum(asked)
    return scores


def substitute_job(images, labels, indices, train: TrainConfig, *, pool_images=None, graph=None,
                   learn: str = "answers") -> tuple[tuple, dict]:
    """One substitute's Ray Train job ``(images, answers, TrainConfig[, pool])`` and how it learns.

    ``indices``: each answered image's row in ``pool_images`` (-1: not a pool image, e.g. jbda's);
    ``graph``: the pool's kNN graph (``spread.knn_graph``). With ``learn`` "pool" (or "auto" and
    ``spread.use_pool`` says so) the answers are spread over ``graph`` and the reached pool images
    join the fit (``spread.pool_targets``); the pool's own labels are never read. Returns the job
    and ``{"learn": "answers"|"pool", "reached", "unreached"}``.
    """
    from drmi_ray.spread import pool_targets, use_pool

    mine = np.asarray(indices) >= 0
    if learn == "auto":
        learn = "pool" if pool_images is not None and use_pool(int(mine.sum()), len(pool_images)) else "answers"
    if learn == "answers" or graph is None:
        return (images, labels, train), {"learn": "answers"}
    rows, mass, info = pool_targets(graph, np.asarray(indices)[mine], np.asarray(labels)[mine], train.num_classes)
    if not len(rows):  # nothing reached (e.g. an all-blank pool): the answers alone
        log.info("  pool learning: no pool image is linked to an answered one; fitting on the answers alone")
        return (images, labels, train), {"learn": "answers", **info}
    return (images, labels, train, (pool_images[rows], mass)), {"learn": "pool", **info}


def fit_and_score(jobs, target, test_images, test_labels, target_labels, config, *,
                  storage_path: str | None = None, names=None) -> list[dict]:
    """The tail every run shares (``drmi run`` and ``reduce``): fit one substitute per job
    ``(images, the target's answers, TrainConfig)`` with Ray Train, then referee each: accuracy,
    fidelity and the PGD transfer rate against the target (its checkpoint, or an outside
    endpoint's client settings: see ``evaluate_cell``; ``names``: each job's request-id prefix).

    ``config``: an ExperimentConfig or ReduceConfig (``substitute_workers``, ``substitute_gpu``,
    ``attack``). ``storage_path``: where Ray Train keeps the runs and their weight checkpoints.
    Returns one ``{accuracy, fidelity, transfer_rate, n}`` per job, in order.
    """
    substitutes = fit_substitutes(jobs, num_workers=config.substitute_workers, use_gpu=config.substitute_gpu,
                                  storage_path=storage_path)
    refs = [ray.put(x) for x in (test_images, test_labels, target_labels)]
    names = names or [f"referee-{i}" for i in range(len(jobs))]
    return gather([evaluate_cell.remote(target, s, *refs, config.attack, name) for s, name in zip(substitutes, names)],
                  what="evaluated")


def key_settings(config: ExperimentConfig, budget: int) -> dict:
    """The API key of a cell: its budget and the target's rate limit and PRADA settings."""
    tc = config.target
    return {"budget": budget, "rate_limit": tc.rate_limit, "burst": tc.burst, "prada_delta": tc.prada_delta}


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
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = ray.get_runtime_context().get_node_id()
        task = acquire_cell.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False))
    refs, got = {}, {}
    for cell in cells:
        saved = os.path.join(saved_dir, f"{cell_name(cell)}.npz")
        if service:
            key = service.create_key(cell_name(cell), **key_settings(config, cell[1]))
            burst = None if config.target.rate_limit is None else max(1, int(config.target.burst))
            settings = {"url": service.url, "key": key, "max_batch": burst}
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
    from drmi_ray.ledger import check_service, key_conflicts, read_journal
    from drmi_ray.service import service_record

    journal = os.path.join(work, "target", "journal.jsonl")
    records = read_journal(journal)
    tc = config.target
    checkpoint = tc.checkpoint or os.path.join(work, "target.pt")
    if records and os.path.exists(checkpoint):
        check_service(journal, records, service_record(checkpoint, tc.output, tc.decimals))
    sel = config.selection
    wanted = {cell_name((m, b, s)): key_settings(config, b)
              for b in sel.budgets for s in range(sel.first_seed, sel.first_seed + sel.seeds) for m in sel.methods}
    clash = key_conflicts(records, wanted)
    if clash:
        raise ValueError(f"--out {work}: its target already has client {clash[0]!r} with other settings "
                         f"(rate limit, burst or PRADA); rerun with the settings of its config.json to resume, "
                         "or use a new --out")


def run_experiment(config: ExperimentConfig, out: str) -> list[dict]:
    """Run the whole experiment and write the run folder ``out`` (path or fsspec URL)."""
    from drmi_ray.config import check_out

    check_config(config)
    out = check_out(out)
    checked = None
    if config.endpoint.url:  # the endpoint answers and has the model, before anything starts
        checked = TargetClient(**config.endpoint.client_settings(config.endpoint.keys()[0]))
        checked.contract()
    setup_logging()
    init_ray()
    fs, out_path = fsspec.core.url_to_fs(out)
    local = isinstance(fs, LocalFileSystem)
    work = out_path if local else tempfile.mkdtemp(prefix="drmi-run-")
    check_resume(config, work)
    timings = Timings()

    with timings.stage("pool"):
        data = load_data(config)

    endpoint = config.endpoint
    if endpoint.url:  # an outside endpoint: the referee asks it for the test split's labels
        checked.request_body(data.pool[:1], "check")  # the input takes the pool's images (nothing is sent)
        referee = endpoint.client_settings(endpoint.keys()[1])
        with timings.stage("referee: the endpoint's labels of the test split"):
            target_labels, eval_queries = endpoint_labels(referee, data.test_images, "referee-test")
    else:
        referee, eval_queries = config.target.checkpoint, 0
        if referee is None:
            referee = os.path.join(work, "target.pt")
            if os.path.exists(referee):  # a rerun: the target its journal was written for
                log.info(f"target: reusing {referee}")
            else:
                with timings.stage("target training"):
                    train_target(data.target_images, data.target_labels, referee, config=config.target.train)
        target_labels = predict(load_classifier(referee), data.test_images)
    target_accuracy = float((target_labels == data.test_labels).mean())
    log.info(f"target accuracy on the test split: {100 * target_accuracy:.1f}%")

    sel = config.selection
    mi = None
    if any(m in MI_METHODS for m in sel.methods) or config.learn != "answers":
        with timings.stage("MI matrix"):
            store = compute_mi_matrix(data.pool, f"{out.rstrip('/')}/mi", bins=config.mi.bins, color=config.mi.color)
            mi = store.to_dense()

    cells = [(method, budget, seed) for budget in sel.budgets for seed in range(sel.first_seed, sel.first_seed + sel.seeds) for method in sel.methods]
    tc = config.target
    with timings.stage("selection and queries"):
        if endpoint.url:
            log.info(f"target: the endpoint {endpoint.url}/v2/models/{endpoint.model}/infer")
            acquired = acquire_all(cells, config, None, ray.put(data.pool), ray.put(mi), os.path.join(work, "acquired"))
        else:
            with run_target(referee, out, output=tc.output, decimals=tc.decimals, replicas=tc.replicas,
                            host=tc.host, port=tc.port) as service:
                log.info(f"target: serving at {service.url}/v2/models/{service.model}/infer")
                acquired = acquire_all(cells, config, service, ray.put(data.pool), ray.put(mi),
                                       os.path.join(work, "acquired"))

    graph = None
    if config.learn != "answers":
        from drmi_ray.spread import knn_graph

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
        scores = fit_and_score(jobs, referee, data.test_images, data.test_labels, target_labels, config,
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
