"""PRADA: detecting model-extraction query streams (Juuti et al., EuroS&P 2019).

``PradaDetector`` watches one client's stream of queries (images and the labels the target
predicted for them). The rule, as implemented (Algorithm 1 of the paper, with the details of the
authors' reference code):

1. Per predicted class ``c`` a growing set ``G_c`` of past queries, its distance list ``D_c`` and
   a threshold ``T_c``. Distances are L2 between images scaled to ``[0, 1]``, flattened.
2. A query ``x`` predicted as ``c``: if ``G_c`` is empty, ``x`` starts it (``D_c = [0]``,
   ``T_c = 0``) and nothing else happens. Otherwise ``d = min_{g ∈ G_c} ||x − g||₂`` is appended to
   the client's pooled distance list ``D``; and if ``d > T_c``, ``x`` joins ``G_c``, ``d`` joins
   ``D_c`` and ``T_c = max(T_c, mean(D_c) − std(D_c))`` (population std). A query closer than
   ``T_c`` to its class's set still counts in ``D`` but does not grow the set.
3. After every ``check_every`` (10) queries, once ``D`` holds more than ``min_distances`` (100)
   values: drop the outliers of ``D`` (values more than 3 std from its mean), run the
   Shapiro–Wilk test (``scipy.stats.shapiro``) on the rest and flag the client when
   ``W < delta`` (0.95). A flag is sticky; ``flagged_at`` is the query count at the first flag.

Example::

    det = PradaDetector(delta=0.95)
    det.observe(images_uint8, target_labels)   # -> bool, flagged so far
    det.flagged_at, det.state()

The target's ledger (``drmi_ray.ledger``) keeps one detector per API key.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from .images import check_images


class PradaDetector:
    """One client's PRADA state; ``observe`` query batches in order (see the module doc)."""

    def __init__(self, delta: float = 0.95, *, check_every: int = 10, min_distances: int = 100,
                 outlier_std: float | None = 3.0):
        if not 0 < delta <= 1:
            raise ValueError(f"delta must be in (0, 1], got {delta!r}")
        if check_every < 1 or min_distances < 3:
            raise ValueError(f"check_every must be >= 1 and min_distances >= 3, got {check_every}, {min_distances}")
        self.delta, self.check_every, self.min_distances = float(delta), int(check_every), int(min_distances)
        self.outlier_std = outlier_std
        self.queries = 0
        self.flagged_at: int | None = None
        self.distances: list[float] = []  # D: pooled min distances
        self.tests: list[tuple[int, float]] = []  # (query count, W) of every test run
        self._sets: dict[int, np.ndarray] = {}  # class -> (m, d) float32, rows [: self._size[c]]
        self._size: dict[int, int] = {}
        self._class_distances: dict[int, list[float]] = {}  # D_c
        self._threshold: dict[int, float] = {}  # T_c

    @property
    def flagged(self) -> bool:
        return self.flagged_at is not None

    def observe(self, images: np.ndarray, labels) -> bool:
        """Feed a batch of queries (uint8 ``(n, H, W[, C])`` or flat ``(n, D)``, n >= 1) and the
        target's labels; return ``flagged``."""
        images = check_images(images, flat=True, min_count=1)
        labels = np.asarray(labels)
        if labels.ndim == 2:
            labels = labels.argmax(axis=1)
        if labels.shape != (len(images),):
            raise ValueError(f"labels must have shape ({len(images)},), got {labels.shape}")
        flat = images.reshape(len(images), -1).astype(np.float32) / 255.0
        for x, c in zip(flat, labels.tolist()):
            self._one(x, int(c))
            self.queries += 1
            if self.queries % self.check_every == 0:
                self._test()
        return self.flagged

    def _one(self, x: np.ndarray, c: int) -> None:
        if c not in self._sets:
            self._sets[c] = np.empty((16, len(x)), dtype=np.float32)
            self._sets[c][0] = x
            self._size[c], self._class_distances[c], self._threshold[c] = 1, [0.0], 0.0
            return
        members = self._sets[c][: self._size[c]]
        d = float(np.sqrt(np.maximum(((members - x) ** 2).sum(axis=1), 0.0).min()))
        self.distances.append(d)
        if d > self._threshold[c]:
            if self._size[c] == len(self._sets[c]):
                self._sets[c] = np.concatenate([self._sets[c], np.empty_like(self._sets[c])])
            self._sets[c][self._size[c]] = x
            self._size[c] += 1
            dc = self._class_distances[c]
            dc.append(d)
            self._threshold[c] = max(self._threshold[c], float(np.mean(dc) - np.std(dc)))

    def _test(self) -> None:
        if len(self.distances) <= self.min_distances:
            return
        d = np.asarray(self.distances)
        if self.outlier_std is not None:
            sd = d.std()
            if sd > 0:
                d = d[np.abs(d - d.mean()) < self.outlier_std * sd]
        if len(d) < 3 or np.ptp(d) == 0:
            w = 0.0  # all distances equal: as far from normal as it gets
        else:
            w = float(stats.shapiro(d).statistic)
        self.tests.append((self.queries, w))
        if w < self.delta and self.flagged_at is None:
            self.flagged_at = self.queries

    def state(self) -> dict:
        """Plain-data summary (JSON-ready)."""
        return {"queries": self.queries, "flagged": self.flagged, "flagged_at": self.flagged_at,
                "delta": self.delta, "distances": len(self.distances),
                "last_w": self.tests[-1][1] if self.tests else None,
                "min_w": min(w for _, w in self.tests) if self.tests else None,
                "set_sizes": {int(c): int(s) for c, s in sorted(self._size.items())},
                "thresholds": {int(c): float(t) for c, t in sorted(self._threshold.items())}}
