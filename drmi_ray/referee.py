"""The referee, the tail every run shares (``drmi run`` and ``drmi reduce``): fit each substitute on
what the attacker got (Ray Train), then score it against the ground truth and the target:
accuracy, fidelity and the transfer rate of its PGD examples.

The target is one of two things, and every function here takes either:
  a checkpoint path   our target: the referee loads its weights, and its predictions are
                      measurements, not the attacker's queries;
  client settings     an outside endpoint (``EndpointConfig.client_settings`` with the evaluation
                      key): the referee holds no weights, asks the endpoint for its labels (request
                      ids ``{name}-N``) and counts those queries (``eval_queries``).
"""

from __future__ import annotations

import numpy as np
import ray

from drmi_ray.attack import transfer, transfer_rate
from drmi_ray.client import TargetClient, labels_of
from drmi_ray.models import TrainConfig, predict
from drmi_ray.runtime import gather, log, use_cpus
from drmi_ray.spread import pool_targets, use_pool
from drmi_ray.substitute import evaluate, fit_substitutes
from drmi_ray.target import load_classifier


def endpoint_labels(client_settings: dict, images: np.ndarray, prefix: str) -> tuple[np.ndarray, int]:
    """An outside endpoint's labels for ``images`` (request ids ``{prefix}-N``) and how many
    images it answered."""
    client = TargetClient(**client_settings, prefix=prefix)
    return labels_of(client.query(images)), client.answered


def target_labels(target, images: np.ndarray, prefix: str = "referee-test") -> tuple[np.ndarray, int]:
    """The target's labels for ``images`` and the queries they cost (0 for a checkpoint)."""
    if isinstance(target, str):
        return predict(load_classifier(target), images), 0
    return endpoint_labels(target, images, prefix)


@ray.remote(num_cpus=1)
def evaluate_cell(target, substitute, test_images, test_labels, labels_of_target, attack_config, name="referee"):
    """One substitute's accuracy and fidelity (``labels_of_target``: the target's labels of the
    test images), and the transfer rate of its PGD examples to ``target``; with an outside
    endpoint, ``eval_queries`` counts the adversarial examples sent to it."""
    use_cpus()
    scores = evaluate(substitute, test_images, test_labels, labels_of_target)
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
                                       target_labels=labels_of_target)["transfer_rate"]
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


def fit_and_score(jobs, target, test_images, test_labels, labels_of_target, config, *,
                  storage_path: str | None = None, names=None) -> list[dict]:
    """Fit one substitute per job (``substitute_job``'s) with Ray Train, then score each
    (``evaluate_cell``; ``names``: each job's request-id prefix at an outside endpoint).

    ``config``: an ExperimentConfig or ReduceConfig (``substitute_workers``, ``substitute_gpu``,
    ``attack``). ``storage_path``: where Ray Train keeps the runs and their weight checkpoints.
    Returns one ``{accuracy, fidelity, transfer_rate, n[, eval_queries]}`` per job, in order.
    """
    substitutes = fit_substitutes(jobs, num_workers=config.substitute_workers, use_gpu=config.substitute_gpu,
                                  storage_path=storage_path)
    refs = [ray.put(x) for x in (test_images, test_labels, labels_of_target)]
    names = names or [f"referee-{i}" for i in range(len(jobs))]
    return gather([evaluate_cell.remote(target, s, *refs, config.attack, name) for s, name in zip(substitutes, names)],
                  what="evaluated")
