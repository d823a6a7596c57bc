"""Pool learning: the target's answers spread over the attacker's whole pool through the MI graph.

DRMI has already paid for the pool's pairwise MI; after the selection it would be thrown away,
and so would every unanswered pool image. Here it becomes a similarity graph over the pool on
which the K answers are spread to the other images (label spreading, Zhou et al., "Learning with
Local and Global Consistency", NIPS 2004), so a substitute can learn from the whole pool. The
pool's own labels are never read: the only labels here are the target's answers.

- ``knn_graph(mi, k)``: a symmetric sparse graph (scipy CSR): each image linked to its ``k``
  nearest neighbours by ``NMI = MI / sqrt(H(u) H(v))`` (MI's diagonal holds the entropies), edge
  weight the NMI; an edge kept when either end chose it. ``mi`` is a dense matrix or a
  ``tiles.TileStore``, read a block of rows at a time, so a 60k pool never needs a dense N x N.
- ``spread_labels(graph, answered, answers, num_classes)``: ``F ← α S F + (1 − α) Y`` for
  ``iterations`` steps, ``S = D^-1/2 W D^-1/2`` (zero diagonal), ``Y`` the answered images'
  one-hot rows; returns each image's label distribution (rows sum to 1), a row of zeros for an
  image the answers never reach (a component with no answered image, an isolated image). Equal to
  scikit-learn's ``LabelSpreading`` on the same graph (the test's reference).
- ``pool_targets(...)``: what a substitute learns from the pool in pool mode: every reached
  unanswered image with its spread distribution times ``pool_weight`` (target "mass" rows;
  ``models.fit_model`` adds a batch of them to every step on the answers).
- ``use_pool(answered_in_pool, pool_size)``: ``learn="auto"``'s rule.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

NEIGHBOURS = 10  # k of the kNN graph
ALPHA = 0.9  # label spreading: share of a node's label that comes from its neighbours
ITERATIONS = 30
ROW_BLOCK = 1024  # rows of a tile store read at once
POOL_WEIGHT = 0.5  # a spread label's weight against an answer's 1
LEARN_MODES = ("answers", "pool", "auto")


def use_pool(answered_in_pool: int, pool_size: int) -> bool:
    """``learn="auto"``'s rule: learn from the pool whenever it holds images the answers do not.

    Measured (tuning: bundled protocol, split seed 0, C3F2 target, LeNet-5 substitutes with
    augmentation, drmi-cover picks, seeds 0-1, accuracy on the test split): fitting on the whole
    pool with the spread labels in place of the answers gained 1.3-2.2 points at 50 answers but
    lost 3.1-3.8 at 100 and 1.1-1.7 at 600 whatever their weight (0.1-1): the spread labels' noise
    outweighed the answers they diluted. Keeping every step on the answers and adding a batch of
    spread pool images at weight 0.5 (``models.fit_model``'s ``pool``) gained 4.7 / 0.2 / 1.9 over
    the answers alone at 50 / 100 / 200 and was level at 600 (-0.1). With no budget where it
    lost, the rule does not depend on the budget.
    """
    return pool_size > answered_in_pool


def _nmi_rows(mi_rows: np.ndarray, rows: np.ndarray, entropy: np.ndarray) -> np.ndarray:
    """NMI of ``rows`` against every image, self-similarity and undefined pairs (a constant image:
    zero entropy) set to 0 so they are never neighbours."""
    denom = np.sqrt(np.outer(entropy[rows], entropy))
    with np.errstate(divide="ignore", invalid="ignore"):
        nmi = np.where(denom > 0, mi_rows / denom, 0.0)
    nmi[np.arange(len(rows)), rows] = 0.0
    return nmi


def knn_graph(mi, k: int = NEIGHBOURS) -> sp.csr_matrix:
    """The pool's symmetric kNN graph on NMI, ``(n, n)`` CSR float64 (see the module doc).

    ``mi``: the dense ``(n, n)`` MI matrix (``mi.pairwise_mi``) or a complete ``TileStore``.
    Only edges with NMI > 0 are kept, so an image alike to nothing (blank) stays isolated.
    """
    if hasattr(mi, "read_rows") and mi.n <= mi.tile_size:  # one tile: read it once
        mi = mi.to_dense()
    dense = not hasattr(mi, "read_rows")
    n = len(mi) if dense else mi.n
    if n < 2:
        return sp.csr_matrix((n, n))
    k = int(min(k, n - 1))
    if dense:
        mi = np.asarray(mi, dtype=np.float64)
        entropy = np.diag(mi).copy()
    else:  # the diagonal tiles alone hold the entropies
        entropy = np.concatenate([np.diag(mi.read_block(r, r)) for r in _blocks(n, mi.tile_size)])
    src, dst, weight = [], [], []
    for rows in _blocks(n, ROW_BLOCK if dense else mi.tile_size):
        block = mi[rows] if dense else mi.read_rows(rows)
        nmi = _nmi_rows(np.asarray(block, dtype=np.float64), rows, entropy)
        nearest = np.argpartition(-nmi, k - 1, axis=1)[:, :k]
        w = np.take_along_axis(nmi, nearest, axis=1)
        keep = w > 0
        src.append(np.repeat(rows, k)[keep.ravel()])
        dst.append(nearest[keep])
        weight.append(w[keep])
    graph = sp.csr_matrix((np.concatenate(weight), (np.concatenate(src), np.concatenate(dst))), shape=(n, n))
    return graph.maximum(graph.T).tocsr()  # an edge when either end chose it (NMI is symmetric)


def _blocks(n: int, size: int):
    return [np.arange(s, min(s + size, n)) for s in range(0, n, size)]


def spread_labels(graph, answered, answers, num_classes: int, *, alpha: float = ALPHA,
                  iterations: int = ITERATIONS) -> np.ndarray:
    """Label spreading of ``answers`` (ints, the target's labels of the pool images ``answered``)
    over ``graph``; returns float64 ``(n, num_classes)`` distributions (rows of zeros: not reached)."""
    graph = sp.csr_matrix(graph, dtype=np.float64)
    n = graph.shape[0]
    answered = np.asarray(answered, dtype=np.int64)
    answers = np.asarray(answers, dtype=np.int64)
    if answered.shape != answers.shape or (len(answered) and (answered.min() < 0 or answered.max() >= n)):
        raise ValueError(f"answered: expected {len(answers)} pool indices in [0, {n}), one per answer")
    if len(answers) and (answers.min() < 0 or answers.max() >= num_classes):
        raise ValueError(f"answers must lie in [0, {num_classes}), got [{answers.min()}, {answers.max()}]")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    graph = graph - sp.diags(graph.diagonal())
    degree = np.asarray(graph.sum(axis=1)).ravel()
    scale = np.where(degree > 0, 1.0 / np.sqrt(np.where(degree > 0, degree, 1.0)), 0.0)
    s = sp.diags(scale) @ graph @ sp.diags(scale)
    y = np.zeros((n, num_classes))
    y[answered, answers] = 1.0
    f = y.copy()
    for _ in range(iterations):
        f = alpha * (s @ f) + (1 - alpha) * y
    total = f.sum(axis=1, keepdims=True)
    return np.divide(f, total, out=np.zeros_like(f), where=total > 0)


def pool_targets(graph, answered, answers, num_classes: int, *, pool_weight: float = POOL_WEIGHT
                 ) -> tuple[np.ndarray, np.ndarray, dict]:
    """What a substitute learns from the pool besides the answers: ``(rows, mass, info)``.

    ``rows``: the unanswered pool images the answers reach; ``mass`` float32 ``(len(rows),
    num_classes)``: each one's spread distribution times ``pool_weight`` (``models.fit_model``
    adds a batch of them to every step); ``info``: ``reached`` and ``unreached`` (left out: no
    path to an answered image) counts. The answered images keep the target's answers: they are
    trained on as answered, never relabelled by the spreading.
    """
    answered = np.asarray(answered, dtype=np.int64)
    dist = spread_labels(graph, answered, answers, num_classes)
    unanswered = np.setdiff1d(np.arange(graph.shape[0]), answered)
    rows = unanswered[dist[unanswered].sum(axis=1) > 0]
    info = {"reached": int(len(rows)), "unreached": int(len(unanswered) - len(rows))}
    return rows, (pool_weight * dist[rows]).astype(np.float32), info
