"""The paper's rivals to DRMI: the query rules of ``cmal``, ``kcenter``, ``cpb``, ``trace`` and ``jbda``.

Each ``run_*`` below is a runner that ``acquisition`` registers under the method's name (see its
docstring for the contract): ``run(record, budget, *, seed, config, **_) -> info``, spending
exactly ``budget`` queries through ``record`` (an ``acquisition.AttackerRecord``, which holds the
pool).

``cmal``     DRMI's optimizer (``optimize.select``) on ``|corrcoef|`` of the flattened images
             (``correlation_matrix``; a constant image's undefined correlations are set to 1, i.e.
             fully redundant); seeded shuffle (``drmi.seeded_shuffle``).
``kcenter``  greedy k-center in pixel space (float, L2): the first centre is
             ``default_rng(seed).integers(n)``; then repeatedly the pool image farthest from its
             nearest chosen centre (ties: lowest index); in pick order.
``cpb``      class-probability baseline. Seed step: ``s = min(budget, max(10, ceil(0.2 budget)))``
             pool images at random (as ``random``), queried; a first substitute is trained on them
             (``models.train_classifier``, ``substitute_config`` with ``seed=seed``). Then, over the
             rest of the pool, margin ``m = p_top1 - p_top2`` of the substitute's softmax and its
             predicted class ``c``. Within each predicted class the candidates are ranked by
             ascending margin (ties: lower index); round ``r`` takes the ``r``-th ranked candidate of
             every class that still has one, ordered by ascending margin; rounds are concatenated
             and the first ``budget - s`` are queried (so the last round is cut at its most
             uncertain members).
``trace``    activated-neuron traces. The same seed step and first substitute; an image's trace is
             the binary pattern ``relu_output > 0`` of every ``nn.ReLU`` module of the substitute
             (all hidden layers, eval mode, concatenated). Then greedy farthest-point in Hamming
             distance: repeatedly the pool image (not yet chosen) whose trace is farthest from its
             nearest trace among the seed set and the picks so far (ties: lowest index), until
             ``budget - s`` are picked; in pick order.
``jbda``     Jacobian-based dataset augmentation (Papernot et al., AsiaCCS 2017; the attack PRADA
             detects). Seed: ``min(budget, 10)`` random pool images, queried. Round ``ρ = 0, 1, ...``:
             train a substitute on everything labelled so far (``substitute_config``, ``seed=seed``),
             then for each labelled image ``x`` with target label ``y`` a new image
             ``clip(x + step_ρ · sign(∂ logit_y(x) / ∂x), 0, 255)`` in uint8 grey levels, where
             ``step_ρ = (-1)^⌊ρ/τ⌋ · round(λ · 255)`` (λ = 0.1, τ = 3: 26 grey levels, i.e.
             λ = 0.1 quantised to the uint8 grid, sign flipping every 3 rounds). The set doubles each
             round; the round that would pass the budget augments only a seeded random subset of
             the labelled images (as many as are left). Synthetic images get index ``-1``.

A method that trains a substitute (``cpb``, ``trace``, ``jbda``) takes ``substitute_config``
(a ``models.TrainConfig``; default ``TrainConfig()``, C3F2) with its ``seed`` set to the run's
(``config`` here). Results are deterministic per ``seed`` (same torch thread count).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .drmi import ask_set, random_indices
from .models import predict_proba, to_tensor, train_classifier
from .optimize import select

SEED_SHARE = 0.2  # cpb / trace: share of the budget spent at random first ...
SEED_MIN = 10  # ... but at least this many images (never more than the budget)
JBDA_SEED = 10  # jbda: real seed images
JBDA_LAMBDA = 0.1  # jbda: step size in [0, 1] pixel units
JBDA_TAU = 3  # jbda: the step's sign flips every tau rounds


# --------------------------------------------------------------------------- pool-only rivals

def correlation_matrix(pool_images: np.ndarray) -> np.ndarray:
    """``|Pearson correlation|`` between flattened images, float64 ``(n, n)``; NaN (constant image) -> 1."""
    x = pool_images.reshape(len(pool_images), -1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.abs(np.corrcoef(x))
    c = np.atleast_2d(c)
    c[np.isnan(c)] = 1.0
    return c


def kcenter_indices(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Greedy k-center (farthest-point) on rows of ``x`` (float, L2), in pick order.

    The first centre is ``default_rng(seed).integers(n)``; each next one
    is the row farthest from its nearest chosen centre (ties: lowest index).
    """
    x = x.reshape(len(x), -1).astype(np.float64)
    n = len(x)
    sq = np.einsum("ij,ij->i", x, x)
    start = int(np.random.default_rng(seed).integers(n))
    dist = np.full(n, np.inf)
    chosen = [start]
    for _ in range(k - 1):
        c = chosen[-1]
        d = np.maximum(sq + sq[c] - 2.0 * (x @ x[c]), 0.0)
        np.minimum(dist, d, out=dist)
        dist[chosen[-1]] = -1.0
        chosen.append(int(np.argmax(dist)))
    return np.asarray(chosen, dtype=np.int64)


def run_cmal(record, budget, *, seed, **_):
    return ask_set(record, select(correlation_matrix(record.pool), budget, seed=seed), seed)


def run_kcenter(record, budget, *, seed, **_):
    record.ask_pool(kcenter_indices(record.pool, budget, seed))
    return {}


# --------------------------------------------------------------------------- cpb and trace

def seed_size(budget: int) -> int:
    """cpb/trace: how many of ``budget`` queries go to the random seed step."""
    return min(budget, max(SEED_MIN, math.ceil(SEED_SHARE * budget)))


def _seed_step(record, budget, seed, config):
    """Random seed queries and the first substitute; returns (seed indices, substitute)."""
    s = seed_size(budget)
    idx = random_indices(len(record.pool), s, seed)
    labels = record.ask_pool(idx)
    substitute = train_classifier(record.pool[idx], labels, config) if s < budget else None
    return idx, substitute


def margin_order(probs: np.ndarray, k: int) -> np.ndarray:
    """cpb's rule on candidate rows of softmax ``probs``: the ``k`` rows to query, in order.

    Rank within each predicted class by ascending margin ``p_top1 - p_top2`` (ties: lower row);
    round r = the r-th of every class, ordered by margin; rounds concatenated; first ``k``.
    """
    top2 = np.sort(probs, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    predicted = probs.argmax(axis=1)
    order = np.lexsort((np.arange(len(probs)), margin))  # ascending margin, then row
    rank = np.empty(len(probs), dtype=np.int64)  # position within its predicted class
    for c in np.unique(predicted):
        members = order[predicted[order] == c]
        rank[members] = np.arange(len(members))
    final = np.lexsort((np.arange(len(probs)), margin, rank))
    return final[:k]


def run_cpb(record, budget, *, seed, config, **_):
    seed_idx, substitute = _seed_step(record, budget, seed, config)
    rest = budget - len(seed_idx)
    if rest:
        candidates = np.setdiff1d(np.arange(len(record.pool)), seed_idx)
        probs = predict_proba(substitute, record.pool[candidates])
        record.ask_pool(candidates[margin_order(probs, rest)])
    return {"seed_queries": int(len(seed_idx))}


def activation_traces(model: nn.Module, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """Bit-packed ``relu_output > 0`` of every ``nn.ReLU`` module, uint8 ``(n, ceil(bits / 8))``."""
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    if not relus:
        raise ValueError(f"{type(model).__name__} has no nn.ReLU modules to trace")
    captured: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: captured.append(out.detach())) for m in relus]
    model.eval()
    rows = []
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                captured.clear()
                model(to_tensor(images[start:start + batch_size]))
                bits = torch.cat([t.reshape(len(t), -1) > 0 for t in captured], dim=1)
                rows.append(np.packbits(bits.numpy(), axis=1))
    finally:
        for h in hooks:
            h.remove()
    return np.concatenate(rows)


def farthest_traces(traces: np.ndarray, start: np.ndarray, k: int) -> np.ndarray:
    """trace's rule: ``k`` rows not in ``start``, greedy farthest-point in Hamming distance."""
    n = len(traces)
    dist = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    taken = np.zeros(n, dtype=bool)
    for i in start:
        np.minimum(dist, np.bitwise_count(traces ^ traces[i]).sum(axis=1, dtype=np.int64), out=dist)
        taken[i] = True
    picks = []
    for _ in range(k):
        dist[taken] = -1
        j = int(np.argmax(dist))
        picks.append(j)
        taken[j] = True
        np.minimum(dist, np.bitwise_count(traces ^ traces[j]).sum(axis=1, dtype=np.int64), out=dist)
    return np.asarray(picks, dtype=np.int64)


def run_trace(record, budget, *, seed, config, **_):
    seed_idx, substitute = _seed_step(record, budget, seed, config)
    rest = budget - len(seed_idx)
    if rest:
        traces = activation_traces(substitute, record.pool)
        record.ask_pool(farthest_traces(traces, seed_idx, rest))
    return {"seed_queries": int(len(seed_idx))}


# --------------------------------------------------------------------------- jbda

def jbda_step(round_index: int, *, lam: float = JBDA_LAMBDA, tau: int = JBDA_TAU) -> int:
    """Signed step in uint8 grey levels for round ``round_index``: ``(-1)^⌊ρ/τ⌋ round(λ 255)``."""
    return (-1) ** (round_index // tau) * int(round(lam * 255))


def jacobian_signs(model: nn.Module, images: np.ndarray, labels: np.ndarray, *,
                   batch_size: int = 256) -> np.ndarray:
    """``sign(∂ logit_y(x) / ∂x)`` as int8 with the images' layout ``(n, H, W[, C])``."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_tensor(images[start:start + batch_size]).requires_grad_(True)
        y = torch.as_tensor(labels[start:start + batch_size], dtype=torch.int64)
        model(x).gather(1, y[:, None]).sum().backward()
        g = torch.sign(x.grad).to(torch.int8)
        g = g[:, 0] if images.ndim == 3 else g.permute(0, 2, 3, 1)
        out.append(g.numpy())
    return np.concatenate(out)


def jbda_augment(model, images, labels, step: int) -> np.ndarray:
    """One JBDA round's new images: ``clip(x + step * sign(∇ logit_y), 0, 255)`` as uint8."""
    signs = jacobian_signs(model, images, labels).astype(np.int16)
    return np.clip(images.astype(np.int16) + step * signs, 0, 255).astype(np.uint8)


def run_jbda(record, budget, *, seed, config, **_):
    rng = np.random.default_rng(seed)
    s = min(budget, JBDA_SEED)
    record.ask_pool(random_indices(len(record.pool), s, seed))
    rounds = 0
    while record.count < budget:
        images, labels = np.concatenate(record.images), np.concatenate(record.labels)
        substitute = train_classifier(images, labels, config)
        left = budget - record.count
        parents = np.arange(len(images))
        if left < len(parents):
            parents = np.sort(rng.choice(len(parents), size=left, replace=False))
        new = jbda_augment(substitute, images[parents], labels[parents], jbda_step(rounds))
        record.ask(new, -1)
        rounds += 1
    return {"seed_queries": s, "rounds": rounds}
