"""PRADA detector: the rule, and what it flags on real streams."""

import json

import numpy as np
import pytest
from scipy import stats

from drmi_ray.acquisition import acquire
from drmi_ray.models import TrainConfig, predict
from drmi_ray.prada import PradaDetector

FAST = TrainConfig(model="lenet5", epochs=15, min_steps=0, batch_size=32)


@pytest.fixture(scope="module")
def world(digits, lenet5_target):
    """A real target (the session's LeNet-5, conftest) and an attacker pool of 1,000 digits it
    never saw, in random order (not the bundled file's class order)."""
    target, perm = lenet5_target
    return target, digits[0][perm[1000:2000]]


@pytest.fixture(scope="module")
def jbda_stream(world):
    target, pool = world
    got = acquire("jbda", pool, 160, lambda x: predict(target, x), seed=0, substitute_config=FAST)
    return got.images, got.labels


def reference_prada(images, labels, delta=0.95):
    """The rule of drmi_ray.prada's docstring, written as plainly as possible."""
    x = images.reshape(len(images), -1).astype(np.float64) / 255
    sets, dists_c, thr, pooled, tests, flagged_at = {}, {}, {}, [], [], None
    for q, (xi, c) in enumerate(zip(x, labels), start=1):
        if c not in sets:
            sets[c], dists_c[c], thr[c] = [xi], [0.0], 0.0
        else:
            d = min(np.linalg.norm(xi - g) for g in sets[c])
            pooled.append(d)
            if d > thr[c]:
                sets[c].append(xi)
                dists_c[c].append(d)
                thr[c] = max(thr[c], np.mean(dists_c[c]) - np.std(dists_c[c]))
        if q % 10 == 0 and len(pooled) > 100:
            p = np.array(pooled)
            p = p[np.abs(p - p.mean()) < 3 * p.std()]
            w = stats.shapiro(p).statistic
            tests.append((q, w))
            if w < delta and flagged_at is None:
                flagged_at = q
    return tests, flagged_at


def test_natural_digit_streams_are_not_flagged_in_300_queries(world):
    target, pool = world
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(len(pool))[:300]
        det = PradaDetector(delta=0.95)
        assert det.observe(pool[order], predict(target, pool[order])) is False
        assert det.flagged_at is None and det.queries == 300
        # a test every 10 queries once > 100 distances (a class's first query gives none)
        assert [q for q, _ in det.tests] == list(range(det.tests[0][0], 301, 10))
        assert det.tests[0][0] in (110, 120)
        assert min(w for _, w in det.tests) > 0.95


def test_a_jbda_stream_is_flagged_within_160_queries_whatever_the_batch_size(jbda_stream):
    images, labels = jbda_stream
    det = PradaDetector(delta=0.95)
    for start in range(0, len(images), 7):
        det.observe(images[start:start + 7], labels[start:start + 7])
    assert det.flagged and 100 < det.flagged_at <= 160 and det.flagged_at % 10 == 0
    assert min(w for _, w in det.tests) < 0.95
    whole = PradaDetector(delta=0.95)  # batch boundaries do not matter: the same stream at once
    whole.observe(images, labels)
    assert whole.flagged_at == det.flagged_at and whole.tests == det.tests


def test_detector_flags_and_tests_as_a_plain_reference_of_the_stated_rule(jbda_stream, world):
    pool = world[1]
    natural = pool[:200], predict(world[0], pool[:200])
    for images, labels in (jbda_stream, natural):
        det = PradaDetector()
        det.observe(images, labels)
        tests, flagged_at = reference_prada(images, labels)
        assert det.flagged_at == flagged_at
        assert [q for q, _ in det.tests] == [q for q, _ in tests]
        np.testing.assert_allclose([w for _, w in det.tests], [w for _, w in tests], atol=1e-5)


def test_a_query_near_its_class_set_is_not_added_but_counted():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(3, 8, 8)).astype(np.uint8)
    det = PradaDetector()
    det.observe(base, [0, 0, 0])
    assert det.state()["set_sizes"] == {0: 3} and len(det.distances) == 2
    threshold = det.state()["thresholds"][0]
    assert threshold > 0
    near = base[:1].copy()
    near[0, 0, 0] ^= 1  # one grey level away from a set member
    det.observe(near, [0])
    assert det.state()["set_sizes"] == {0: 3}  # below the threshold: not added ...
    assert len(det.distances) == 3 and det.distances[-1] == pytest.approx(1 / 255)  # ... but counted
    det.observe(base[:1], [1])  # a new class starts its own set, no distance
    assert det.state()["set_sizes"] == {0: 3, 1: 1} and len(det.distances) == 3


def test_flag_is_sticky_at_its_first_query_count_and_state_is_json():
    images = np.zeros((130, 4, 4), dtype=np.uint8)
    images[:, 0, 0] = np.arange(130)  # distances all 1/255: degenerate, not normal
    det = PradaDetector()
    assert det.observe(images[:100], np.zeros(100)) is False  # only 99 distances yet
    assert det.observe(images[100:], np.zeros(30)) is True
    assert det.flagged_at == 110
    state = det.state()
    json.dumps(state)
    assert state["flagged"] and state["flagged_at"] == 110 and state["queries"] == 130


@pytest.mark.parametrize("args, match", [
    (dict(delta=0), "delta must be in"),
    (dict(delta=1.5), "delta must be in"),
    (dict(check_every=0), "check_every must be"),
])
def test_bad_settings_are_value_errors(args, match):
    with pytest.raises(ValueError, match=match):
        PradaDetector(**args)


def test_bad_batches_are_value_errors_and_count_no_query():
    det = PradaDetector()
    with pytest.raises(ValueError, match="uint8"):
        det.observe(np.zeros((2, 4, 4), dtype=np.float32), [0, 1])
    with pytest.raises(ValueError, match="labels must have shape"):
        det.observe(np.zeros((2, 4, 4), dtype=np.uint8), [0])
    assert det.queries == 0
