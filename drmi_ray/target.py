"""The black-box target: a trained classifier behind a query budget, a rate limit and an audit log.

- ``train_target(images, labels, path)`` trains the target (``models.train_classifier``) and
  saves a checkpoint dict ``{model, in_channels, num_classes, image_size, state_dict, config}``.
- ``load_classifier(path)`` loads it back with ``torch.load(weights_only=True)``: a checkpoint
  that carries pickled objects is refused. The referee (evaluation) uses this directly.
- ``TargetService`` is the plain class with the rules; ``BlackBoxTarget`` is the same class as a
  threaded Ray actor. The attacker holds only the actor handle and calls ``query``.

Rules of ``query(images)``:

- input: uint8 ``(n, H, W)`` or ``(n, H, W, C)`` matching the target's geometry; anything else
  raises ``ValueError``/``TypeError`` and spends nothing (it is logged as refused).
- budget: counted per image. A batch that would take the total past ``budget`` is refused whole
  with ``QueryBudgetExceeded``; the check-and-spend is atomic under a lock, so concurrent callers
  can never exceed it. ``budget=0`` refuses everything.
- rate limit: a token bucket of ``rate_limit`` images/s holding at most ``burst`` images
  (default 1: no bursts, the stream is paced at the average rate from the first image). An
  accepted batch of n images takes n tokens and waits (never fails) until they are earned.
  The budget is spent before the wait, so an answer lost to a crash is still counted.
- audit: every call (accepted, refused over budget, invalid) is a record ``{time, client, n,
  accepted, reason, total}`` where ``total`` is the running count of images answered. With
  ``audit_path`` each record is appended as a JSON line and fsynced before the answer is
  returned; a restarted actor (``max_restarts``) replays the file in ``__init__`` so the spent
  budget never resets.
- output: ``"label"`` (int64 labels), ``"probs"`` (float32 softmax rows), ``"top1"`` (only each
  row's largest probability kept) or ``"rounded"`` (probabilities rounded to ``decimals``).
- defence: with ``prada_delta`` a PRADA detector (``drmi_ray.prada``) watches each client's
  stream and reports through ``prada_state()``; it never refuses a query.
"""

from __future__ import annotations

import json
import os
import threading
import time
import numpy as np
import ray
import torch
from torch import nn

from .prada import PradaMonitor, round_probs, top1
from .models import (TrainConfig, build_model, check_images, image_geometry, predict,
                     predict_proba, train_classifier)

OUTPUTS = ("label", "probs", "top1", "rounded")
_CHECKPOINT_KEYS = ("model", "in_channels", "num_classes", "image_size", "state_dict")


class QueryBudgetExceeded(RuntimeError):
    """A query that would take the target past its budget (the whole batch is refused)."""

    def __init__(self, requested: int, used: int, budget: int):
        self.requested, self.used, self.budget = requested, used, budget
        super().__init__(requested, used, budget)

    def __str__(self) -> str:
        return (f"query refused: {self.requested} image(s) requested but only "
                f"{max(self.budget - self.used, 0)} of the budget of {self.budget} left "
                f"({self.used} used); nothing was answered or counted")


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
    images = check_images(images)
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


# --------------------------------------------------------------------------- the black box

class TokenBucket:
    """``rate`` tokens/s, at most ``burst`` banked; ``take(n)`` blocks until n are earned.

    Taking is first-come first-served and may run the bucket into debt, so a batch larger than
    ``burst`` is allowed: it simply waits ``(n - tokens) / rate`` seconds.
    """

    def __init__(self, rate: float, burst: float = 1.0):
        if not rate > 0 or not burst > 0:
            raise ValueError(f"rate_limit and burst must be > 0, got {rate}, {burst}")
        self.rate, self.burst = float(rate), float(burst)
        self._tokens, self._stamp = self.burst, time.monotonic()
        self._lock = threading.Lock()

    def reserve(self, n: int) -> float:
        """Take ``n`` tokens now; return how long the caller must wait before using them."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= n
            return max(0.0, -self._tokens / self.rate)

    def take(self, n: int) -> float:
        wait = self.reserve(n)
        if wait > 0:
            time.sleep(wait)
        return wait


class TargetService:
    """The target's rules (budget, rate limit, audit, validation) around a loaded classifier."""

    def __init__(self, checkpoint_path: str, *, budget: int, rate_limit: float | None = None,
                 burst: float = 1.0, output: str = "label", audit_path: str | None = None,
                 decimals: int = 2, prada_delta: float | None = None):
        if not isinstance(budget, (int, np.integer)) or budget < 0:
            raise ValueError(f"budget: expected an int >= 0, got {budget!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
        self.started_at = time.time()  # tells a restarted actor from its predecessor
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        ckpt = load_checkpoint(checkpoint_path)
        self._model = load_classifier(checkpoint_path)
        self.in_channels, self.image_size = ckpt["in_channels"], ckpt["image_size"]
        self.budget, self.output, self.decimals = int(budget), output, int(decimals)
        # PRADA only detects and reports; it never refuses a query. Not thread-safe: own lock.
        self._prada = PradaMonitor(prada_delta) if prada_delta is not None else None
        self._prada_lock = threading.Lock()
        self._bucket = TokenBucket(rate_limit, burst) if rate_limit is not None else None
        self._lock = threading.Lock()  # guards _used, _log and the audit file
        self._used, self._log = 0, []
        self.audit_path = audit_path
        if audit_path:
            self._replay(audit_path)

    # -- persistence
    def _replay(self, path: str) -> None:
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            return
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a record torn by a crash mid-write
                    continue
                self._log.append(rec)
                if rec.get("accepted"):
                    self._used += int(rec["n"])

    def _record(self, *, client: str, n: int, accepted: bool, reason: str | None) -> dict:
        """Append one audit record (caller holds ``_lock``)."""
        rec = {"time": time.time(), "client": client, "n": int(n), "accepted": accepted,
               "reason": reason, "total": self._used}
        self._log.append(rec)
        if self.audit_path:
            with open(self.audit_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return rec

    # -- the rules
    def _validate(self, images) -> np.ndarray:
        images = check_images(images)
        channels, size = (1 if images.ndim == 3 else images.shape[3]), images.shape[1]
        if (channels, size, images.shape[2]) != (self.in_channels, self.image_size,
                                                 self.image_size):
            want = ((self.image_size,) * 2 if self.in_channels == 1
                    else (self.image_size, self.image_size, self.in_channels))
            raise ValueError(f"images: the target takes (n, {', '.join(map(str, want))}) "
                             f"uint8 images, got shape {images.shape}")
        return images

    def _answer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the target's own labels, what the configured output shows the caller)."""
        probs = predict_proba(self._model, images)
        labels = probs.argmax(axis=1).astype(np.int64)
        shown = {"label": lambda: labels, "probs": lambda: probs, "top1": lambda: top1(probs),
                 "rounded": lambda: round_probs(probs, self.decimals)}[self.output]()
        return labels, shown

    def query(self, images, *, client: str = "default") -> np.ndarray:
        """Labels (int64) or probabilities (float32) for uint8 images; see the module doc."""
        try:
            images = self._validate(images)
        except (TypeError, ValueError) as e:
            n = len(images) if hasattr(images, "__len__") else 0
            with self._lock:
                self._record(client=client, n=n, accepted=False, reason=f"invalid: {e}")
            raise
        n = len(images)
        with self._lock:
            if self._used + n > self.budget:
                self._record(client=client, n=n, accepted=False, reason="budget")
                raise QueryBudgetExceeded(n, self._used, self.budget)
            self._used += n
            self._record(client=client, n=n, accepted=True, reason=None)
        if self._bucket is not None and n:
            self._bucket.take(n)
        labels, shown = self._answer(images)
        if self._prada is not None:
            with self._prada_lock:  # the detector sees the unrounded label
                self._prada.observe(client, images, labels)
        return shown

    def prada_state(self) -> dict:
        """``{client: detector state}`` (flagged, flagged_at, ...); ``{}`` without the detector."""
        if self._prada is None:
            return {}
        with self._prada_lock:
            return self._prada.state()

    def queries_used(self) -> int:
        with self._lock:
            return self._used

    def budget_left(self) -> int:
        with self._lock:
            return self.budget - self._used

    def audit_log(self) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self._log]

    def info(self) -> dict:
        """What the attacker may know: input geometry, output kind, budget, rate limit."""
        return {"in_channels": self.in_channels, "image_size": self.image_size,
                "output": self.output, "budget": self.budget,
                "rate_limit": None if self._bucket is None else self._bucket.rate,
                "started_at": self.started_at}


# Threaded actor: sync methods run concurrently (up to max_concurrency); TargetService's
# threading.Lock makes check-and-spend atomic. Restart it with .options(max_restarts=...).
BlackBoxTarget = ray.remote(max_concurrency=16, num_cpus=0)(TargetService)
