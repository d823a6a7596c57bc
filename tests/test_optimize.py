"""Subset optimizer: oracle agreement, incremental gains, determinism, actor failure, partitions,
bad inputs. Real Ray (the ``ray_local`` fixture), no mocks."""

import numpy as np
import pytest

from drmi_ray import optimize as opt
from drmi_ray.optimize import exact_select, select, select_distributed
from drmi_ray.optimize.search import _DenseState, _gains
from drmi_ray.partition import kmeans_partitions, partition_budgets, select_partitioned


def mi_like(n, *, d=8, clusters=5, seed=0):
    """Gaussian MI, -½ log(1 - ρ²), between n clustered random vectors: symmetric, >= 0, MI-shaped.

    The same matrices as ``mi_like`` in benchmarks/optimizer_quality.py (equal bit for bit per
    seed), which also streams N=60,000 to a memory map. Two copies on purpose: the tests cannot
    import benchmarks/ (not a package, not on pytest's path) and a synthetic matrix is no use to
    a user of drmi_ray; the one benchmark that needs it keeps its own."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(clusters, d))[rng.integers(clusters, size=n)] + rng.normal(size=(n, d))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    return -0.5 * np.log1p(-np.clip((z @ z.T) ** 2, 0, 0.999))


def test_brute_force_and_milp_find_the_same_optimum():
    for n, k in [(12, 4), (16, 5)]:
        mi = mi_like(n, seed=n)
        brute, milp = exact_select(mi, k, method="brute"), exact_select(mi, k, method="milp")
        assert brute.objective == pytest.approx(milp.objective, rel=1e-9)
        assert brute.objective == pytest.approx(opt.objective(mi, brute.indices))


def test_select_is_exact_on_95_percent_of_30_small_instances_and_within_1_percent_on_all():
    gaps = []
    for seed in range(30):
        mi = mi_like(30, seed=100 + seed)
        gaps.append(select(mi, 8, seed=seed).objective / exact_select(mi, 8).objective - 1)
    gaps = np.array(gaps)
    assert (gaps >= -1e-12).all()  # nothing beats the oracle
    assert (gaps <= 1e-9).mean() >= 0.95, gaps
    assert gaps.max() <= 0.01, gaps


def test_select_finds_the_optimum_on_a_real_digit_pool(digits):
    from drmi_ray.mi import pairwise_mi

    images, _ = digits
    mi = pairwise_mi(images[:40])
    best = exact_select(mi, 6)
    sel = select(mi, 6, seed=0)
    assert sel.objective == pytest.approx(best.objective, rel=1e-12)
    assert sel.indices.dtype == np.int64 and (np.diff(sel.indices) > 0).all()


def test_incremental_gains_equal_recomputation_after_many_swaps():
    rng = np.random.default_rng(1)
    mi = mi_like(400, seed=1).astype(np.float32)  # float32 rows, float64 g, as at scale
    state = _DenseState.greedy(mi, 40, 7)
    for _ in range(2000):
        state.swap_many([int(rng.integers(40))], [int(rng.choice(np.flatnonzero(~state.inside)))])
    np.testing.assert_allclose(state.g, _gains(mi, state.members), rtol=1e-9, atol=1e-9)
    assert state.inside.sum() == 40 and state.inside[state.members].all()
    assert state.objective() == pytest.approx(opt.objective(mi, state.members), rel=1e-9)
    state.local_search()  # and after the searched swaps
    np.testing.assert_allclose(state.g, _gains(mi, state.members), rtol=1e-9, atol=1e-9)


def test_select_is_deterministic_per_seed_and_reports_its_objective():
    mi = mi_like(300, seed=2)
    a, b = select(mi, 25, seed=5, iterations=40), select(mi, 25, seed=5, iterations=40)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.objective == b.objective == pytest.approx(opt.objective(mi, a.indices))
    greedy_only = select(mi, 25, seed=5, iterations=0)
    assert a.objective <= greedy_only.objective


@pytest.mark.parametrize(
    "mi, k, message",
    [
        (np.zeros((5, 5)), 6, "exceeds the pool size"),
        (np.zeros((5, 5)), 1, "at least 2"),
        (np.zeros((5, 4)), 2, "square"),
        (np.zeros(5), 2, "square"),
        (np.triu(np.ones((5, 5))), 2, "not symmetric"),
        (np.where(np.eye(5, k=1) + np.eye(5, k=-1) > 0, np.nan, 0.0), 2, "non-finite"),
        (np.where(np.eye(5, k=2) + np.eye(5, k=-2) > 0, np.inf, 0.0), 2, "non-finite"),
        (np.zeros((5, 5), dtype=np.int64), 2, "float matrix"),
        (np.zeros((5, 5)), 2.5, "integer"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(mi, k, message):
    with pytest.raises(ValueError, match=message):
        select(mi, k)


def test_partition_budgets_are_proportional_and_sum_to_k():
    rng = np.random.default_rng(0)
    for _ in range(200):
        labels = rng.integers(0, rng.integers(1, 12), size=rng.integers(1, 300))
        k = int(rng.integers(0, len(labels) + 1))
        budgets = partition_budgets(labels, k)
        sizes = dict(zip(*np.unique(labels, return_counts=True)))
        assert sum(budgets.values()) == k
        for name, b in budgets.items():
            assert 0 <= b <= sizes[name]
            assert abs(b - k * sizes[name] / len(labels)) < 1  # largest remainder: within one of the quota
    assert partition_budgets([0] * 6 + [1] * 3 + [2], 5) == {0: 3, 1: 2, 2: 0}
    with pytest.raises(ValueError, match="must lie in"):
        partition_budgets([0, 1], 3)


def test_select_partitioned_meets_each_labels_budget_and_kmeans_clusters_are_seeded(digits):
    images, labels = digits[0][:300], digits[1][:300]
    sel = select_partitioned(labels, 30, images, seed=0, iterations=10)
    assert len(sel.indices) == 30 and (np.diff(sel.indices) > 0).all()
    budgets = partition_budgets(labels, 30)
    assert {c: int((labels[sel.indices] == c).sum()) for c in budgets} == budgets
    clusters = kmeans_partitions(images, 5, seed=0)
    assert clusters.shape == (300,) and set(clusters) == set(range(5))
    np.testing.assert_array_equal(clusters, kmeans_partitions(images, 5, seed=0))
    sel = select_partitioned(clusters, 20, lambda idx: mi_like(300, seed=3)[np.ix_(idx, idx)], iterations=10)
    assert len(sel.indices) == 20


def test_shards_with_one_proposal_per_round_equal_the_dense_search(ray_local, tmp_path):
    mi = mi_like(300, seed=1)
    np.save(tmp_path / "mi.npy", mi)
    dense = select(mi, 20, seed=3, iterations=30)
    shards = select_distributed(str(tmp_path / "mi.npy"), 20, seed=3, iterations=30, mode="shards", num_actors=2, proposals=1)
    np.testing.assert_array_equal(shards.indices, dense.indices)
    assert shards.objective == pytest.approx(dense.objective, rel=1e-12)
    restarts = select_distributed(mi, 20, seed=3, iterations=30, mode="restarts", restarts=2, num_actors=1)
    assert restarts.objective <= dense.objective + 1e-12  # restart 0 is the dense run itself


def test_shards_reading_a_tile_store_select_what_the_dense_search_selects(ray_local, tmp_path, digits):
    from drmi_ray.matrix import compute_mi_matrix
    from drmi_ray.mi import pairwise_mi

    images = digits[0][:60]
    store = compute_mi_matrix(images, str(tmp_path / "store"), tile_size=32, progress=False)
    sel = select_distributed(store.url, 6, seed=2, iterations=5, mode="shards", num_actors=2, proposals=1)
    dense = select(pairwise_mi(images), 6, seed=2, iterations=5)
    np.testing.assert_array_equal(sel.indices, dense.indices)
    assert sel.objective == pytest.approx(dense.objective, rel=1e-12)


def test_distributed_refuses_a_matrix_with_nan_from_a_file_or_memory(ray_local, tmp_path):
    mi = mi_like(50, seed=0)
    mi[10, 3] = mi[3, 10] = np.nan
    np.save(tmp_path / "mi.npy", mi)
    with pytest.raises(ValueError, match="non-finite"):
        select_distributed(str(tmp_path / "mi.npy"), 5, mode="shards", num_actors=2)
    with pytest.raises(ValueError, match="non-finite"):
        select_distributed(mi, 5)  # an in-memory matrix is checked on the driver


def test_killed_shard_actor_is_restarted_and_the_result_is_the_same(ray_local, tmp_path):
    mi = mi_like(400, seed=4).astype(np.float32)
    np.save(tmp_path / "mi.npy", mi)
    kwargs = dict(seed=1, iterations=15, mode="shards", num_actors=2, proposals=4)
    clean = select_distributed(str(tmp_path / "mi.npy"), 30, **kwargs)
    killed = []

    def kill_once(info):
        if info["round"] == 3 and not killed:
            ray_local.kill(info["actors"][0], no_restart=False)  # the process dies; Ray restarts it
            killed.append(info["round"])

    faulty = select_distributed(str(tmp_path / "mi.npy"), 30, progress=kill_once, **kwargs)
    assert killed == [3]
    np.testing.assert_array_equal(faulty.indices, clean.indices)
    assert faulty.objective == clean.objective


@pytest.mark.heavy
def test_select_is_exact_on_95_of_100_small_instances_and_never_1_percent_off():
    """>= 95% exact and never > 1% above the optimum on random N=30, K=8 instances."""
    gaps = np.array([select(mi_like(30, seed=5000 + t), 8, seed=t).objective / exact_select(mi_like(30, seed=5000 + t), 8).objective - 1 for t in range(100)])
    assert (gaps <= 1e-9).mean() >= 0.95 and gaps.max() <= 0.01, gaps


# ----------------------------------------------------------------------------- coverage


def coverage_value(sim, chosen, redundancy=0.0):
    return sim[:, chosen].max(axis=1).sum() - redundancy * opt.objective(sim, chosen)


def plain_greedy(sim, k, redundancy=0.0, first=None):
    """The textbook greedy, one full evaluation of every candidate per pick (``first``: given)."""
    chosen = [] if first is None else [first]
    while len(chosen) < k:
        gains = [coverage_value(sim, chosen + [j], redundancy) if j not in chosen else -np.inf
                 for j in range(len(sim))]
        chosen.append(int(np.argmax(gains)))
    return chosen


def digit_nmi(digits, n, start=0):
    from drmi_ray.drmi import normalized_mi
    from drmi_ray.mi import pairwise_mi

    return normalized_mi(pairwise_mi(digits[0][start:start + n]), "sqrt")


@pytest.mark.parametrize("redundancy", [0.0, 0.1, 1.0])
def test_coverage_lazy_greedy_picks_what_the_plain_greedy_picks(digits, redundancy):
    sim = digit_nmi(digits, 60)
    sel = opt.select_coverage(sim, 12, redundancy=redundancy)
    assert sel.order.tolist() == plain_greedy(sim, 12, redundancy)
    np.testing.assert_array_equal(sel.indices, np.sort(sel.order))
    assert sel.objective == pytest.approx(coverage_value(sim, sel.order, redundancy), rel=1e-12)


def test_seeded_coverage_starts_at_the_seeds_random_image_then_picks_greedily(digits):
    sim = digit_nmi(digits, 60)
    orders = []
    for seed in (0, 1, 2):
        first = int(np.random.default_rng(seed).integers(60))
        sel = opt.select_coverage(sim, 12, redundancy=0.1, seed=seed)
        assert sel.order.tolist() == plain_greedy(sim, 12, 0.1, first=first)
        orders.append(tuple(sel.order))
    assert len(set(orders)) == 3  # seeds give different selections


def test_coverage_greedy_is_within_its_guarantee_of_the_exact_optimum(digits):
    import itertools

    ratios = []
    for t in range(10):
        sim = digit_nmi(digits, 12, start=40 * t) ** 4  # sharpened: optimum and greedy differ more
        best = max(coverage_value(sim, list(c)) for c in itertools.combinations(range(12), 4))
        ratios.append(opt.select_coverage(sim, 4).objective / best)
    assert min(ratios) >= 1 - 1 / np.e and max(ratios) <= 1 + 1e-12, ratios


def test_coverage_refuses_negative_similarities_and_bad_k():
    sim = np.array([[1.0, -0.2, 0.1], [-0.2, 1.0, 0.3], [0.1, 0.3, 1.0]])
    with pytest.raises(ValueError, match="sim must be >= 0"):
        opt.select_coverage(sim, 2)
    with pytest.raises(ValueError, match="exceeds the pool size"):
        opt.select_coverage(np.abs(sim), 4)
    with pytest.raises(ValueError, match="redundancy >= 0"):
        opt.select_coverage(np.abs(sim), 2, redundancy=-1.0)
