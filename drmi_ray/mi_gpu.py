"""The torch and Triton kernels of ``mi.py``: joint sums S(u,v) on a torch device, bit-identical
to the numba CPU kernel (``mi_cpu.joint_sums_cpu``: the same fixed-point table, int64 sums).

``joint_sums_torch`` runs one of three methods; ``method="auto"``, what ``mi.mi_block`` uses on any
torch device, picks onehot for bins ≤ 16, else triton on CUDA, else sort-search:
  * ``triton`` (default on CUDA): the CPU kernel's split of a pair's positions, in registers. The
    cells with u ≠ 0 come from sorting the keys ``u·bins + v`` at u's non-zero positions only
    (≤ 256 for most digits instead of all 784) and adding Δ(rank within a run of equal keys);
    the cells (0, v ≠ 0) are a histogram of v at v's non-zero positions where u is 0; the cell
    (0, 0) is counted by subtraction. One program takes one row of a and 64 columns of b, and a
    block with itself computes only its pairs j > i.
  * ``sort-search`` (pure torch; also what the CPU tests run): int16 keys sorted per pair in
    device memory, each run's start found by binary search.
  * ``onehot`` (bins ≤ 16): a block's joint histograms are one float32 matrix product of one-hot
    codes (exact: 0/1 inputs, integer counts < 2^24).
Kernels kept only for comparison (the earlier Triton kernel that sorts all d keys per pair) live
in ``benchmarks/mi_kernels_compared.py``.
"""

from __future__ import annotations

import numpy as np
import torch

from drmi_ray.mi_cpu import clogc_table, entropy_sums

ONEHOT_MAX_BINS = 16  # GPU: one-hot matmul up to here (61M pairs/s at 16 on an H200), triton/sort above
METHODS = ("auto", "triton", "sort-search", "onehot")

# Optional: the fastest GPU path. torch's Linux wheels require triton (their own metadata pins the
# matching version); elsewhere it may be absent and "auto" falls back to sort-search. Triton reads
# TRITON_INTERPRET (its CPU interpreter) at import.
try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def joint_sums_torch(codes_a: np.ndarray, codes_b: np.ndarray | None, bins: int, *, device=None,
                     method: str = "auto", max_elements: int | None = None) -> np.ndarray:
    """int64 ``(na, nb)`` joint sums S(u,v) with torch on ``device``; bit-identical to ``joint_sums_cpu``.

    device: a torch device; default ``"cuda"`` when available, else ``"cpu"``.
    method: ``"triton"`` (a Triton program per row of a and run of columns of b, over the
        non-zero positions only; CUDA, or CPU under TRITON_INTERPRET=1; at most 4096 non-zero
        positions per image of a), ``"sort-search"`` (packed int16 keys sorted per pair; run
        starts by binary search), ``"onehot"`` (float32 matmul of one-hot codes; cost grows as
        bins²), ``"auto"``: onehot for bins ≤ ``ONEHOT_MAX_BINS``, else triton on CUDA when
        installed and the images fit, else sort-search.
    max_elements: pairs × positions per chunk of the sort-search and onehot methods (memory ≈ 30 B
        each); default 2^27 on CUDA, 2^22 on CPU.
    ``codes_b=None``: the block of ``codes_a`` with itself: about half the pairs are computed
        (the Triton kernel exactly j > i; the torch methods, for a chunk of rows r0.., the
        columns r0..), the upper triangle is mirrored and the diagonal is S(u).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    symmetric = codes_b is None
    d = codes_a.shape[1]
    if method == "auto":
        if bins <= ONEHOT_MAX_BINS:
            method = "onehot"
        elif device.type == "cuda" and triton is not None and _fits_triton(codes_a):
            method = "triton"
        else:
            method = "sort-search"
    if method not in METHODS:
        raise ValueError(f'method must be "auto", "triton", "sort-search" or "onehot", got {method!r}')
    if method == "triton":
        if triton is None:
            raise ValueError('method="triton" needs the triton package; use "sort-search"')
        if not _fits_triton(codes_a):
            raise ValueError(f'method="triton": images have more than {_TRITON_MAX_D} non-zero positions; '
                             'use "sort-search"')
    if max_elements is None:
        max_elements = 2**27 if device.type == "cuda" else 2**22
    table = torch.as_tensor(clogc_table(d), device=device)
    delta = torch.diff(table, prepend=table[:1]).contiguous()  # Δ(r) = T(r) − T(r−1), Δ(0) unused
    a = torch.as_tensor(np.ascontiguousarray(codes_a), device=device)  # the kernels assume rows of d
    b = a if symmetric else torch.as_tensor(np.ascontiguousarray(codes_b), device=device)
    na, nb = len(a), len(b)
    out = torch.zeros((na, nb), dtype=torch.int64, device=device)
    cost = bins * bins if method == "onehot" else d  # elements per pair in the big intermediate
    rows = max(1, min(na, max_elements // max(1, nb * cost)))
    cols = nb if rows > 1 else max(1, min(nb, max_elements // cost))
    # chunks of the torch methods; in a symmetric block rows r0.. need only the columns r0..
    chunks = [(r0, c0) for r0 in range(0, na, rows) for c0 in range(r0 if symmetric else 0, nb, cols)]
    with torch.no_grad():
        if method == "triton":
            joint_sums_triton(a, None if symmetric else b, bins, table, delta, out)
        elif method == "sort-search":
            # keys u·bins + v − 32768 fit int16 (max 255·256 + 255 − 32768 = 32767) and halve the bytes
            a16 = (a.to(torch.int32) * bins - 32768).to(torch.int16)
            b16 = b.to(torch.int16)
            ranks = torch.arange(1, d + 1, dtype=torch.int32, device=device)
            for r0, c0 in chunks:
                keys = a16[r0:r0 + rows, None, :] + b16[None, c0:c0 + cols, :]
                shape = keys.shape[:2]
                s = torch.sort(keys.reshape(-1, d), dim=1).values
                first = torch.searchsorted(s, s, out_int32=True)  # first index of each key's run
                out[r0:r0 + rows, c0:c0 + cols] = delta[ranks - first].sum(dim=1).reshape(shape)
        else:
            oa = torch.nn.functional.one_hot(a.long(), bins).to(torch.float32)  # (na, d, bins)
            ob = torch.nn.functional.one_hot(b.long(), bins).to(torch.float32)
            ob = ob.permute(1, 0, 2).reshape(d, nb * bins)
            for r0, c0 in chunks:
                blk_a = oa[r0:r0 + rows].permute(0, 2, 1).reshape(-1, d)  # (r·bins, d)
                blk_b = ob[:, c0 * bins:(c0 + cols) * bins]
                counts = (blk_a @ blk_b).round_().long()  # (r·bins, c·bins), exact integers
                r, c = counts.shape[0] // bins, counts.shape[1] // bins
                joint = table[counts].reshape(r, bins, c, bins)
                out[r0:r0 + r, c0:c0 + c] = joint.sum(dim=(1, 3))
        if symmetric:  # as joint_sums_cpu: the upper triangle mirrored, S(u,u) = S(u) on the diagonal
            out = out.triu(1)
            out = out + out.T
            out.diagonal().copy_(torch.as_tensor(entropy_sums(codes_a, bins)))
    return out.cpu().numpy()


# ----------------------------------------------------------------------------------------------
# The Triton kernel

_TRITON_MAX_D = 4096  # keys sorted in registers per pair: a's non-zero positions
_TRITON_MIN_L = 64  # smallest sort size: two keys per lane of a warp
_TRITON_COLS = 64  # columns of b per Triton program (its row of a is loaded once for them)


def _fits_triton(codes_a):
    """The Triton kernel sorts a's non-zero positions in registers: at most _TRITON_MAX_D of them
    (b's are scanned in chunks, any number)."""
    return int(np.count_nonzero(codes_a, axis=1).max()) <= _TRITON_MAX_D


if triton is not None:

    @triton.jit
    def _triton_combine(k1, c1, k2, c2):  # running count that restarts where the (sorted) key changes
        return k2, c2 + tl.where(k1 == k2, c1, 0)

    @triton.jit
    def _triton_sparse_sums(a_codes, a_pos, a_val, a_nnz, rows, b_codes, b_pos, b_val, b_nnz, delta, table, out,
                            nb, d, bins, a_width, b_width, symmetric,
                            LA: tl.constexpr, CH: tl.constexpr, HB: tl.constexpr, COLS: tl.constexpr):
        """Joint sums S(u,v) of row i = ``rows[r]`` of a against columns j = program_id(1)·COLS..
        of b (j > i only when ``symmetric``: a block with itself).

        A pair's joint histogram, split by where its positions are non-zero (as the CPU kernel,
        the both-zero cell by subtraction):
          u ≠ 0: the keys u·bins + v at a's ≤ LA non-zero positions, sorted; a run of c equal
              keys adds Δ(1) + … + Δ(c) = T(c);
          u = 0, v ≠ 0: b's non-zero positions where u is 0 (CH at a time), a histogram of v,
              T of each bin;
          u = v = 0: the d − (both counts) positions left, T of that.
        Image a's positions and values (a_pos, a_val: the first a_nnz[i] of its row, in order)
        are loaded once for the COLS pairs."""
        i = tl.load(rows + tl.program_id(0)).to(tl.int64)
        j0 = tl.program_id(1) * COLS
        lo = tl.maximum(j0, (i + 1) * symmetric)
        hi = tl.minimum(j0 + COLS, nb)
        oa = tl.arange(0, LA)
        na = tl.load(a_nnz + i)
        in_a = oa < na
        pa = tl.load(a_pos + i * a_width + oa, mask=in_a, other=0)
        ua = tl.load(a_val + i * a_width + oa, mask=in_a, other=0).to(tl.int32) * bins
        ones = tl.full([LA], 1, tl.int32)
        for j in range(lo, hi):
            v = tl.load(b_codes + j * d + pa, mask=in_a, other=0).to(tl.int32)
            key = tl.sort(tl.where(in_a, ua + v, 1 << 20))  # padding sorts last
            _, rank = tl.associative_scan((key, ones), 0, _triton_combine)
            s = tl.sum(tl.load(delta + rank, mask=in_a, other=0))  # sorted: the first na are real keys
            hist = tl.zeros([HB], tl.int32)
            nnz_b = tl.load(b_nnz + j)
            for c0 in range(0, nnz_b, CH):
                ob = c0 + tl.arange(0, CH)
                in_b = ob < nnz_b
                pb = tl.load(b_pos + j * b_width + ob, mask=in_b, other=0)
                only_b = in_b & (tl.load(a_codes + i * d + pb, mask=in_b, other=1) == 0)
                vb = tl.load(b_val + j * b_width + ob, mask=only_b, other=0).to(tl.int32)
                hist += tl.histogram(vb, HB, mask=only_b)
            s += tl.sum(tl.load(table + hist))
            s += tl.load(table + (d - na - tl.sum(hist)))
            tl.store(out + i * nb + j, s)


def _sort_size(nnz):
    """Power-of-two sort size for each image's count of non-zero positions (≥ _TRITON_MIN_L)."""
    return np.maximum(_TRITON_MIN_L, 1 << np.ceil(np.log2(np.maximum(nnz, 1))).astype(np.int64))


def _triton_warps(size):
    # 8 keys per thread: a 256-key sort stays inside one warp, and compiled for sm_90 the kernel
    # needs 72 registers a thread at 256 keys, 128 at 4096 (251 with 16 keys a thread)
    return int(max(1, min(16, size // 256)))


def _sparse_rows(codes):
    """Non-zero positions of each row of a uint8 tensor: (positions int32 (n, w), values (n, w),
    counts int32 (n,)), positions in increasing order; w = the largest count (≥ 1)."""
    nonzero = codes != 0
    nnz = nonzero.sum(dim=1, dtype=torch.int32)
    width = max(1, int(nnz.max()))
    pos = torch.sort(nonzero.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :width]
    return pos.to(torch.int32).contiguous(), torch.gather(codes, 1, pos).contiguous(), nnz


def joint_sums_triton(a, b, bins, table, delta, out, num_warps=None):
    """``out[i, j]`` = S(a_i, b_j) by the Triton kernel, on torch tensors already on the device:
    codes ``a`` ``(na, d)`` and ``b`` (uint8; ``b=None``: a with itself, j > i only, nothing else
    written), ``table`` = ``clogc_table(d)`` and ``delta`` its differences (int64), ``out`` int64
    ``(na, nb)``. ``joint_sums_torch(method="triton")`` calls it; ``num_warps`` (default by sort
    size) is there for benchmarks.

    The rows of a are grouped by their sort size (the power of two over their non-zero count),
    one launch per group, so a few dense images do not make every pair sort a long row.
    """
    a_pos, a_val, a_nnz = _sparse_rows(a)
    b_pos, b_val, b_nnz = (a_pos, a_val, a_nnz) if b is None else _sparse_rows(b)
    size = _sort_size(a_nnz.cpu().numpy())
    nb = out.shape[1]
    for la in map(int, np.unique(size)):
        rows = torch.as_tensor(np.flatnonzero(size == la), dtype=torch.int32, device=a.device)
        _triton_sparse_sums[(len(rows), triton.cdiv(nb, _TRITON_COLS))](
            a, a_pos, a_val, a_nnz, rows, a if b is None else b, b_pos, b_val, b_nnz, delta, table, out,
            nb, a.shape[1], bins, a_pos.shape[1], b_pos.shape[1], int(b is None),
            LA=la, CH=max(256, la), HB=max(32, triton.next_power_of_2(bins)), COLS=_TRITON_COLS,
            num_warps=num_warps or _triton_warps(la))
