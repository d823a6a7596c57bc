"""The substitute: a classifier fitted with Ray Train on the target's answers, and its evaluation.

- ``fit_substitute(images, labels, config)`` runs ``models.fit_model`` (the same loop that trains
  the target) inside a ``ray.train.torch.TorchTrainer`` (Train V2): ``num_workers`` workers,
  DDP when there are several (each takes its slice of every global batch) or a GPU. Images and
  labels go to the workers through the object store (``ray.put`` once).
  ``num_workers=0`` is Train V2's local mode (the loop runs in this process): for quick tests.
- ``fit_substitutes(jobs)`` runs several fits at once from a thread pool (each ``fit`` blocks on
  its own Train controller), so a 2-core laptop stays busy while one run is in its fixed
  start-up cost and a cluster runs them side by side.
- ``evaluate(model, test_images, test_labels, target_labels)``: ``accuracy`` against ground
  truth and ``fidelity`` = share of test images on which the substitute's label equals the
  target's label (``target_labels``: what the target says on the same test images).

How the weights come back: rank 0 ``torch.save``s the trained ``state_dict`` as
``model.pt`` in a Ray Train ``Checkpoint`` and reports it with ``ray.train.report`` (every rank
reports once, as Train V2 requires; the others with metrics only). Ray copies it into the run's
storage, ``{storage_path}/{run name}/checkpoint_final/``, and ``fit_substitute`` rebuilds a CPU
model from ``Result.checkpoint`` (``torch.load(weights_only=True)``). The losses and world size
come back as the checkpoint's metrics (``Result.metrics``): nothing large goes through Ray's
object store, so ResNet-152 or Inception-v3 substitutes come back the same way as LeNet-5.
Callers pass their run folder's storage as ``storage_path`` (e.g. ``{out}/train``); on a
multi-node cluster it must be shared storage (NFS, or a URI such as ``s3://`` with real
workers), as for any Ray Train run. In local mode Train's ``report`` copies nothing (it keeps
the ``Checkpoint`` object as given), so the loop writes the checkpoint straight into that same
place itself; local mode therefore needs a local (or NFS) ``storage_path``.

Determinism: with one worker the substitute is the one ``models.train_classifier`` gives for the
same config and seed (same torch thread count); with several workers it is deterministic per
seed and ``num_workers``.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np
import ray
import torch
from torch import nn

from .models import (TrainConfig, build_model, check_images, check_labels, fit_model,
                     image_geometry, predict, to_tensor)


@dataclass
class SubstituteConfig:
    """How substitutes are fitted on Ray (the model and optimiser live in ``TrainConfig``)."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    storage_path: str | None = None  # Ray Train run folders; a temp dir when None


CHECKPOINT_DIR = "checkpoint_final"  # the checkpoint's folder inside the Train run folder
WEIGHTS_FILE = "model.pt"  # the state_dict inside the checkpoint


def _train_loop(cfg: dict) -> None:
    """The Ray Train worker function: fit, then report the weights as a checkpoint from rank 0.

    ``cfg["local_checkpoint"]`` is set in local mode only: the folder to write the checkpoint to
    (local mode's ``report`` keeps the ``Checkpoint`` as given and copies nothing).
    """
    import ray.train
    import ray.train.torch

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:  # Ray sets it to the worker's CPUs; torch would otherwise take every core
        torch.set_num_threads(max(1, int(threads)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    images, labels = ray.get(cfg["images"]), ray.get(cfg["labels"])
    config = TrainConfig(**cfg["config"])
    in_channels, size = image_geometry(images)
    torch.manual_seed(config.seed)
    model = build_model(config.model, in_channels=in_channels, num_classes=config.num_classes,
                        image_size=size)
    if world > 1 or cfg["use_gpu"]:
        model = ray.train.torch.prepare_model(model)  # device placement, DDP when world > 1
    losses: list[float] = []
    fit_model(model, to_tensor(images), torch.from_numpy(np.array(labels)), config, rank=rank,
              world_size=world, on_epoch=lambda epoch, loss: losses.append(loss))
    metrics = {"loss": losses[-1] if losses else float("nan"), "losses": losses,
               "world_size": world}
    if rank != 0:  # report is a collective in Train V2: every rank calls it, once here
        ray.train.report(metrics, checkpoint_dir_name=CHECKPOINT_DIR)
        return
    inner = model.module if hasattr(model, "module") else model
    state = {k: v.detach().cpu() for k, v in inner.state_dict().items()}
    if cfg["local_checkpoint"]:
        os.makedirs(cfg["local_checkpoint"], exist_ok=True)
        torch.save(state, os.path.join(cfg["local_checkpoint"], WEIGHTS_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(
            cfg["local_checkpoint"]))
        return
    with tempfile.TemporaryDirectory() as tmp:  # report uploads it before returning
        torch.save(state, os.path.join(tmp, WEIGHTS_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=CHECKPOINT_DIR)


def _storage(storage_path: str | None) -> str:
    """Where Train run folders go: an absolute path (workers run in other folders) or a URI."""
    storage_path = storage_path or os.path.join(tempfile.gettempdir(), "drmi_ray_train")
    if "://" in storage_path:
        return storage_path
    return os.path.abspath(os.path.expanduser(storage_path))


def fit_substitute(images, labels, config: TrainConfig | None = None, *, num_workers: int = 1,
                   use_gpu: bool = False, cpus_per_worker: float = 1.0,
                   storage_path: str | None = None, name: str | None = None,
                   return_info: bool = False):
    """Fit ``config.model`` on uint8 images and the target's labels with a TorchTrainer.

    ``storage_path``: where the Train run folder ``{storage_path}/{name}`` and its checkpoint
    go; pass the experiment's run folder storage (e.g. ``{out}/train``). None: a folder under
    the system temp dir (not cleaned up). Must be shared storage on a multi-node cluster, and a
    local path when ``num_workers=0``.

    Returns the trained model (CPU, eval mode); with ``return_info=True`` also a dict with
    ``losses`` (mean loss per pass), ``world_size``, ``path`` (the Train run folder) and
    ``checkpoint`` (its checkpoint folder, holding ``model.pt``: the ``state_dict``, for
    ``torch.load(..., weights_only=True)``).
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = config or TrainConfig()
    images = check_images(images)
    labels = check_labels(labels, len(images), num_classes=config.num_classes)
    if len(images) == 0:
        raise ValueError("images: cannot fit a substitute on an empty set")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers: expected an int >= 0, got {num_workers!r}")
    storage_path = _storage(storage_path)
    if "://" in storage_path and num_workers == 0:
        raise ValueError(f"storage_path: local mode (num_workers=0) writes its checkpoint "
                         f"itself and needs a local path, got {storage_path!r}")
    name = name or f"substitute-{config.model}-{uuid.uuid4().hex[:8]}"
    in_channels, size = image_geometry(images)
    if not ray.is_initialized():
        ray.init()
    scaling = ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                            resources_per_worker=None if num_workers == 0 else
                            {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})})
    run = RunConfig(name=name, storage_path=storage_path,
                    failure_config=FailureConfig(max_failures=0))
    run_path = os.path.join(storage_path, name)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"images": ray.put(images), "labels": ray.put(labels),
                           "config": config.to_dict(), "use_gpu": use_gpu,
                           "local_checkpoint": os.path.join(run_path, CHECKPOINT_DIR)
                           if num_workers == 0 else None},
        scaling_config=scaling, run_config=run)
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"substitute run {name!r} reported no checkpoint")
    with result.checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, WEIGHTS_FILE), map_location="cpu",
                           weights_only=True)
    model = build_model(config.model, in_channels=in_channels, num_classes=config.num_classes,
                        image_size=size)
    model.load_state_dict(state)
    model.eval()
    if return_info:
        metrics = result.metrics
        return model, {"losses": metrics["losses"], "world_size": metrics["world_size"],
                       "path": result.path or run_path,  # local mode's Result has no path
                       "checkpoint": result.checkpoint.path}
    return model


def fit_substitutes(jobs, *, num_workers: int = 1, use_gpu: bool = False,
                    cpus_per_worker: float = 1.0, max_concurrent: int | None = None,
                    storage_path: str | None = None) -> list[nn.Module]:
    """Fit several substitutes concurrently; ``jobs`` is a list of ``(images, labels, config)``.

    ``max_concurrent`` fits run at once (default: as many as the cluster's CPUs hold, counting
    ``num_workers * cpus_per_worker`` each, at least 1). Results come back in ``jobs`` order;
    the first failure is raised after the others finish. ``num_workers=0`` runs each fit in
    Train's local mode inside its own Ray task (Ray schedules them): for large grids of small
    substitutes, where the worker group's start-up would dominate. ``storage_path``: as in
    ``fit_substitute``, shared by all the runs (each has its own run name).
    """
    jobs = list(jobs)
    if not jobs:
        return []
    storage_path = _storage(storage_path)
    if not ray.is_initialized():
        ray.init()
    if num_workers == 0:
        # Train's local mode runs the loop in the calling process: one Ray task per fit keeps
        # concurrent fits in separate processes and skips the worker-group start-up.
        fit = ray.remote(num_cpus=cpus_per_worker)(_fit_local)
        return ray.get([fit.remote(images, labels, config, storage_path)
                        for images, labels, config in jobs])
    if max_concurrent is None:
        cpus = ray.cluster_resources().get("CPU", 1.0)
        max_concurrent = max(1, int(cpus // max(num_workers * cpus_per_worker, 1.0)))
    with ThreadPoolExecutor(max_workers=min(max_concurrent, len(jobs))) as pool:
        futures = [pool.submit(fit_substitute, images, labels, config, num_workers=num_workers,
                               use_gpu=use_gpu, cpus_per_worker=cpus_per_worker,
                               storage_path=storage_path)
                   for images, labels, config in jobs]
        for done, _ in enumerate(as_completed(futures), 1):
            print(f"[drmi]   substitutes fitted {done}/{len(futures)}", flush=True)
        return [f.result() for f in futures]


def _fit_local(images, labels, config, storage_path):
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    return fit_substitute(images, labels, config, num_workers=0, storage_path=storage_path)


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
