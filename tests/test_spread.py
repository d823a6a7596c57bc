"""Pool learning: the kNN graph on NMI, label spreading against scikit-learn, and bad inputs."""

import numpy as np
import pytest
import scipy.sparse as sp

from drmi_ray.mi import pairwise_mi
from drmi_ray.spread import knn_graph, pool_targets, spread_labels


@pytest.fixture(scope="module")
def small_pool(digits):
    """80 bundled digits, their MI matrix and their true labels (the labels only score)."""
    images, labels = digits
    pick = np.random.default_rng(0).permutation(len(images))[:80]  # the digits are stored by class
    return images[pick], pairwise_mi(images[pick]), labels[pick]


def test_knn_graph_links_each_image_to_its_k_highest_nmi_images_and_is_symmetric(small_pool):
    _, mi, _ = small_pool
    h = np.diag(mi)
    nmi = mi / np.sqrt(np.outer(h, h))
    np.fill_diagonal(nmi, 0)
    graph = knn_graph(mi, k=5).toarray()
    np.testing.assert_array_equal(graph, graph.T)
    for i in range(len(mi)):
        nearest = np.argsort(-nmi[i], kind="stable")[:5]
        np.testing.assert_allclose(graph[i, nearest], nmi[i, nearest], rtol=1e-12)
        # every other edge of i was chosen by the other end: i is among that image's 5 nearest
        others = np.setdiff1d(np.flatnonzero(graph[i]), nearest)
        for j in others:
            assert i in np.argsort(-nmi[j], kind="stable")[:5]


def test_knn_graph_read_from_a_tile_store_equals_the_dense_one(small_pool, tmp_path, ray_local):
    from drmi_ray.matrix import compute_mi_matrix

    images, mi, _ = small_pool
    store = compute_mi_matrix(images, str(tmp_path / "mi"), tile_size=32)  # 3 x 3 tiles, 6 stored
    assert abs(knn_graph(store, k=7) - knn_graph(mi, k=7)).max() < 1e-12


def test_spread_labels_equal_scikit_learn_label_spreading_on_the_same_graph(small_pool):
    from sklearn.semi_supervised import LabelSpreading

    _, mi, labels = small_pool
    graph = knn_graph(mi, k=6)
    answered = np.arange(0, 80, 4)  # 20 answered images
    ours = spread_labels(graph, answered, labels[answered], 10, alpha=0.9, iterations=30)
    dense = graph.toarray()
    y = np.full(80, -1)
    y[answered] = labels[answered]
    reference = LabelSpreading(kernel=lambda a, b: dense[np.ix_(a.ravel().astype(int), b.ravel().astype(int))],
                               alpha=0.9, max_iter=30, tol=0.0)
    with pytest.warns(Warning):  # tol=0: sklearn says it did not converge, after exactly 30 steps
        reference.fit(np.arange(80).reshape(-1, 1), y)
    # sklearn keeps a column per class present in the answers; ours has all 10, absent ones zero
    np.testing.assert_allclose(ours[:, reference.classes_], reference.label_distributions_, atol=1e-12)
    assert not ours[:, np.setdiff1d(np.arange(10), reference.classes_)].any()
    assert (ours.argmax(1) == labels).mean() > 0.4  # 20 answers for 80 images: well above chance (0.1)


def test_hand_worked_chain_spreads_toward_the_nearer_answer():
    # a path 0 - 1 - 2 - 3, answers: image 0 is class 0, image 3 is class 1, alpha 0.5, 1 step:
    # S = D^-1/2 W D^-1/2 with degrees (1, 2, 2, 1); F1 = 0.5 S Y + 0.5 Y
    w = sp.csr_matrix(np.array([[0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 0]], float))
    f = spread_labels(w, [0, 3], [0, 1], 2, alpha=0.5, iterations=1)
    # image 1 gets 0.5 * 1/sqrt(2) of class 0 and nothing of class 1 yet
    np.testing.assert_allclose(f, [[1, 0], [1, 0], [0, 1], [0, 1]])
    f = spread_labels(w, [0, 3], [0, 1], 2, alpha=0.5, iterations=2)
    assert f[1, 0] > f[1, 1] > 0 and f[2, 1] > f[2, 0] > 0


def test_pool_targets_weigh_spread_labels_and_leave_out_images_no_answer_reaches():
    # two components: {0, 1, 2} holds the answers, {3, 4} does not; image 5 is isolated
    w = np.zeros((6, 6))
    for i, j in [(0, 1), (1, 2), (3, 4)]:
        w[i, j] = w[j, i] = 0.5
    rows, mass, info = pool_targets(sp.csr_matrix(w), [0, 2], [3, 3], 4, pool_weight=0.5)
    assert rows.tolist() == [1]  # answered images are not relabelled; unreached ones are left out
    np.testing.assert_allclose(mass, [[0, 0, 0, 0.5]])  # the spread label, weighed by pool_weight
    assert info == {"reached": 1, "unreached": 3}


@pytest.mark.parametrize("case", ["one image", "blank images", "k larger than the pool"])
def test_degenerate_pools_give_defined_finite_graphs(case):
    if case == "one image":
        mi = np.array([[2.0]])
    elif case == "blank images":  # zero entropy: NMI undefined, so no edges at all
        mi = pairwise_mi(np.zeros((5, 8, 8), np.uint8))
    else:
        mi = pairwise_mi(np.random.default_rng(0).integers(0, 256, (4, 8, 8), dtype=np.uint8))
    graph = knn_graph(mi, k=10)
    assert graph.shape == mi.shape and np.isfinite(graph.data).all()
    if case == "blank images":
        assert graph.nnz == 0
        rows, mass, info = pool_targets(graph, [0], [1], 10)
        assert rows.tolist() == [] and mass.shape == (0, 10) and info["unreached"] == 4


def test_spread_refuses_answers_out_of_range():
    w = sp.csr_matrix(np.ones((3, 3)))
    with pytest.raises(ValueError, match="answers must lie in"):
        spread_labels(w, [0], [10], 10)
    with pytest.raises(ValueError, match="pool indices"):
        spread_labels(w, [5], [1], 10)


def job_for(pool, budget, learn, graph):
    from drmi_ray.referee import substitute_job
    from drmi_ray.models import TrainConfig

    picked = np.arange(budget)
    answers = np.arange(budget) % 10
    return substitute_job(pool[picked], answers, picked, TrainConfig(model="lenet5"), pool_images=pool,
                          graph=graph, learn=learn)


def test_pool_mode_job_keeps_the_answers_and_adds_the_reached_pool(small_pool):
    images, mi, _ = small_pool
    (x, y, config, (pool_x, mass)), info = job_for(images, 20, "auto", knn_graph(mi))
    np.testing.assert_array_equal(x, images[:20])
    np.testing.assert_array_equal(y, np.arange(20) % 10)  # the answered images keep the target's answers
    assert info["learn"] == "pool" and info["reached"] + info["unreached"] == 60 == len(pool_x) + info["unreached"]
    assert np.isfinite(mass).all() and np.allclose(mass.sum(axis=1), 0.5)  # spread labels at weight 0.5


@pytest.mark.parametrize("case", ["pool as small as the budget", "all-blank pool", "answers asked for"])
def test_pool_mode_falls_back_to_the_answers_alone(small_pool, case):
    images, mi, _ = small_pool
    if case == "pool as small as the budget":
        job, info = job_for(images[:20], 20, "auto", knn_graph(mi[:20, :20]))
    elif case == "all-blank pool":  # no image is alike to any other: nothing is reached
        blank = np.zeros((30, 28, 28), np.uint8)
        job, info = job_for(blank, 5, "pool", knn_graph(pairwise_mi(blank)))
        assert info["unreached"] == 25
    else:
        job, info = job_for(images, 20, "answers", knn_graph(mi))
    assert len(job) == 3 and info["learn"] == "answers"


def test_synthetic_answers_join_the_fit_and_only_pool_answers_spread(small_pool):
    """jbda's synthetic images (index -1) are not graph nodes: they are fitted as answered, and
    only the real pool images' answers spread."""
    from drmi_ray.referee import substitute_job
    from drmi_ray.models import TrainConfig

    images, mi, _ = small_pool
    indices = np.r_[np.arange(10), np.full(20, -1)]
    answers = np.arange(30) % 10
    (x, y, _, (pool_x, mass)), info = substitute_job(images[:30], answers, indices, TrainConfig(model="lenet5"),
                                                     pool_images=images, graph=knn_graph(mi), learn="auto")
    assert info["learn"] == "pool" and len(x) == len(y) == 30
    rows, expected, _ = pool_targets(knn_graph(mi), np.arange(10), answers[:10], 10)
    np.testing.assert_array_equal(pool_x, images[rows])
    np.testing.assert_array_equal(mass, expected)
