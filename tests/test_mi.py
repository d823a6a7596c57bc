"""pairwise_mi: exact against sklearn, edge cases, the torch kernel bit-identical to numba, bad inputs."""

import numpy as np
import pytest
from scipy.stats import entropy
from sklearn.metrics import mutual_info_score

from drmi_ray.mi import image_entropies, joint_sums_cpu, joint_sums_torch, pairwise_mi, pairwise_mi_torch, to_codes


def sklearn_mi(a, b=None):
    """The definition: sklearn's mutual_info_score of every pair of flattened rows."""
    a = a.reshape(len(a), -1)
    b = a if b is None else b.reshape(len(b), -1)
    return np.array([[mutual_info_score(u, v) for v in b] for u in a])


def luminance(rgb):
    """BT.601 luma rounded to uint8, written out independently of mi.py."""
    r, g, b = (rgb[..., k].astype(np.int64) for k in range(3))
    return ((299 * r + 587 * g + 114 * b + 500) // 1000).astype(np.uint8)


def test_random_images_match_sklearn(rng):
    a = rng.integers(0, 256, size=(13, 16, 16), dtype=np.uint8)
    np.testing.assert_allclose(pairwise_mi(a), sklearn_mi(a), rtol=0, atol=1e-9)


def test_real_digits_match_sklearn(digits):
    images = digits[0][:30]
    mi = pairwise_mi(images)
    np.testing.assert_allclose(mi, sklearn_mi(images), rtol=0, atol=1e-9)
    assert mi.shape == (30, 30) and mi.dtype == np.float64
    assert np.array_equal(mi, mi.T)
    assert mi[0, 1] > 0.05  # real digits share structure; a wrong kernel tends to give ~0 or garbage


@pytest.mark.parametrize("bins", [2, 7, 16, 64, 200, 256])
def test_every_bins_matches_sklearn_on_binned_codes(digits, bins):
    images = digits[0][100:118]
    codes = (images.astype(np.int64) * bins // 256)
    np.testing.assert_allclose(pairwise_mi(images, bins=bins), sklearn_mi(codes), rtol=0, atol=1e-9)


@pytest.mark.parametrize("bins", [256, 32])
def test_colour_flatten_and_luminance_match_sklearn(rng, bins):
    rgb = rng.integers(0, 256, size=(9, 8, 8, 3), dtype=np.uint8)
    rgb[:3] //= 4  # some darker images, so the joint histograms are not all alike
    flat = rgb.astype(np.int64) * bins // 256
    np.testing.assert_allclose(pairwise_mi(rgb, bins=bins), sklearn_mi(flat), rtol=0, atol=1e-9)
    luma = luminance(rgb).astype(np.int64) * bins // 256
    np.testing.assert_allclose(pairwise_mi(rgb, bins=bins, color="luminance"), sklearn_mi(luma), rtol=0, atol=1e-9)
    # grey input and single-channel colour are already luminance
    grey = rgb[..., 0]
    assert np.array_equal(pairwise_mi(grey, color="luminance"), pairwise_mi(grey))
    assert np.array_equal(pairwise_mi(grey[..., None], color="luminance"), pairwise_mi(grey))


def test_flat_input_and_b_block(digits):
    a, b = digits[0][:7], digits[0][7:12]
    block = pairwise_mi(a, b)
    assert block.shape == (7, 5)
    np.testing.assert_allclose(block, sklearn_mi(a, b), rtol=0, atol=1e-9)
    assert np.array_equal(pairwise_mi(a.reshape(7, -1), b.reshape(5, -1)), block)
    # the general (a, b) path and the symmetric (a) path agree bit for bit, diagonal included
    assert np.array_equal(pairwise_mi(a, a), pairwise_mi(a))


def test_constant_image_has_zero_mi_with_anything(digits):
    images = digits[0][:6].copy()
    images[2] = 0  # constant background
    images[4] = 200  # constant non-background value
    mi = pairwise_mi(images)
    assert np.all(mi[2] == 0) and np.all(mi[:, 2] == 0) and np.all(mi[4] == 0)
    assert mi[0, 1] > 0


def test_identical_images_give_the_entropy(digits):
    u = digits[0][3]
    images = np.stack([u, u, digits[0][4]])
    mi = pairwise_mi(images)
    h = entropy(np.bincount(u.ravel()))  # nats
    assert mi[0, 1] == pytest.approx(h, abs=1e-12)
    assert mi[0, 0] == pytest.approx(h, abs=1e-12)
    np.testing.assert_array_equal(image_entropies(images), np.diagonal(mi))
    assert mi[0, 2] < h


def test_two_large_images_use_wide_counts(rng):
    # d ≥ 2^16 positions switches the CPU kernel to 64-bit packed counts
    a = rng.integers(0, 256, size=(3, 300, 220), dtype=np.uint8)
    a[1, :150] = 0
    a[2] = a[0] // 7
    mi = pairwise_mi(a)
    np.testing.assert_allclose(mi, sklearn_mi(a), rtol=0, atol=1e-9)
    assert np.array_equal(pairwise_mi_torch(a, device="cpu"), mi)


@pytest.mark.parametrize("bins,method", [(256, "sort-search"), (256, "sort"), (64, "sort-search"), (16, "onehot"),
                                         (8, "onehot"), (16, "sort")])
def test_torch_kernel_equals_cpu_kernel_bit_for_bit(digits, bins, method):
    codes = to_codes(digits[0][:90], bins=bins)
    a, b = codes[:41], codes[41:]
    cpu = joint_sums_cpu(a, b, bins)
    # tiny chunks so the row and the column chunking are both exercised
    assert np.array_equal(joint_sums_torch(a, b, bins, device="cpu", method=method, max_elements=4000), cpu)
    assert np.array_equal(joint_sums_torch(a, None, bins, device="cpu", method=method), joint_sums_cpu(a, None, bins))
    images = digits[0][:25]
    assert np.array_equal(pairwise_mi_torch(images, bins=bins, device="cpu"), pairwise_mi(images, bins=bins))


def test_torch_kernel_colour(rng):
    rgb = rng.integers(0, 256, size=(11, 6, 5, 3), dtype=np.uint8)
    for color in ("flatten", "luminance"):
        assert np.array_equal(pairwise_mi_torch(rgb, color=color, device="cpu"), pairwise_mi(rgb, color=color))


@pytest.mark.gpu
def test_gpu_kernel_equals_cpu_kernel(digits):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    images = digits[0][:400]
    for bins in (256, 64, 16):
        assert np.array_equal(pairwise_mi_torch(images, bins=bins, device="cuda"), pairwise_mi(images, bins=bins))
    codes = to_codes(images)
    for method in ("sort", "sort-search", "triton", "onehot"):
        got = joint_sums_torch(codes[:150], codes[150:], 256, device="cuda", method=method)
        assert np.array_equal(got, joint_sums_cpu(codes[:150], codes[150:], 256)), method
    rgb = np.random.default_rng(1).integers(0, 256, size=(50, 32, 32, 3), dtype=np.uint8)
    assert np.array_equal(pairwise_mi_torch(rgb, device="cuda"), pairwise_mi(rgb))


@pytest.mark.parametrize("bad,err,match", [
    (np.zeros((3, 4, 4), np.float32), TypeError, "uint8.*float32"),
    (np.full((3, 4, 4), np.nan), TypeError, "uint8.*float64"),
    (np.zeros((3, 4, 4), np.int64), TypeError, "uint8.*int64"),
    ([[1, 2], [3, 4]], TypeError, "numpy uint8 array"),
    (np.zeros(5, np.uint8), ValueError, r"shape \(n, H, W\)"),
    (np.zeros((2, 2, 2, 2, 2), np.uint8), ValueError, r"shape \(n, H, W\)"),
    (np.zeros((0, 4, 4), np.uint8), ValueError, "empty"),
    (np.zeros((3, 0), np.uint8), ValueError, "no pixels"),
])
def test_bad_pools_are_refused(bad, err, match):
    with pytest.raises(err, match=match):
        pairwise_mi(bad)


@pytest.mark.parametrize("kwargs,match", [
    ({"bins": 1}, "bins must be an integer in 2..256"),
    ({"bins": 257}, "bins must be an integer in 2..256"),
    ({"bins": 16.0}, "bins must be an integer"),
    ({"bins": True}, "bins must be an integer"),
    ({"color": "rgb"}, "color must be one of"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pairwise_mi(np.zeros((2, 4, 4), np.uint8), **kwargs)


def test_mismatched_pools_and_channels_are_refused():
    with pytest.raises(ValueError, match="same shape"):
        pairwise_mi(np.zeros((2, 4, 4), np.uint8), np.zeros((2, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="same shape"):
        pairwise_mi(np.zeros((2, 4, 4), np.uint8), np.zeros((2, 16), np.uint8))
    with pytest.raises(ValueError, match="C = 1 or 3"):
        pairwise_mi(np.zeros((2, 4, 4, 4), np.uint8), color="luminance")
    with pytest.raises(TypeError, match="b must be uint8"):
        pairwise_mi(np.zeros((2, 4, 4), np.uint8), np.zeros((2, 4, 4), np.float64))


@pytest.mark.heavy
def test_triton_kernel_in_the_interpreter(digits):
    """The Triton kernel's logic on CPU (TRITON_INTERPRET=1; minutes, hence heavy)."""
    pytest.importorskip("triton")
    import subprocess
    import sys

    np.save("/tmp/_mi_triton_codes.npy", to_codes(digits[0][:9]))
    code = (
        "import numpy as np; from drmi_ray.mi import joint_sums_torch, joint_sums_cpu;"
        "c = np.load('/tmp/_mi_triton_codes.npy');"
        "assert np.array_equal(joint_sums_torch(c[:3], c[3:], 256, device='cpu', method='triton'),"
        " joint_sums_cpu(c[:3], c[3:], 256))"
    )
    import os

    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "1"})
