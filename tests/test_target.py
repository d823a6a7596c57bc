"""The black-box target: checkpoints, budget, rate limit, audit log, restarts, bad inputs."""

import json
import threading
import time

import numpy as np
import pytest
import torch

from drmi_ray.models import TrainConfig, predict
from drmi_ray.target import (BlackBoxTarget, QueryBudgetExceeded, TargetService, TokenBucket,
                             load_classifier, train_target)


@pytest.fixture(scope="module")
def split(digits):
    images, labels = digits
    perm = np.random.default_rng(0).permutation(len(images))
    return images[perm[:1000]], labels[perm[:1000]], images[perm[4000:]], labels[perm[4000:]]


@pytest.fixture(scope="module")
def checkpoint(split, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("target") / "target.pt")
    meta = train_target(split[0], split[1], path, config=TrainConfig(model="lenet5", lr=2e-3))
    return path, meta


def test_train_target_saves_a_loadable_checkpoint(checkpoint, split):
    path, meta = checkpoint
    assert meta["model"] == "lenet5" and meta["n_train"] == 1000
    assert meta["train_accuracy"] > 0.9
    ckpt = torch.load(path, weights_only=True)
    assert {"model", "in_channels", "num_classes", "image_size", "state_dict"} <= set(ckpt)
    model = load_classifier(path)
    accuracy = (predict(model, split[2]) == split[3]).mean()
    assert accuracy > 0.85, accuracy


def test_load_refuses_pickled_objects(tmp_path, checkpoint):
    ckpt = torch.load(checkpoint[0], weights_only=True)
    ckpt["payload"] = _Arbitrary()
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    with pytest.raises(ValueError, match="weights_only"):
        load_classifier(str(bad))
    with pytest.raises(FileNotFoundError):
        load_classifier(str(tmp_path / "missing.pt"))


class _Arbitrary:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_service_counts_per_image_and_refuses_whole_batches(checkpoint, split):
    target = TargetService(checkpoint[0], budget=10)
    assert target.query(split[2][:4]).shape == (4,)
    assert target.query(split[2][4:10]).dtype == np.int64
    assert (target.queries_used(), target.budget_left()) == (10, 0)
    with pytest.raises(QueryBudgetExceeded, match="only 0 of the budget of 10 left"):
        target.query(split[2][:1])
    log = target.audit_log()
    assert [(r["n"], r["accepted"], r["total"]) for r in log] == [(4, True, 4), (6, True, 10),
                                                                  (1, False, 10)]

    target = TargetService(checkpoint[0], budget=5)
    with pytest.raises(QueryBudgetExceeded):
        target.query(split[2][:6])  # one over: refused whole, nothing counted
    assert target.queries_used() == 0
    assert target.query(split[2][:5]).shape == (5,)


def test_zero_budget_refuses_everything(checkpoint, split):
    target = TargetService(checkpoint[0], budget=0)
    with pytest.raises(QueryBudgetExceeded, match="budget of 0"):
        target.query(split[2][:1])
    assert target.queries_used() == 0


def test_bad_inputs_are_refused_and_count_nothing(checkpoint, split):
    target = TargetService(checkpoint[0], budget=100)
    good = split[2][:3]
    with pytest.raises(TypeError, match="uint8"):
        target.query(good.astype(np.float32))
    with pytest.raises(TypeError, match="NaN"):
        target.query(np.full((2, 28, 28), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        target.query(good[:, :27, :27])
    with pytest.raises(ValueError, match="shape"):
        target.query(np.repeat(good[..., None], 3, axis=3))  # colour into a grey target
    with pytest.raises(ValueError, match="shape"):
        target.query(good[0])
    with pytest.raises(TypeError, match="numpy"):
        target.query(good.tolist())
    assert target.queries_used() == 0
    assert all(not r["accepted"] and r["reason"].startswith("invalid") for r in target.audit_log())
    assert len(target.audit_log()) == 6


def test_probs_output(checkpoint, split):
    target = TargetService(checkpoint[0], budget=10, output="probs")
    probs = target.query(split[2][:5])
    assert probs.shape == (5, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    with pytest.raises(ValueError, match="output"):
        TargetService(checkpoint[0], budget=10, output="logits")


def test_token_bucket_paces_to_the_rate():
    bucket = TokenBucket(rate=1000, burst=1)
    start = time.monotonic()
    for _ in range(10):
        bucket.take(50)
    assert time.monotonic() - start >= 0.45


def test_actor_budget_never_exceeded_by_concurrent_callers(ray_local, checkpoint, split):
    budget = 157
    target = BlackBoxTarget.remote(checkpoint[0], budget=budget)
    images = split[2]
    accepted = [0] * 8

    def caller(k):
        rng = np.random.default_rng(k)
        size = int(rng.integers(1, 9))
        while size >= 1:  # shrink the batch after each refusal; stop when one image is refused
            try:
                ray.get(target.query.remote(images[:size], client=f"c{k}"))
                accepted[k] += size
            except QueryBudgetExceeded:
                size -= 1

    ray = ray_local
    threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(accepted) == budget
    assert ray.get(target.queries_used.remote()) == budget
    log = ray.get(target.audit_log.remote())
    assert sum(r["n"] for r in log if r["accepted"]) == budget
    assert max(r["total"] for r in log) == budget
    assert {r["client"] for r in log} == {f"c{k}" for k in range(8)}


def test_actor_concurrent_fire_and_forget(ray_local, checkpoint, split):
    """200 queries in flight at once against a threaded actor: accepted sum never passes budget."""
    target = BlackBoxTarget.remote(checkpoint[0], budget=300)
    sizes = np.random.default_rng(1).integers(1, 6, size=200)
    refs = [target.query.remote(split[2][:s]) for s in sizes]
    ok = 0
    for s, ref in zip(sizes, refs):
        try:
            assert ray_local.get(ref).shape == (s,)
            ok += int(s)
        except QueryBudgetExceeded:
            pass
    assert ok <= 300 and ok == ray_local.get(target.queries_used.remote())
    assert sizes.sum() > 300 and ok > 300 - 5  # refusals only once the budget is nearly spent


def test_actor_rate_limit_blocks(ray_local, checkpoint, split):
    target = BlackBoxTarget.remote(checkpoint[0], budget=1000, rate_limit=200.0)
    ray_local.get(target.queries_used.remote())  # actor is up
    start = time.monotonic()
    ray_local.get([target.query.remote(split[2][:50]) for _ in range(8)])
    elapsed = time.monotonic() - start
    assert elapsed >= 1.9, elapsed  # 400 images at 200/s, burst 1
    assert elapsed < 15, elapsed


def test_actor_restart_keeps_spent_budget(ray_local, checkpoint, split, tmp_path):
    audit = str(tmp_path / "audit.jsonl")
    target = BlackBoxTarget.options(max_restarts=1).remote(checkpoint[0], budget=50,
                                                           audit_path=audit)
    first = ray_local.get(target.info.remote())["started_at"]
    ray_local.get(target.query.remote(split[2][:30]))
    with pytest.raises(QueryBudgetExceeded):
        ray_local.get(target.query.remote(split[2][:21]))
    ray_local.kill(target, no_restart=False)
    deadline = time.monotonic() + 60
    while True:  # wait for the restarted actor (a new started_at)
        try:
            if ray_local.get(target.info.remote())["started_at"] != first:
                break
        except ray_local.exceptions.RayActorError:  # includes ActorUnavailableError
            pass
        assert time.monotonic() < deadline, "the target actor did not restart"
        time.sleep(0.1)
    assert ray_local.get(target.queries_used.remote()) == 30
    assert ray_local.get(target.budget_left.remote()) == 20
    with pytest.raises(QueryBudgetExceeded):
        ray_local.get(target.query.remote(split[2][:21]))
    ray_local.get(target.query.remote(split[2][:20]))
    records = [json.loads(line) for line in open(audit)]
    assert [(r["n"], r["accepted"]) for r in records] == [(30, True), (21, False), (21, False),
                                                          (20, True)]
    assert records[-1]["total"] == 50


def test_actor_is_threaded_and_spends_before_waiting(ray_local, checkpoint, split):
    """A rate-limited query in flight does not block other calls, and its images already count."""
    target = BlackBoxTarget.remote(checkpoint[0], budget=500, rate_limit=100.0)
    ray_local.get(target.queries_used.remote())
    start = time.monotonic()
    slow = target.query.remote(split[2][:300])  # ~3 s of pacing
    time.sleep(0.5)
    assert ray_local.get(target.queries_used.remote()) == 300
    assert time.monotonic() - start < 2.5
    with pytest.raises(QueryBudgetExceeded):
        ray_local.get(target.query.remote(split[2][:201]))
    assert not ray_local.wait([slow], timeout=0)[0]  # still pacing
    assert ray_local.get(slow).shape == (300,)
    assert time.monotonic() - start >= 2.9
