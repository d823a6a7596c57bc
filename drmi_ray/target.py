"""The target's model: training it, saving and loading its checkpoint.

- ``train_target(images, labels, path)`` trains the target (``models.train_classifier``) and
  saves a checkpoint dict ``{model, in_channels, num_classes, image_size, state_dict, config}``.
- ``load_classifier(path)`` loads it back with ``torch.load(weights_only=True)``: a checkpoint
  that carries pickled objects is refused. The referee (evaluation) and the service's model
  replicas use this directly.

The attacker never loads it: it sees the target only through its HTTP API (``drmi_ray.service``,
queried with ``drmi_ray.client.TargetClient``).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch import nn

from .images import check_images
from .models import TrainConfig, build_model, image_geometry, predict, train_classifier

_CHECKPOINT_KEYS = ("model", "in_channels", "num_classes", "image_size", "state_dict")


# --------------------------------------------------------------------------- checkpoints

def save_classifier(model: nn.Module, path: str, *, name: str, in_channels: int,
                    num_classes: int, image_size: int, extra: dict | None = None) -> None:
    """Write the checkpoint dict atomically (temporary file, then rename)."""
    ckpt = {"model": name, "in_channels": int(in_channels), "num_classes": int(num_classes),
            "image_size": int(image_size),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    ckpt.update(extra or {})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def train_target(images, labels, checkpoint_path: str, *,
                 config: TrainConfig | None = None) -> dict:
    """Train the target on labelled uint8 images, save its checkpoint, return metadata.

    Metadata: ``model``, ``n_train``, ``train_accuracy``, ``seconds``, ``checkpoint``,
    ``config`` (the TrainConfig as a dict).
    """
    config = config or TrainConfig()
    images = check_images(images, min_count=1)
    in_channels, size = image_geometry(images)
    t0 = time.perf_counter()
    model = train_classifier(images, labels, config)
    seconds = time.perf_counter() - t0
    save_classifier(model, checkpoint_path, name=config.model, in_channels=in_channels,
                    num_classes=config.num_classes, image_size=size,
                    extra={"config": config.to_dict()})
    train_acc = float((predict(model, images) == np.asarray(labels)).mean())
    return {"model": config.model, "n_train": int(len(images)), "train_accuracy": train_acc,
            "seconds": round(seconds, 3), "checkpoint": str(checkpoint_path),
            "config": config.to_dict()}


def load_checkpoint(path: str) -> dict:
    """The checkpoint dict, loaded with ``weights_only=True`` (pickled objects are refused)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint: no file at {path}") from None
    except Exception as e:  # pickle.UnpicklingError and friends
        raise ValueError(f"checkpoint {path}: refused to load (weights_only=True allows only "
                         f"tensors and plain containers): {e}") from e
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in _CHECKPOINT_KEYS):
        raise ValueError(f"checkpoint {path}: expected a dict with keys {_CHECKPOINT_KEYS}")
    return ckpt


def load_classifier(path: str) -> nn.Module:
    """Rebuild the classifier saved at ``path`` (CPU, eval mode)."""
    ckpt = load_checkpoint(path)
    model = build_model(ckpt["model"], in_channels=ckpt["in_channels"],
                        num_classes=ckpt["num_classes"], image_size=ckpt["image_size"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
