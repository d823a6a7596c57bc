"""MI kernels kept only for comparison: ``mi_throughput.py --gpu`` times them against the package's
kernels (``drmi_ray.mi_gpu``), and tests/test_mi.py checks them bit for bit against the CPU kernel.

``joint_sums_triton_sort`` ("triton-sort"): the earlier Triton kernel, one program per pair that
sorts all d keys ``u·bins + v`` in registers; a segmented scan gives each key's rank within its run
of equal keys, and the pair's sum is Σ Δ(rank) (Δ(c) = T(c) − T(c−1) of the fixed-point table, so
a run of c keys adds T(c)). The package's ``triton`` kernel sorts only one image's non-zero
positions instead. Needs triton (torch's Linux wheels bring it); CUDA, or CPU under
TRITON_INTERPRET=1.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from drmi_ray.mi_cpu import clogc_table

TRITON_SORT_MAX_D = 4096  # keys sorted in registers per pair: all d positions


@triton.jit
def _combine(k1, c1, k2, c2):  # running count that restarts where the (sorted) key changes
    return k2, c2 + tl.where(k1 == k2, c1, 0)


@triton.jit
def _triton_sort_sums(a_ptr, b_ptr, delta_ptr, out_ptr, nb, d, bins, BLOCK_D: tl.constexpr):
    """One program per pair: its d keys ``u·bins + v`` sorted in registers, a segmented scan gives
    each key's rank within its run, and the pair's sum is Σ Δ(rank)."""
    pid = tl.program_id(0).to(tl.int64)
    i = pid // nb
    j = pid % nb
    offs = tl.arange(0, BLOCK_D)
    inside = offs < d
    u = tl.load(a_ptr + i * d + offs, mask=inside, other=0).to(tl.int32)
    v = tl.load(b_ptr + j * d + offs, mask=inside, other=0).to(tl.int32)
    key = tl.sort(tl.where(inside, u * bins + v, 1 << 20))  # padding sorts last
    _, rank = tl.associative_scan((key, tl.full([BLOCK_D], 1, tl.int32)), 0, _combine)
    contrib = tl.load(delta_ptr + rank, mask=key < (1 << 20), other=0)
    tl.store(out_ptr + pid, tl.sum(contrib, axis=0))


def joint_sums_triton_sort(codes_a: np.ndarray, codes_b: np.ndarray | None, bins: int, *, device="cuda",
                           max_pairs: int = 2**24) -> np.ndarray:
    """int64 ``(na, nb)`` joint sums S(u,v), bit-identical to ``drmi_ray.mi_cpu.joint_sums_cpu``.

    codes: ``drmi_ray.mi.to_codes`` output, d ≤ 4096 positions; ``codes_b=None``: ``codes_a`` with
    itself (every pair computed). max_pairs: pairs per launch.
    """
    d = codes_a.shape[1]
    if d > TRITON_SORT_MAX_D:
        raise ValueError(f"triton-sort: images have more than {TRITON_SORT_MAX_D} positions; "
                         'use drmi_ray.mi_gpu.joint_sums_torch(method="sort-search")')
    table = torch.as_tensor(clogc_table(d), device=device)
    delta = torch.diff(table, prepend=table[:1]).contiguous()  # Δ(r) = T(r) − T(r−1), Δ(0) unused
    a = torch.as_tensor(np.ascontiguousarray(codes_a), device=device)
    b = a if codes_b is None else torch.as_tensor(np.ascontiguousarray(codes_b), device=device)
    na, nb = len(a), len(b)
    out = torch.empty((na, nb), dtype=torch.int64, device=device)
    rows = max(1, min(na, max_pairs // nb))
    with torch.no_grad():
        for r0 in range(0, na, rows):
            flat = torch.empty(min(rows, na - r0) * nb, dtype=torch.int64, device=device)
            _triton_sort_sums[(len(flat),)](a[r0:r0 + rows], b, delta, flat, nb, d, bins,
                                            BLOCK_D=triton.next_power_of_2(d))
            out[r0:r0 + rows] = flat.reshape(-1, nb)
    return out.cpu().numpy()
