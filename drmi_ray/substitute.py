"""The substitute: classifiers fitted with Ray Train on the target's answers, and their evaluation.

- ``fit_substitutes(jobs)`` fits every ``(images, labels, TrainConfig)`` job in ONE Ray Train
  run (one ``ray.train.torch.TorchTrainer.fit``, Train V2), so Train's fixed cost (controller,
  worker group, process group: ``benchmarks/fit_overhead.py`` prints it) is paid once per grid,
  not per substitute. Each substitute runs ``models.fit_model`` (the same loop that trains the target):
  - ``num_workers=1`` (default): the run has one worker per substitute fitted at once
    (``max_concurrent``, default as many as the cluster's CPUs hold); the jobs are dealt out
    to the workers in shares of about equal work and each worker fits its share one after
    another, each substitute on that one worker.
  - ``num_workers > 1``: the run has ``num_workers`` workers and fits the jobs one after
    another, each with DDP over all of them (each takes its slice of every global batch).
  - ``num_workers=0``: Train V2's local mode (the loop runs in the calling process, no worker
    actors); the shares go to one Ray task each, each task one local-mode run. For quick tests.
  Images and labels go to the workers through the object store (``ray.put`` once per job).
- ``fit_substitute(images, labels, config)``: the same for one job.
- ``evaluate(model, test_images, test_labels, target_labels)``: ``accuracy`` against ground
  truth and ``fidelity`` = share of test images on which the substitute's label equals the
  target's label (``target_labels``: what the target says on the same test images).

How the weights come back: each worker ``torch.save``s the ``state_dict`` of every substitute
it fitted as ``model-{i}.pt`` (``i``: the job's index; with DDP rank 0 saves) into one Ray Train
``Checkpoint`` that it reports once, at the end, with ``ray.train.report`` (every rank reports
once, as Train V2 requires). Ray copies every rank's files into the same folder of the run's
storage, ``{storage_path}/{run name}/checkpoint_final/``, and the driver rebuilds CPU models from
``Result.checkpoint`` (``torch.load(weights_only=True)``); ``losses-{i}.json`` beside each holds
the mean loss per pass. Weights never go through Ray's object store, so ResNet-152 or
Inception-v3 substitutes come back the same way as LeNet-5. One run for the grid also means that
one failed fit fails the whole run (``max_failures=0``). Callers pass their run folder's
storage as ``storage_path`` (e.g. ``{out}/train``); on a multi-node cluster it must be shared
storage (NFS, or a URI such as ``s3://`` with real workers), as for any Ray Train run. In local
mode Train's ``report`` copies nothing (it keeps the ``Checkpoint`` object as given), so the loop
writes into that same folder itself; local mode therefore needs a local (or NFS) ``storage_path``.

Determinism: a substitute fitted on one worker is the one ``models.train_classifier`` gives for
the same config and seed (same torch thread count: ``runtime.use_cpus`` gives the worker one per CPU), whatever
else that worker fitted before it; with DDP it is deterministic per seed and ``num_workers``.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch import nn

from .images import check_images
from .models import (TrainConfig, build_model, check_labels, check_pool, fit_model, image_geometry, num_steps,
                     pool_tensors, predict, to_tensor)
from .runtime import init_ray, log, use_cpus

CHECKPOINT_DIR = "checkpoint_final"  # the checkpoint's folder inside the Train run folder


def weights_file(i: int) -> str:
    """Job ``i``'s ``state_dict`` inside the checkpoint."""
    return f"model-{i}.pt"


def _fit_one(images, labels, pool, config: TrainConfig, *, rank: int, world: int, use_gpu: bool):
    """One substitute on this worker (DDP over the run's workers when ``world > 1``)."""
    in_channels, size = image_geometry(images)
    torch.manual_seed(config.seed)
    model = build_model(config.model, in_channels=in_channels, num_classes=config.num_classes,
                        image_size=size)
    if world > 1 or use_gpu:  # device placement; DDP when world > 1
        model = ray.train.torch.prepare_model(model, parallel_strategy="ddp" if world > 1 else None)
    losses: list[float] = []
    fit_model(model, to_tensor(images), torch.from_numpy(labels), config, pool=pool_tensors(pool), rank=rank,
              world_size=world, on_epoch=lambda epoch, loss: losses.append(loss))
    inner = model.module if hasattr(model, "module") else model
    return {k: v.detach().cpu() for k, v in inner.state_dict().items()}, losses


def _train_loop(cfg: dict) -> None:
    """The Ray Train worker function: fit this worker's jobs, then report their weights.

    ``cfg["shares"][rank]``: the jobs this worker fits on its own; ``None``: every rank takes
    part in every job (DDP). ``cfg["local_checkpoint"]`` is set in local mode only: the folder
    to write to (local mode's ``report`` keeps the ``Checkpoint`` as given and copies nothing).
    """
    use_cpus()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    ddp = cfg["shares"] is None
    mine = range(len(cfg["jobs"])) if ddp else cfg["shares"][rank]
    with tempfile.TemporaryDirectory() as tmp:  # report uploads it before returning
        folder = cfg["local_checkpoint"] or tmp
        os.makedirs(folder, exist_ok=True)
        for i in mine:
            ref, config = cfg["jobs"][i]
            images, labels, pool = ray.get(ref)
            state, losses = _fit_one(images, labels, pool, TrainConfig(**config), use_gpu=cfg["use_gpu"],
                                     rank=rank if ddp else 0, world=world if ddp else 1)
            if rank == 0 or not ddp:
                torch.save(state, os.path.join(folder, weights_file(i)))
                with open(os.path.join(folder, f"losses-{i}.json"), "w") as f:
                    json.dump(losses, f)
        wrote = bool(mine) and (rank == 0 or not ddp)
        checkpoint = ray.train.Checkpoint.from_directory(folder) if wrote else None
        if cfg["local_checkpoint"]:
            ray.train.report({}, checkpoint=checkpoint)
        else:  # a collective in Train V2: every rank calls it, once here
            ray.train.report({}, checkpoint=checkpoint, checkpoint_dir_name=CHECKPOINT_DIR)


def _run(train_loop_config: dict, *, num_workers: int, use_gpu: bool, cpus_per_worker: float,
         storage_path: str, name: str):
    """One TorchTrainer.fit; returns its Result (raises the run's error)."""
    scaling = ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                            resources_per_worker=None if num_workers == 0 else
                            {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})})
    run = RunConfig(name=name, storage_path=storage_path,
                    failure_config=FailureConfig(max_failures=0))
    result = TorchTrainer(_train_loop, train_loop_config=train_loop_config,
                          scaling_config=scaling, run_config=run).fit()
    if result.error is not None:
        raise result.error
    return result


def _run_local(train_loop_config: dict, storage_path: str, name: str) -> None:
    """A Ray task: one local-mode run (the loop in this task's process, one torch thread per CPU)."""
    use_cpus()
    _run(train_loop_config, num_workers=0, use_gpu=False, cpus_per_worker=0,
         storage_path=storage_path, name=name)


def _shares(jobs, k: int) -> list[list[int]]:
    """Job indices dealt into ``k`` shares of about equal work (images per step x steps):
    the largest job first, each to the least loaded share."""
    cost = [num_steps(len(x), c) * (min(len(x), c.batch_size) + (c.batch_size if pool else 0))
            for x, _, c, pool in jobs]
    shares, load = [[] for _ in range(k)], [0] * k
    for i in sorted(range(len(jobs)), key=lambda i: -cost[i]):
        w = load.index(min(load))
        shares[w].append(i)
        load[w] += cost[i]
    return [sorted(s) for s in shares]


def _storage(storage_path: str | None) -> str:
    """Where Train run folders go: an absolute path (workers run in other folders) or a URI."""
    storage_path = storage_path or os.path.join(tempfile.gettempdir(), "drmi_ray_train")
    if "://" in storage_path:
        return storage_path
    return os.path.abspath(os.path.expanduser(storage_path))


def fit_substitutes(jobs, *, num_workers: int = 1, use_gpu: bool = False,
                    cpus_per_worker: float = 1.0, max_concurrent: int | None = None,
                    storage_path: str | None = None, name: str | None = None,
                    return_info: bool = False):
    """Fit one substitute per ``(images, labels, TrainConfig)`` job in one Ray Train run.

    ``images`` uint8, ``labels`` the target's answers; a job may carry a fourth item, ``pool``:
    unlabeled pool images and their target mass (``spread.pool_targets``; see ``models.fit_model``),
    or None. ``num_workers``: Ray Train workers per
    substitute (1: one worker each, ``max_concurrent`` at once; > 1: DDP, one substitute at a
    time; 0: local mode); see the module docstring. ``storage_path``: where the Train run
    folder ``{storage_path}/{name}`` and its checkpoint go; pass the experiment's run folder
    storage (e.g. ``{out}/train``). None: a folder under the system temp dir (not cleaned up).
    Must be shared storage on a multi-node cluster, and a local path when ``num_workers=0``.

    Returns the trained models (CPU, eval mode) in ``jobs`` order; with ``return_info=True``
    also one dict per job with ``losses`` (mean loss per pass), ``world_size`` (workers that
    fitted it), ``path`` (the Train run folder), ``checkpoint`` (its checkpoint folder) and
    ``weights`` (the ``state_dict`` file in it, for ``torch.load(..., weights_only=True)``).
    """
    jobs = list(jobs)
    checked = []
    for i, (images, labels, config, *pool) in enumerate(jobs):
        images = check_images(images, name="images" if len(jobs) == 1 else f"jobs[{i}] images", min_count=1)
        checked.append((images, check_labels(labels, len(images), num_classes=config.num_classes), config,
                         check_pool(pool[0] if pool else None, images, config.num_classes)))
    jobs = checked
    if not jobs:
        return ([], []) if return_info else []
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers: expected an int >= 0, got {num_workers!r}")
    storage_path = _storage(storage_path)
    if "://" in storage_path and num_workers == 0:
        raise ValueError(f"storage_path: local mode (num_workers=0) writes its checkpoint "
                         f"itself and needs a local path, got {storage_path!r}")
    name = name or f"substitutes-{uuid.uuid4().hex[:8]}"
    run_path = os.path.join(storage_path, name)
    init_ray()
    if num_workers > 1:
        shares, workers = None, num_workers
    else:
        if max_concurrent is None:  # as many one-worker fits as the cluster holds at once
            res = ray.cluster_resources()
            max_concurrent = int(res.get("CPU", 1) // cpus_per_worker) if cpus_per_worker else len(jobs)
            if use_gpu:
                max_concurrent = min(max_concurrent, int(res.get("GPU", 0)))
        shares = _shares(jobs, max(1, min(max_concurrent, len(jobs))))
        workers = len(shares)
    cfg = {"jobs": [(ray.put((x, y, pool)), c.to_dict()) for x, y, c, pool in jobs],
           "shares": shares, "use_gpu": use_gpu, "local_checkpoint": None}
    log.info(f"  fitting {len(jobs)} substitute(s) in one Ray Train run, {workers} worker(s)"
             f"{' (DDP)' if shares is None else ' (local mode)' if num_workers == 0 else ''}")
    if num_workers == 0:
        # Local mode runs the loop in the calling process: one Ray task per share keeps the
        # shares in separate processes, side by side.
        cfg["local_checkpoint"] = checkpoint = os.path.join(run_path, CHECKPOINT_DIR)
        task = ray.remote(num_cpus=cpus_per_worker)(_run_local)
        ray.get([task.remote({**cfg, "shares": [share]}, storage_path, name) for share in shares])
        models, losses = _load(jobs, checkpoint)
    else:
        result = _run(cfg, num_workers=workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker,
                      storage_path=storage_path, name=name)
        if result.checkpoint is None:
            raise RuntimeError(f"substitute run {name!r} reported no checkpoint")
        run_path, checkpoint = result.path, result.checkpoint.path
        with result.checkpoint.as_directory() as folder:  # a download when storage is remote
            models, losses = _load(jobs, folder)
    if not return_info:
        return models
    world = workers if shares is None else 1
    return models, [{"losses": loss, "world_size": world, "path": run_path, "checkpoint": checkpoint,
                     "weights": os.path.join(checkpoint, weights_file(i))} for i, loss in enumerate(losses)]


def _load(jobs, folder: str):
    """Each job's model (CPU, eval mode) and losses, from ``model-{i}.pt`` and ``losses-{i}.json``."""
    models, losses = [], []
    for i, (images, _, config, _) in enumerate(jobs):
        in_channels, size = image_geometry(images)
        model = build_model(config.model, in_channels=in_channels,
                            num_classes=config.num_classes, image_size=size)
        state = torch.load(os.path.join(folder, weights_file(i)), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        models.append(model.eval())
        with open(os.path.join(folder, f"losses-{i}.json")) as f:
            losses.append(json.load(f))
    return models, losses


def fit_substitute(images, labels, config: TrainConfig | None = None, *, num_workers: int = 1,
                   use_gpu: bool = False, cpus_per_worker: float = 1.0,
                   storage_path: str | None = None, name: str | None = None,
                   return_info: bool = False):
    """``fit_substitutes`` for one job: the trained model, and its info dict with
    ``return_info=True``."""
    models, infos = fit_substitutes([(images, labels, config or TrainConfig())],
                                    num_workers=num_workers, use_gpu=use_gpu,
                                    cpus_per_worker=cpus_per_worker, storage_path=storage_path,
                                    name=name, return_info=True)
    return (models[0], infos[0]) if return_info else models[0]


def evaluate(model: nn.Module, test_images, test_labels, target_labels=None) -> dict:
    """``{"accuracy", "fidelity", "n"}`` of ``model`` on the test split.

    ``accuracy`` = mean(substitute == test_labels); ``fidelity`` = mean(substitute ==
    target_labels), the target's labels on the same images (None when not given).
    """
    test_images = check_images(test_images, name="test_images")
    n = len(test_images)
    test_labels = check_labels(test_labels, n, name="test_labels")
    pred = predict(model, test_images)
    out = {"accuracy": float((pred == test_labels).mean()) if n else float("nan"),
           "fidelity": None, "n": n}
    if target_labels is not None:
        target_labels = check_labels(target_labels, n, name="target_labels")
        out["fidelity"] = float((pred == target_labels).mean()) if n else float("nan")
    return out
