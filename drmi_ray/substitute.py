"""The substitute: a classifier fitted with Ray Train on the target's answers, and its evaluation.

- ``fit_substitute(images, labels, config)`` runs ``models.fit_model`` (the same loop that trains
  the target) inside a ``ray.train.torch.TorchTrainer`` (Train V2): ``num_workers`` workers,
  DDP when there are several (each takes its slice of every global batch) or a GPU, the trained
  weights back through ``Result.return_value`` (rank 0), rebuilt as a CPU model. Images and
  labels go to the workers through the object store (``ray.put`` once).
  ``num_workers=0`` is Train V2's local mode (the loop runs in this process): for quick tests.
- ``fit_substitutes(jobs)`` runs several fits at once from a thread pool (each ``fit`` blocks on
  its own Train controller), so a 2-core laptop stays busy while one run is in its fixed
  start-up cost and a cluster runs them side by side.
- ``evaluate(model, test_images, test_labels, target_labels)``: ``accuracy`` against ground
  truth and ``fidelity`` = share of test images on which the substitute's label equals the
  target's label (``target_labels``: what the target says on the same test images).

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


def _train_loop(cfg: dict) -> dict:
    """The Ray Train worker function: fit, then hand the weights back from rank 0."""
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
    inner = model.module if hasattr(model, "module") else model
    # Train V2 refuses tensors in return values: hand back numpy arrays
    state = {k: v.detach().cpu().numpy() for k, v in inner.state_dict().items()}
    return {"state_dict": state, "losses": losses, "rank": rank, "world_size": world}


def fit_substitute(images, labels, config: TrainConfig | None = None, *, num_workers: int = 1,
                   use_gpu: bool = False, cpus_per_worker: float = 1.0,
                   storage_path: str | None = None, name: str | None = None,
                   return_info: bool = False):
    """Fit ``config.model`` on uint8 images and the target's labels with a TorchTrainer.

    Returns the trained model (CPU, eval mode); with ``return_info=True`` also a dict with
    ``losses`` (mean loss per pass), ``world_size`` and ``path`` (the Train run folder).
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
    in_channels, size = image_geometry(images)
    if not ray.is_initialized():
        ray.init()
    scaling = ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                            resources_per_worker=None if num_workers == 0 else
                            {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})})
    run = RunConfig(name=name or f"substitute-{config.model}-{uuid.uuid4().hex[:8]}",
                    storage_path=storage_path or os.path.join(tempfile.gettempdir(),
                                                              "drmi_ray_train"),
                    failure_config=FailureConfig(max_failures=0))
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"images": ray.put(images), "labels": ray.put(labels),
                           "config": config.to_dict(), "use_gpu": use_gpu},
        scaling_config=scaling, run_config=run)
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    out = result.return_value
    model = build_model(config.model, in_channels=in_channels, num_classes=config.num_classes,
                        image_size=size)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in
                           out["state_dict"].items()})
    model.eval()
    if return_info:
        return model, {"losses": out["losses"], "world_size": out["world_size"],
                       "path": result.path}
    return model


def fit_substitutes(jobs, *, num_workers: int = 1, use_gpu: bool = False,
                    cpus_per_worker: float = 1.0, max_concurrent: int | None = None,
                    storage_path: str | None = None) -> list[nn.Module]:
    """Fit several substitutes concurrently; ``jobs`` is a list of ``(images, labels, config)``.

    ``max_concurrent`` fits run at once (default: as many as the cluster's CPUs hold, counting
    ``num_workers * cpus_per_worker`` each, at least 1). Results come back in ``jobs`` order;
    the first failure is raised after the others finish. ``num_workers=0`` runs each fit in
    Train's local mode inside its own Ray task (Ray schedules them): for large grids of small
    substitutes, where the worker group's start-up would dominate.
    """
    jobs = list(jobs)
    if not jobs:
        return []
    if not ray.is_initialized():
        ray.init()
    if num_workers == 0:
        # Train's local mode runs the loop in the calling process: one Ray task per fit keeps
        # concurrent fits in separate processes and skips the worker-group start-up.
        fit = ray.remote(num_cpus=cpus_per_worker)(_fit_local)
        return ray.get([fit.remote(images, labels, config, storage_path) for images, labels, config in jobs])
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
