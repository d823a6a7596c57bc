"""Substitutes fitted with Ray Train (real workers) on a target's labels, and their evaluation."""

import copy
import os
import time

import numpy as np
import pytest
import torch

from drmi_ray.models import TrainConfig, predict, train_classifier
from drmi_ray.substitute import _shares, evaluate, fit_substitute, fit_substitutes


FAST = TrainConfig(model="lenet5", epochs=10, min_steps=150)


@pytest.fixture(scope="module")
def world(digits, lenet5_target):
    """A lenet5 target on 1,000 digits, a 300-image attacker pool it labels, a test split."""
    images, labels = digits
    target, perm = lenet5_target
    pool = images[perm[1000:1300]]
    test = perm[3000:]
    return {"target": target, "pool": pool, "answers": predict(target, pool),
            "test_images": images[test], "test_labels": labels[test],
            "target_test": predict(target, images[test])}


def from_checkpoint(weights, like):
    """A copy of ``like`` with the weights of a checkpoint file, loaded as a caller would."""
    model = copy.deepcopy(like)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_one_train_run_fits_every_substitute_on_real_workers(ray_local, world, tmp_path):
    """Three substitutes, one TorchTrainer run with two real workers: results come back in job
    order, every job's weights in the run's one checkpoint folder, and each substitute is the
    plain loop's for its config and seed, also the one its worker fitted after another."""
    pool, answers = world["pool"], world["answers"]
    small = TrainConfig(model="dnn5", epochs=5, min_steps=50)
    jobs = [(pool, answers, FAST), (pool[:150], answers[:150], small),
            (pool[:150], answers[:150], TrainConfig(model="dnn5", epochs=5, min_steps=50, seed=1))]
    models, infos = fit_substitutes(jobs, num_workers=1, max_concurrent=2,
                                    storage_path=str(tmp_path), return_info=True)
    assert [type(m).__name__ for m in models] == ["LeNet5", "DNN5", "DNN5"]
    assert all(not m.training and next(m.parameters()).device.type == "cpu" for m in models)
    (run,) = os.listdir(tmp_path)  # one Train run for the three
    folder = tmp_path / run / "checkpoint_final"
    for i, (model, info) in enumerate(zip(models, infos)):
        assert info["weights"] == str(folder / f"model-{i}.pt") and info["world_size"] == 1
        assert same_weights(from_checkpoint(info["weights"], model), model)
        assert len(info["losses"]) >= 2 and info["losses"][-1] < info["losses"][0]
    scores = evaluate(models[0], world["test_images"], world["test_labels"], world["target_test"])
    assert scores["accuracy"] > 0.75, scores  # chance is 0.1
    assert scores["fidelity"] > 0.75, scores
    assert evaluate(models[1], world["test_images"], world["test_labels"])["accuracy"] > 0.5
    # the Ray Train loop is the plain loop: same config and seed (and one torch thread, as the
    # worker's OMP_NUM_THREADS=1 gives), same weights; the two dnn5 jobs share a worker
    for model, (images, labels, config) in zip(models, jobs):
        assert same_weights(train_classifier(images, labels, config), model), config
    assert not same_weights(models[1], models[2])  # seeds 0 and 1


def test_jobs_are_dealt_in_shares_of_equal_work():
    jobs = [(np.zeros((n, 28, 28), np.uint8), None, TrainConfig(epochs=1, min_steps=0, batch_size=10), None)
            for n in (100, 10, 40, 60, 50)]  # work = images per step x steps = n
    shares = _shares(jobs, 2)
    assert sorted(i for s in shares for i in s) == [0, 1, 2, 3, 4]
    assert shares == [[0, 2], [1, 3, 4]]  # 140 and 120 units of work
    assert _shares(jobs, 5) == [[0], [3], [4], [2], [1]]
    # a pool-mode job also trains on a pool batch every step: 10 answered images with a pool cost
    # 1 step x (10 + 10) = 20, more than 15 without one
    pool = (np.zeros((30, 28, 28), np.uint8), np.zeros((30, 10), np.float32))
    jobs = [(np.zeros((n, 28, 28), np.uint8), None, TrainConfig(epochs=1, min_steps=0, batch_size=n), p)
            for n, p in ((10, None), (10, pool), (15, None))]
    assert _shares(jobs, 2) == [[1], [0, 2]]


def test_local_mode_fit_is_the_plain_loop(ray_local, world):
    """ScalingConfig(num_workers=0): the training function runs in a Ray task, bit for bit the
    plain loop."""
    config = TrainConfig(model="dnn5", epochs=1, min_steps=30)
    model, info = fit_substitute(world["pool"], world["answers"], config, num_workers=0,
                                 return_info=True)
    assert info["world_size"] == 1 and len(info["losses"]) >= 2
    assert info["losses"][-1] < info["losses"][0]
    plain = train_classifier(world["pool"], world["answers"], config)
    for (k, a), b in zip(plain.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k


def test_weights_come_back_as_a_checkpoint_in_the_run_storage(ray_local, world, tmp_path):
    """Local mode reports the same kind of checkpoint as real workers, in the run's storage."""
    storage = tmp_path / "train"
    model, info = fit_substitute(world["pool"], world["answers"],
                                 TrainConfig(model="dnn5", epochs=1, min_steps=30),
                                 num_workers=0, storage_path=str(storage), name="sub",
                                 return_info=True)
    assert info["path"] == str(storage / "sub")
    assert info["checkpoint"] == str(storage / "sub" / "checkpoint_final")
    assert info["weights"] == os.path.join(info["checkpoint"], "model-0.pt")
    assert not model.training
    saved = from_checkpoint(info["weights"], model)
    images = world["test_images"]
    assert (predict(saved, images) == predict(model, images)).all()
    with pytest.raises(ValueError, match="storage_path"):
        fit_substitute(world["pool"][:10], world["answers"][:10], num_workers=0,
                       storage_path="s3://bucket/train")


def test_evaluate_fidelity_is_agreement_with_the_target(world):
    model = world["target"]
    images, truth = world["test_images"][:400], world["test_labels"][:400]
    pred = predict(model, images)
    scores = evaluate(model, images, truth, pred)
    assert scores["fidelity"] == 1.0 and scores["n"] == 400
    assert scores["accuracy"] == pytest.approx((pred == truth).mean())
    disagree = pred.copy()
    disagree[:100] = (disagree[:100] + 1) % 10  # the target "said" something else on 100
    assert evaluate(model, images, truth, disagree)["fidelity"] == pytest.approx(0.75)
    assert evaluate(model, images, truth)["fidelity"] is None
    with pytest.raises(ValueError, match="target_labels"):
        evaluate(model, images, truth, disagree[:10])


def test_fit_substitute_rejects_bad_inputs(world):
    with pytest.raises(ValueError, match="labels"):
        fit_substitute(world["pool"][:10], world["answers"][:9], FAST)
    with pytest.raises(TypeError, match="uint8"):
        fit_substitute(world["pool"][:10].astype(float), world["answers"][:10], FAST)
    with pytest.raises(ValueError, match="empty"):
        fit_substitute(world["pool"][:0], world["answers"][:0], FAST)


@pytest.mark.heavy
def test_two_ddp_workers_learn(ray_local, world, tmp_path):
    """num_workers=2: one run, each substitute fitted by both workers with DDP, one after another."""
    jobs = [(world["pool"], world["answers"], FAST),
            (world["pool"], world["answers"], TrainConfig(model="lenet5", epochs=10, min_steps=150, seed=1))]
    models, infos = fit_substitutes(jobs, num_workers=2, storage_path=str(tmp_path), return_info=True)
    for model, info in zip(models, infos):
        assert info["world_size"] == 2
        assert info["weights"].startswith(str(tmp_path))  # rank 0's, copied into the storage
        saved = from_checkpoint(info["weights"], model)
        images = world["test_images"]
        assert (predict(saved, images) == predict(model, images)).all()
        assert evaluate(model, world["test_images"], world["test_labels"])["accuracy"] > 0.75
    assert not same_weights(*models)


@pytest.mark.heavy
def test_one_run_for_all_beats_one_run_per_fit(ray_local, world):
    jobs = [(world["pool"], world["answers"], TrainConfig(model="lenet5", epochs=1,
                                                          min_steps=20, seed=s))
            for s in range(4)]
    start = time.monotonic()
    for job in jobs:
        fit_substitutes([job], max_concurrent=1)
    separate = time.monotonic() - start
    start = time.monotonic()
    fit_substitutes(jobs, max_concurrent=1)
    one = time.monotonic() - start
    print(f"4 fits: one Train run each {separate:.1f}s, one run for all {one:.1f}s")
    assert one < separate / 2  # Train's fixed cost (about 10 s a run here) is paid once
