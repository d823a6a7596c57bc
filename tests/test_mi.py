"""pairwise_mi: exact against sklearn, edge cases, the torch kernel bit-identical to numba, bad inputs."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from scipy.stats import entropy
from sklearn.metrics import mutual_info_score

from drmi_ray.mi import image_entropies, pairwise_mi, pairwise_mi_torch, to_codes
from drmi_ray.mi_cpu import joint_sums_cpu
from drmi_ray.mi_gpu import joint_sums_torch

# the kernels kept only for comparison live beside the benchmarks (not a package, not on pytest's path)
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


# README: pairwise_mi equals sklearn's mutual_info_score "to about 1e-15". Measured here against
# sklearn (float64; values up to 5.5 nats, where one ulp is 8.9e-16): colour flattened 8.9e-16
# (atol 1e-15 holds); every other small pool below at most 2.9e-15 (2-3 ulps: 1e-15 does not
# hold, hence 4e-15); the two 300x220 images 9.2e-15 (sklearn sums 66,000 positions).
PROMISED = 1e-15
SMALL = 4e-15
WIDE = 1.5e-14


def sklearn_mi(a, b=None):
    """The definition: sklearn's mutual_info_score of every pair of flattened rows."""
    a = a.reshape(len(a), -1)
    b = a if b is None else b.reshape(len(b), -1)
    return np.array([[mutual_info_score(u, v) for v in b] for u in a])


def luminance(rgb):
    """BT.601 luma rounded to uint8, written out independently of mi.py."""
    r, g, b = (rgb[..., k].astype(np.int64) for k in range(3))
    return ((299 * r + 587 * g + 114 * b + 500) // 1000).astype(np.uint8)


def test_random_images_match_sklearn_to_4e_15(rng):
    a = rng.integers(0, 256, size=(13, 16, 16), dtype=np.uint8)
    np.testing.assert_allclose(pairwise_mi(a), sklearn_mi(a), rtol=0, atol=SMALL)


def test_real_digits_match_sklearn_to_4e_15_symmetric_and_above_zero(digits):
    images = digits[0][:30]
    mi = pairwise_mi(images)
    np.testing.assert_allclose(mi, sklearn_mi(images), rtol=0, atol=SMALL)
    assert mi.shape == (30, 30) and mi.dtype == np.float64
    assert np.array_equal(mi, mi.T)
    assert mi[0, 1] > 0.05  # real digits share structure; a wrong kernel tends to give ~0 or garbage


@pytest.mark.parametrize("bins", [2, 7, 16, 64, 200, 256])
def test_every_bins_matches_sklearn_on_binned_codes(digits, bins):
    images = digits[0][100:118]
    codes = (images.astype(np.int64) * bins // 256)
    np.testing.assert_allclose(pairwise_mi(images, bins=bins), sklearn_mi(codes), rtol=0, atol=SMALL)


@pytest.mark.parametrize("bins", [256, 32])
def test_colour_flatten_and_luminance_match_sklearn(rng, bins):
    rgb = rng.integers(0, 256, size=(9, 8, 8, 3), dtype=np.uint8)
    rgb[:3] //= 4  # some darker images, so the joint histograms are not all alike
    flat = rgb.astype(np.int64) * bins // 256
    np.testing.assert_allclose(pairwise_mi(rgb, bins=bins), sklearn_mi(flat), rtol=0, atol=PROMISED)
    luma = luminance(rgb).astype(np.int64) * bins // 256
    np.testing.assert_allclose(pairwise_mi(rgb, bins=bins, color="luminance"), sklearn_mi(luma), rtol=0, atol=SMALL)
    # grey input and single-channel colour are already luminance
    grey = rgb[..., 0]
    assert np.array_equal(pairwise_mi(grey, color="luminance"), pairwise_mi(grey))
    assert np.array_equal(pairwise_mi(grey[..., None], color="luminance"), pairwise_mi(grey))


def test_flat_rows_and_an_a_by_b_block_match_sklearn_and_the_symmetric_path(digits):
    a, b = digits[0][:7], digits[0][7:12]
    block = pairwise_mi(a, b)
    assert block.shape == (7, 5)
    np.testing.assert_allclose(block, sklearn_mi(a, b), rtol=0, atol=SMALL)
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


def test_identical_images_give_the_entropy_on_and_off_the_diagonal(digits):
    u = digits[0][3]
    images = np.stack([u, u, digits[0][4]])
    mi = pairwise_mi(images)
    h = entropy(np.bincount(u.ravel()))  # nats
    assert mi[0, 1] == pytest.approx(h, abs=PROMISED)  # measured: equal to the last bit
    assert mi[0, 0] == pytest.approx(h, abs=PROMISED)
    np.testing.assert_array_equal(image_entropies(images), np.diagonal(mi))
    assert mi[0, 2] < h


def test_two_large_images_use_wide_counts_and_match_sklearn(rng):
    # d ≥ 2^16 positions switches the CPU kernel to 64-bit packed counts
    a = rng.integers(0, 256, size=(3, 300, 220), dtype=np.uint8)
    a[1, :150] = 0
    a[2] = a[0] // 7
    mi = pairwise_mi(a)
    np.testing.assert_allclose(mi, sklearn_mi(a), rtol=0, atol=WIDE)
    assert np.array_equal(pairwise_mi_torch(a, device="cpu"), mi)


@pytest.mark.parametrize("bins,method", [(256, "sort-search"), (64, "sort-search"), (16, "onehot"), (8, "onehot"),
                                         (16, "sort-search")])
def test_torch_kernel_equals_cpu_kernel_bit_for_bit(digits, bins, method):
    codes = to_codes(digits[0][:90], bins=bins)
    a, b = codes[:41], codes[41:]
    cpu = joint_sums_cpu(a, b, bins)
    # tiny chunks so the row and the column chunking are both exercised
    assert np.array_equal(joint_sums_torch(a, b, bins, device="cpu", method=method, max_elements=4000), cpu)
    sym = joint_sums_cpu(a, None, bins)  # symmetric: whole rows, then chunks of 5 columns from the diagonal on
    assert np.array_equal(joint_sums_torch(a, None, bins, device="cpu", method=method), sym)
    assert np.array_equal(joint_sums_torch(a, None, bins, device="cpu", method=method, max_elements=4000), sym)
    images = digits[0][:25]
    assert np.array_equal(pairwise_mi_torch(images, bins=bins, device="cpu"), pairwise_mi(images, bins=bins))


def kernels_compared():
    """benchmarks/mi_kernels_compared.py (the earlier Triton kernel)."""
    pytest.importorskip("triton")  # torch's Linux wheels bring it (torch requires it there); absent elsewhere
    spec = importlib.util.spec_from_file_location("mi_kernels_compared", BENCHMARKS / "mi_kernels_compared.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torch_kernel_equals_cpu_kernel_on_colour_flattened_and_luminance(rng):
    rgb = rng.integers(0, 256, size=(11, 6, 5, 3), dtype=np.uint8)
    for color in ("flatten", "luminance"):
        assert np.array_equal(pairwise_mi_torch(rgb, color=color, device="cpu"), pairwise_mi(rgb, color=color))


@pytest.mark.gpu
def test_gpu_kernels_equal_cpu_kernel_bit_for_bit(digits):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    images = digits[0][:400].copy()
    images[7] = 0  # all background
    images[8] = 200  # constant, no background
    images[9] = images[10]  # an exact duplicate
    for bins in (256, 64, 16, 7):
        assert np.array_equal(pairwise_mi_torch(images, bins=bins, device="cuda"), pairwise_mi(images, bins=bins))
    triton_sort = kernels_compared().joint_sums_triton_sort
    for bins in (256, 7):
        codes = to_codes(images, bins=bins)
        for a, b in ((codes[:150], codes[150:]), (codes[:300], None)):
            cpu = joint_sums_cpu(a, b, bins)
            for method in ("triton", "sort-search", "onehot"):
                assert np.array_equal(joint_sums_torch(a, b, bins, device="cuda", method=method), cpu), (bins, method)
            assert np.array_equal(triton_sort(a, b, bins, device="cuda"), cpu), (bins, "triton-sort")
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(50, 32, 32, 3), dtype=np.uint8)
    rgb[:10, :16] = 0  # some background
    big = np.pad(np.kron(digits[0][:60], np.ones((1, 2, 2), np.uint8)), ((0, 0), (4, 4), (4, 4)))  # 64×64
    for pool in (rgb, big):
        codes = to_codes(pool)
        for a, b in ((codes[:20], codes[20:]), (codes, None)):
            cpu = joint_sums_cpu(a, b, 256)
            assert np.array_equal(joint_sums_torch(a, b, 256, device="cuda", method="triton"), cpu)
            assert np.array_equal(triton_sort(a, b, 256, device="cuda"), cpu)
        assert np.array_equal(pairwise_mi_torch(pool, device="cuda"), pairwise_mi(pool))


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


# The Triton kernels run in Triton's CPU interpreter, in a subprocess (TRITON_INTERPRET is read when
# triton is imported). The interpreter plays tl.sort's bitonic network element by element in Python
# (seconds per 256 keys), so FAST_SORT swaps in numpy's sort: the kernel's own logic (masks, gathers,
# scan, histogram, the zero cell, the pairs it skips) is still what runs; the heavy test keeps tl.sort.
INTERPRETER_CHECKS = r"""
import sys
import numpy as np
import triton.language as tl
if FAST_SORT:
    from triton.runtime.interpreter import TensorHandle
    tl.sort = lambda x, dim=None, descending=False: tl.core.tensor(
        TensorHandle(np.sort(x.handle.data), x.handle.dtype), x.type)
import torch
from drmi_ray.mi import to_codes
from drmi_ray.mi_cpu import clogc_table, joint_sums_cpu
from drmi_ray.mi_gpu import joint_sums_torch, joint_sums_triton
sys.path.insert(0, BENCHMARKS)
from mi_kernels_compared import joint_sums_triton_sort

def check(name, a, b, bins, method="triton"):
    if method == "triton-sort":
        got = joint_sums_triton_sort(a, b, bins, device="cpu")
    else:
        got = joint_sums_torch(a, b, bins, device="cpu", method=method)
    assert np.array_equal(got, joint_sums_cpu(a, b, bins)), name
    print("ok", name, a.shape, None if b is None else b.shape, bins, method, flush=True)

def check_upper_only(name, codes, bins):
    # a block with itself: the kernel writes exactly the pairs j > i, nothing on or below the diagonal
    a = torch.as_tensor(codes)
    table = torch.as_tensor(clogc_table(codes.shape[1]))
    out = torch.zeros((len(a), len(a)), dtype=torch.int64)
    joint_sums_triton(a, None, bins, table, torch.diff(table, prepend=table[:1]), out)
    upper = np.triu(joint_sums_cpu(codes, None, bins), 1)
    assert np.array_equal(out.numpy(), upper), name
    print("ok", name, "upper triangle only", flush=True)
"""


def run_in_interpreter(checks, tmp_path, fast_sort, **arrays):
    """Run INTERPRETER_CHECKS + checks with TRITON_INTERPRET=1; arrays are saved and loaded by name."""
    pytest.importorskip("triton")  # torch's Linux wheels bring it (torch requires it there); absent elsewhere
    for name, x in arrays.items():
        np.save(tmp_path / f"{name}.npy", x)
    load = "".join(f"{name} = np.load({str(tmp_path / (name + '.npy'))!r})\n" for name in arrays)
    code = f"FAST_SORT = {fast_sort}\nBENCHMARKS = {str(BENCHMARKS)!r}\n" + INTERPRETER_CHECKS + load + checks
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return done.stdout


def test_triton_kernel_in_the_interpreter(digits, tmp_path):
    """Bit-identical to the CPU kernel: rectangular and self blocks, 256 and 7 levels, duplicates,
    an all-zero and a constant image (the zero cell alone / no zero cell at all), a wide dense b."""
    x = digits[0][:8].copy()
    x[5] = x[4]  # an exact duplicate
    odd = np.stack([np.zeros((28, 28), np.uint8), np.full((28, 28), 200, np.uint8), x[0], x[1]])
    wide = np.random.default_rng(3).integers(1, 256, size=(4, 5000), dtype=np.uint8)
    wide[:2] *= np.random.default_rng(4).random((2, 5000)) < 0.04
    out = run_in_interpreter("""
c = to_codes(x)
check("digits, rectangular", c[:2], c[2:5], 256)
check("digits with a duplicate, self block", c[3:7], None, 256)
check_upper_only("digits", c[:5], 256)
c7 = to_codes(x, bins=7)
check("digits, 7 levels", c7[:2], c7[2:4], 7)
check("zero and constant images, self block", to_codes(odd), None, 256)
check("zero and constant images, 7 levels", to_codes(odd, bins=7)[:2], to_codes(odd, bins=7)[2:], 7)
check("sparse a, b with 5000 non-zero positions (scanned in chunks)", wide[:2], wide[2:], 256)
""", tmp_path, True, x=x, odd=odd, wide=wide)
    assert out.count("ok ") == 7


@pytest.mark.heavy
def test_triton_kernels_in_the_interpreter_big_images_and_real_sort(digits, tmp_path):
    """Minutes: Triton's own tl.sort in the interpreter (both kernels), colour 32×32×3 flattened
    and 64×64 grey (d = 4096, the largest sort)."""
    rng = np.random.default_rng(2)
    x = digits[0][:3]
    rgb = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    rgb[0, :10] = 0  # some background, so the three parts of the joint histogram all occur
    big = np.kron(digits[0][10:13], np.ones((1, 2, 2), np.uint8))[:, :64, :64]  # 56×56 digits, padded
    big = np.pad(big, ((0, 0), (4, 4), (4, 4)))
    out = run_in_interpreter("""
check("digits, tl.sort", to_codes(x)[:1], to_codes(x)[1:], 256)
check("digits, tl.sort", to_codes(x)[:1], to_codes(x)[1:], 256, method="triton-sort")
""", tmp_path, False, x=x)
    assert out.count("ok ") == 2
    out = run_in_interpreter("""
check("colour 32x32x3 flattened", to_codes(rgb)[:1], to_codes(rgb)[1:], 256)
check("colour 32x32x3 flattened, self block", to_codes(rgb), None, 256)
check("grey 64x64", to_codes(big)[:1], to_codes(big)[1:], 256)
check("grey 64x64, 16 levels", to_codes(big, bins=16), None, 16)
""", tmp_path, True, rgb=rgb, big=big)
    assert out.count("ok ") == 4


def test_triton_refuses_images_it_cannot_sort():
    triton_sort = kernels_compared().joint_sums_triton_sort
    dense = np.ones((2, 5000), np.uint8)
    with pytest.raises(ValueError, match="more than 4096"):
        joint_sums_torch(dense, None, 256, device="cpu", method="triton")
    with pytest.raises(ValueError, match="more than 4096"):
        triton_sort(dense, None, 256, device="cpu")


_THREADS_AFTER_MI = """
import sys, numpy as np, torch
from drmi_ray.mi import pairwise_mi
from drmi_ray.runtime import use_cpus
if sys.argv[1] == "use_cpus":
    use_cpus()
before = torch.get_num_threads()
pairwise_mi(np.random.default_rng(0).integers(0, 256, (20, 64), dtype=np.uint8))
import numba
print(before, torch.get_num_threads(), numba.get_num_threads(), numba.threading_layer())
"""


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs a machine with 2 or more cores")
def test_use_cpus_keeps_a_one_cpu_task_on_one_thread_through_a_parallel_numba_call():
    """A fresh process with OMP_NUM_THREADS=1, as Ray starts a 1-CPU task: the first parallel numba
    call starts numba's pool on every core and (OpenMP layer) moves torch there too; after
    use_cpus() both stay on one thread."""
    def threads(how):
        out = subprocess.run([sys.executable, "-c", _THREADS_AFTER_MI, how], capture_output=True, text=True,
                             timeout=120, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.split()
        return [int(t) for t in out[:3]], out[3]

    (before, after, numba_threads), layer = threads("plain")
    assert before == 1 and numba_threads == numba.config.NUMBA_NUM_THREADS
    if layer == "omp":  # the fault use_cpus guards against happened
        assert after == numba.config.NUMBA_NUM_THREADS
    assert threads("use_cpus")[0] == [1, 1, 1]
