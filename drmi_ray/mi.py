"""Pairwise mutual information between images: the O(N²) heart of DRMI.

    MI(u, v) = Σ_i Σ_j p(i,j) log(p(i,j) / (p(i) p(j)))

over the joint histogram of the pixel values of two images at the same positions (natural log),
i.e. exactly ``sklearn.metrics.mutual_info_score(u.ravel(), v.ravel())``. The diagonal holds the
entropy H(u) = MI(u, u).

How it is computed (both kernels, CPU and GPU):
  * Each image becomes a row of ``d`` integer *codes* (``to_codes``): ``value * bins // 256`` of
    every pixel (every channel with ``color="flatten"``, the BT.601 luma with ``"luminance"``).
  * ``MI = H(u) + H(v) - H(u,v)`` and ``H(x) = log d - S(x) / d`` with ``S = Σ_cells c·log c``
    over the histogram counts c. The per-image sums S(u) are computed once; a pair costs only its
    joint sum S(u,v).
  * ``c·log c`` comes from a table in *fixed point*: int64 ``round(c·log c · 2^k)`` (k ≤ 48,
    chosen so no sum can overflow). Sums of integers are exact in any order, so the numba CPU
    kernel and the torch kernel (CPU or CUDA) give bit-identical int64 sums, and the float64
    MI is made from them by one shared numpy function. The rounding costs < 1e-12 in MI.
  * CPU kernel (numba, multi-threaded): a pair is one pass over the positions where u or v is
    non-zero (OR of per-image bit masks; digits are ~80 % background), the both-zero positions
    being the one cell (0, 0) counted by subtraction. Counts live in a per-thread bins×bins
    array whose cells carry a per-pair generation stamp, so it is never cleared between pairs;
    a cell's running count c adds Δ(c) = T(c) − T(c−1), which telescopes to T(c) = c·log c.
    Pairs are walked in row × column blocks that stay in cache.
  * GPU kernels (torch on the task's device, bit-identical to the CPU kernel):
    ``triton`` (default on CUDA): the CPU kernel's split of a pair's positions, in registers.
    The cells with u ≠ 0 come from sorting the keys ``u·bins + v`` at u's non-zero positions
    only (≤ 256 for most digits instead of all 784) and adding Δ(rank within a run of equal
    keys); the cells (0, v ≠ 0) are a histogram of v at v's non-zero positions where u is 0;
    the cell (0, 0) is counted by subtraction. One program takes one row of a and 64 columns
    of b, and a block with itself computes only its pairs j > i. ``triton-sort`` (the earlier
    kernel, kept for comparison): one program per pair sorts all d keys. ``sort-search`` (pure
    torch, also what the CPU tests run): int16 keys sorted per pair in GPU memory. ``onehot``
    (bins ≤ 16): a block's joint histograms are one float32 matrix product of one-hot codes
    (exact: 0/1 inputs, integer counts < 2^24).

Example::

    from drmi_ray.mi import pairwise_mi
    mi = pairwise_mi(images)            # images: (n, 28, 28) uint8 -> (n, n) float64
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange
from numba.extending import overload
from numba.cpython.unsafe.numbers import trailing_zeros

from drmi_ray.images import check_images

LEVELS = 256  # uint8 pixel values 0..255 (R = 255 in the paper)
COLOR_MODES = ("flatten", "luminance")
ONEHOT_MAX_BINS = 16  # GPU: one-hot matmul up to here (61M pairs/s at 16 on an H200), triton/sort above


# ----------------------------------------------------------------------------------------------
# Inputs: validation and codes


def to_codes(a, *, bins: int = LEVELS, color: str = "flatten", name: str = "a") -> np.ndarray:
    """Validate a pool and turn it into integer codes, one row per image.

    a: uint8 ``(n, H, W)`` grey, ``(n, H, W, C)`` colour, or ``(n, D)`` already flat, at least
        one image (validated by ``drmi_ray.images.check_images``: floats are refused with how to
        convert them; any C with ``"flatten"``).
    bins: number of levels, 2..256; a pixel value x becomes the code ``x * bins // 256``.
    color: ``"flatten"``: every channel of every pixel is one position (d = H·W·C);
        ``"luminance"``: colour images (C = 3) first become BT.601 luma, rounded to uint8 as
        ``(299 R + 587 G + 114 B + 500) // 1000`` (d = H·W); grey input (3-D, 2-D or C = 1)
        is already luminance and is left as it is.
    Returns uint8 ``(n, d)`` codes in ``0..bins-1`` (C-contiguous).
    """
    _check_settings(bins, color)
    a = check_images(a, name=name, min_count=1, flat=True, channels=None)  # any C: see color
    if color == "luminance" and a.ndim == 4:
        if a.shape[-1] == 3:
            rgb = a.astype(np.uint32)
            a = ((299 * rgb[..., 0] + 587 * rgb[..., 1] + 114 * rgb[..., 2] + 500) // 1000).astype(np.uint8)
        elif a.shape[-1] != 1:
            raise ValueError(f'{name}: color="luminance" needs C = 1 or 3 channels, got C = {a.shape[-1]}; '
                             'drop the alpha channel first or use color="flatten"')
    codes = np.ascontiguousarray(a.reshape(a.shape[0], -1))
    if bins != LEVELS:
        codes = (codes.astype(np.uint16) * bins // LEVELS).astype(np.uint8)
    return codes


def _check_settings(bins, color):
    if isinstance(bins, (bool, np.bool_)) or not isinstance(bins, (int, np.integer)) or not 2 <= bins <= LEVELS:
        raise ValueError(f"bins must be an integer in 2..{LEVELS} (levels per pixel), got {bins!r}")
    if color not in COLOR_MODES:
        raise ValueError(f"color must be one of {COLOR_MODES}, got {color!r}")


# ----------------------------------------------------------------------------------------------
# Fixed-point c·log c and the float64 finish shared by every kernel


def fixed_point_bits(d: int) -> int:
    """Fractional bits k of the int64 c·log c table for images of d positions (k ≤ 48).

    Any S(u) ≤ d·log d·2^k and S(u) + S(v) must stay below 2^63.
    """
    top = d * math.log(d) if d > 1 else 1.0
    return int(min(48, 61 - math.ceil(math.log2(top + 1))))


def clogc_table(d: int) -> np.ndarray:
    """int64 ``(d + 1,)``: ``round(c · log c · 2^k)`` for c = 0..d, k = ``fixed_point_bits(d)``."""
    c = np.arange(d + 1, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(c > 0, c * np.log(np.maximum(c, 1)), 0.0)
    return np.rint(t * 2.0 ** fixed_point_bits(d)).astype(np.int64)


def mi_from_sums(s_ab: np.ndarray, s_a: np.ndarray, s_b: np.ndarray, d: int) -> np.ndarray:
    """float64 MI block from int64 sums: joint ``s_ab (na, nb)``, per-image ``s_a (na,)``, ``s_b (nb,)``.

    MI = log d − (S(u) + S(v) − S(u,v)) / (d·2^k), clipped at 0 like sklearn (a constant image
    gives −1e-16 otherwise).
    """
    x = (s_a[:, None] + s_b[None, :] - s_ab).astype(np.float64)
    mi = math.log(d) - x * (1.0 / (d * 2.0 ** fixed_point_bits(d)))
    return np.maximum(mi, 0.0)


def entropy_sums(codes: np.ndarray, bins: int) -> np.ndarray:
    """int64 ``(n,)``: S(u) = Σ_levels round(c·log c·2^k) of each row of ``codes`` ``(n, d)``."""
    return _entropy_sums(codes, bins, clogc_table(codes.shape[1]))


@numba.njit(parallel=True, cache=True, nogil=True)
def _entropy_sums(codes, bins, table):
    n, d = codes.shape
    out = np.zeros(n, np.int64)
    for i in prange(n):
        cnt = np.zeros(bins, np.int32)
        for p in range(d):
            cnt[codes[i, p]] += 1
        s = 0
        for c in cnt:
            s += table[c]
        out[i] = s
    return out


def image_entropies(a, *, bins: int = LEVELS, color: str = "flatten") -> np.ndarray:
    """float64 ``(n,)``: entropy H(u) (nats) of each image's pixel values; = ``pairwise_mi`` diagonal."""
    codes = to_codes(a, bins=bins, color=color)
    return _entropy_from_sums(entropy_sums(codes, bins), codes.shape[1])


def _entropy_from_sums(s: np.ndarray, d: int) -> np.ndarray:
    # H(u) = MI(u, u): joint sum S(u,u) = S(u), so log d − S(u)/(d·2^k); same expression as mi_from_sums
    x = (s + s - s).astype(np.float64)
    return np.maximum(math.log(d) - x * (1.0 / (d * 2.0 ** fixed_point_bits(d))), 0.0)


# ----------------------------------------------------------------------------------------------
# CPU kernel (numba)

_ROW_BLOCK = 8  # rows of a that share one pass over a column block
_COL_BLOCK = 256  # columns of b kept hot in cache (256 × (784 B codes + 104 B mask) for digits)


@numba.njit(parallel=True, cache=True, nogil=True)
def nonzero_masks(codes):
    """uint64 ``(n, ceil(d/64))``: bit p of row i is set where ``codes[i, p] != 0`` (not background)."""
    n, d = codes.shape
    out = np.zeros((n, (d + 63) // 64), np.uint64)
    for i in prange(n):
        for p in range(d):
            if codes[i, p] != 0:
                out[i, p // 64] |= np.uint64(1) << np.uint64(p % 64)
    return out


def _count_bits(cnt):
    """Bits of a packed joint count: 16 in a uint32 cell, 32 in a uint64 one (generation above)."""


@overload(_count_bits)
def _count_bits_ol(cnt):
    bits = cnt.dtype.bitwidth // 2
    return lambda cnt: bits  # a compile-time constant: a runtime shift made the loop 3x slower


@numba.njit(cache=True, nogil=True)
def _row_block(rb, ca, ma, cb, mb, bins, delta, table, symmetric, out, cnt, gen):
    # Joint sums S(u,v) = Σ c·log c for rows rb·_ROW_BLOCK.. of a against the columns of b.
    # One pass per pair over the positions where u or v is non-zero (OR of the bit masks); the
    # both-zero positions form the cell (0, 0), counted as d − n. A cell's running count c adds
    # Δ(c) = T(c) − T(c−1), which telescopes to T(c). Counts carry the pair's generation number
    # in their high bits, so a stale count reads as 0 and the bins² array is never cleared per pair.
    na, d = ca.shape
    nb = cb.shape[0]
    n_words = ma.shape[1]
    one = cnt.dtype.type(1)
    shift = cnt.dtype.type(_count_bits(cnt))
    low = (one << shift) - one  # count bits; also the largest generation
    r0 = rb * _ROW_BLOCK
    r1 = min(na, r0 + _ROW_BLOCK)
    c_first = r0 if symmetric else 0
    for c0 in range(c_first - c_first % _COL_BLOCK, nb, _COL_BLOCK):
        c1 = min(nb, c0 + _COL_BLOCK)
        for i in range(r0, r1):
            u = ca[i]
            mu = ma[i]
            for j in range(max(c0, i + 1) if symmetric else c0, c1):
                v = cb[j]
                mv = mb[j]
                gen += one
                if gen == low:  # generation counter wrapped: clear once
                    cnt[:] = 0
                    gen = one
                s = 0
                n = 0
                for w in range(n_words):
                    m = mu[w] | mv[w]
                    base = w * 64
                    while m:
                        p = base + trailing_zeros(m)
                        k = u[p] * bins + v[p]
                        e = cnt[k]
                        c = (e & low) * ((e >> shift) == gen) + one
                        cnt[k] = (gen << shift) | c
                        s += delta[c]
                        n += 1
                        m &= m - np.uint64(1)
                out[i, j] = s + table[d - n]
    return gen


@numba.njit(parallel=True, cache=True, nogil=True)
def _joint_sums_cpu(ca, ma, cb, mb, bins, table, symmetric, cnt_proto):
    na = ca.shape[0]
    nb = cb.shape[0]
    out = np.zeros((na, nb), np.int64)
    delta = table.copy()
    delta[1:] -= table[:-1]
    n_rb = (na + _ROW_BLOCK - 1) // _ROW_BLOCK
    # symmetric: only j > i; task t takes row blocks t and n_rb-1-t so every task has equal work
    n_tasks = (n_rb + 1) // 2 if symmetric else n_rb
    for t in prange(n_tasks):
        cnt = np.zeros_like(cnt_proto)
        gen = _row_block(t, ca, ma, cb, mb, bins, delta, table, symmetric, out, cnt, cnt_proto[0])
        if symmetric and n_rb - 1 - t != t:
            _row_block(n_rb - 1 - t, ca, ma, cb, mb, bins, delta, table, symmetric, out, cnt, gen)
    return out


def joint_sums_cpu(codes_a: np.ndarray, codes_b: np.ndarray | None, bins: int) -> np.ndarray:
    """int64 ``(na, nb)`` joint sums S(u,v) with the numba kernel (all numba threads).

    ``codes_b=None``: the symmetric block of ``codes_a`` with itself; only j > i is computed and
    mirrored, the diagonal is S(u) (since S(u,u) = S(u)).
    """
    d = codes_a.shape[1]
    table = clogc_table(d)
    ma = nonzero_masks(codes_a)
    # per-thread joint counts: uint32 = 16-bit generation | 16-bit count while d < 2^16
    # (256 KB at 256 levels, stays in L2); uint64 = 32 | 32 bits for larger images
    cnt_proto = np.zeros(bins * bins, np.uint32 if d < 2**16 else np.uint64)
    if codes_b is None:
        out = _joint_sums_cpu(codes_a, ma, codes_a, ma, bins, table, True, cnt_proto)
        out += out.T
        out[np.diag_indices_from(out)] = entropy_sums(codes_a, bins)
        return out
    return _joint_sums_cpu(codes_a, ma, codes_b, nonzero_masks(codes_b), bins, table, False, cnt_proto)


# ----------------------------------------------------------------------------------------------
# GPU kernels (torch; also run on CPU torch, which is how the tests check them)


def joint_sums_torch(codes_a: np.ndarray, codes_b: np.ndarray | None, bins: int, *, device=None,
                     method: str = "auto", max_elements: int | None = None) -> np.ndarray:
    """int64 ``(na, nb)`` joint sums S(u,v) with torch on ``device``; bit-identical to ``joint_sums_cpu``.

    device: a torch device; default ``"cuda"`` when available, else ``"cpu"``.
    method: ``"triton"`` (a Triton program per row of a and run of columns of b, over the
        non-zero positions only; CUDA, or CPU under TRITON_INTERPRET=1; at most 4096 non-zero
        positions per image of a), ``"triton-sort"`` (the earlier Triton kernel: one program per pair
        sorts all d keys; d ≤ 4096), ``"sort"`` (packed int16 keys sorted per pair; run starts
        by a running max), ``"sort-search"`` (the same, run starts by binary search),
        ``"onehot"`` (float32 matmul of one-hot codes; cost grows as bins²), ``"auto"``: onehot
        for bins ≤ ``ONEHOT_MAX_BINS``, else triton on CUDA when installed and the images fit,
        else sort-search.
    max_elements: pairs × positions per chunk of the sort and onehot methods (memory ≈ 30 B
        each); default 2^27 on CUDA, 2^22 on CPU.
    ``codes_b=None``: the block of ``codes_a`` with itself: about half the pairs are computed
        (the Triton kernel exactly j > i; the torch methods, for a chunk of rows r0.., the
        columns r0..), the upper triangle is mirrored and the diagonal is S(u).
    """
    import torch

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
    if method not in ("triton", "triton-sort", "sort", "sort-search", "onehot"):
        raise ValueError('method must be "auto", "triton", "triton-sort", "sort", "sort-search" or "onehot", '
                         f"got {method!r}")
    if method.startswith("triton"):
        if triton is None:
            raise ValueError(f'method="{method}" needs the triton package; use "sort-search"')
        if not (_fits_triton(codes_a) if method == "triton" else d <= _TRITON_MAX_D):
            raise ValueError(f'method="{method}": images have more than {_TRITON_MAX_D} '
                             f'{"non-zero " if method == "triton" else ""}positions; use "sort-search"')
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
            _joint_sums_triton(a, None if symmetric else b, bins, table, delta, out)
        elif method == "triton-sort":
            _joint_sums_triton_sort(a, b, bins, delta, out)
        elif method != "onehot":
            # keys u·bins + v − 32768 fit int16 (max 255·256 + 255 − 32768 = 32767) and halve the bytes
            a16 = (a.to(torch.int32) * bins - 32768).to(torch.int16)
            b16 = b.to(torch.int16)
            ranks = torch.arange(1, d + 1, dtype=torch.int32, device=device)
            for r0, c0 in chunks:
                keys = a16[r0:r0 + rows, None, :] + b16[None, c0:c0 + cols, :]
                shape = keys.shape[:2]
                s = torch.sort(keys.reshape(-1, d), dim=1).values
                if method == "sort":  # start of each element's run: running max of run starts
                    new_run = torch.ones_like(s, dtype=torch.bool)
                    new_run[:, 1:] = s[:, 1:] != s[:, :-1]
                    first = torch.cummax(torch.where(new_run, ranks - 1, 0), dim=1).values
                else:  # "sort-search": first index of each key by binary search
                    first = torch.searchsorted(s, s, out_int32=True)
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


_TRITON_MAX_D = 4096  # keys sorted in registers per pair: non-zero positions (triton), all d (triton-sort)
_TRITON_MIN_L = 64  # smallest sort size: two keys per lane of a warp
_TRITON_COLS = 64  # columns of b per Triton program (its row of a is loaded once for them)


def _fits_triton(codes_a):
    """The Triton kernel sorts a's non-zero positions in registers: at most _TRITON_MAX_D of them
    (b's are scanned in chunks, any number)."""
    return int(np.count_nonzero(codes_a, axis=1).max()) <= _TRITON_MAX_D


try:  # optional: the fastest GPU path; triton reads TRITON_INTERPRET (CPU interpreter) at import
    import triton
    import triton.language as tl
except ImportError:
    triton = None

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

    @triton.jit
    def _triton_joint_sums(a_ptr, b_ptr, delta_ptr, out_ptr, nb, d, bins, BLOCK_D: tl.constexpr):
        """("triton-sort") One program per pair: its d keys ``u·bins + v`` sorted in registers, a
        segmented scan gives each key's rank within its run, and the pair's sum is Σ Δ(rank)."""
        pid = tl.program_id(0).to(tl.int64)
        i = pid // nb
        j = pid % nb
        offs = tl.arange(0, BLOCK_D)
        inside = offs < d
        u = tl.load(a_ptr + i * d + offs, mask=inside, other=0).to(tl.int32)
        v = tl.load(b_ptr + j * d + offs, mask=inside, other=0).to(tl.int32)
        key = tl.sort(tl.where(inside, u * bins + v, 1 << 20))  # padding sorts last
        _, rank = tl.associative_scan((key, tl.full([BLOCK_D], 1, tl.int32)), 0, _triton_combine)
        contrib = tl.load(delta_ptr + rank, mask=key < (1 << 20), other=0)
        tl.store(out_ptr + pid, tl.sum(contrib, axis=0))


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
    import torch

    nonzero = codes != 0
    nnz = nonzero.sum(dim=1, dtype=torch.int32)
    width = max(1, int(nnz.max()))
    pos = torch.sort(nonzero.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :width]
    return pos.to(torch.int32).contiguous(), torch.gather(codes, 1, pos).contiguous(), nnz


def _joint_sums_triton(a, b, bins, table, delta, out, num_warps=None):
    """``out[i, j]`` = S(a_i, b_j) by ``_triton_sparse_sums``; ``b=None``: a with itself, j > i only.

    The rows of a are grouped by their sort size (the power of two over their non-zero count),
    one launch per group, so a few dense images do not make every pair sort a long row.
    """
    import torch

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


def _joint_sums_triton_sort(a, b, bins, delta, out, max_pairs=2**24):
    import torch

    na, d = a.shape
    nb = b.shape[0]
    rows = max(1, min(na, max_pairs // nb))
    for r0 in range(0, na, rows):
        flat = torch.empty(min(rows, na - r0) * nb, dtype=torch.int64, device=out.device)
        _triton_joint_sums[(len(flat),)](a[r0:r0 + rows], b, delta, flat, nb, d, bins,
                                         BLOCK_D=triton.next_power_of_2(d))
        out[r0:r0 + rows] = flat.reshape(-1, nb)


# ----------------------------------------------------------------------------------------------
# Public entry points


def mi_block(codes_a: np.ndarray, codes_b: np.ndarray | None, bins: int, *, s_a=None, s_b=None,
             device=None) -> np.ndarray:
    """float64 MI block from codes (``to_codes`` output); ``codes_b=None`` = symmetric with itself.

    s_a, s_b: precomputed ``entropy_sums`` (computed here when omitted).
    device: ``None`` = numba CPU kernel; a torch device (``"cuda"``, ``"cpu"``) = torch kernel.
    """
    if s_a is None:
        s_a = entropy_sums(codes_a, bins)
    if codes_b is None:
        s_b = s_a
    elif s_b is None:
        s_b = entropy_sums(codes_b, bins)
    if device is None:
        s_ab = joint_sums_cpu(codes_a, codes_b, bins)
    else:
        s_ab = joint_sums_torch(codes_a, codes_b, bins, device=device)
    return mi_from_sums(s_ab, s_a, s_b, codes_a.shape[1])


def _codes_pair(a, b, bins, color):
    codes_a = to_codes(a, bins=bins, color=color, name="a")
    codes_b = None
    if b is not None:
        codes_b = to_codes(b, bins=bins, color=color, name="b")
        if np.shape(a)[1:] != np.shape(b)[1:]:
            raise ValueError(f"a and b must hold images of the same shape, got {np.shape(a)[1:]} and "
                             f"{np.shape(b)[1:]}; resize one pool to the other's size first")
    return codes_a, codes_b


def pairwise_mi(a, b=None, *, bins: int = LEVELS, color: str = "flatten") -> np.ndarray:
    """Dense pairwise mutual information (nats) between images, CPU kernel.

    a: uint8 ``(n, H, W)``, ``(n, H, W, C)`` or ``(n, D)``. b: optional second pool of the same
    image shape. bins: levels per pixel, 2..256 (default 256 = exact pixel values; coarser bins
    use codes ``value * bins // 256``). color: ``"flatten"`` (default; every channel a position)
    or ``"luminance"`` (see ``to_codes``).
    Returns float64 ``(n, n)`` with H(u) on the diagonal (symmetric), or ``(len(a), len(b))``
    with ``b``. Equals ``sklearn.metrics.mutual_info_score(u.ravel(), v.ravel())`` on the codes
    to ~1e-15. For pools that fit in memory; ``drmi_ray.matrix.compute_mi_matrix`` tiles larger ones.
    """
    codes_a, codes_b = _codes_pair(a, b, bins, color)
    return mi_block(codes_a, codes_b, bins)


def pairwise_mi_torch(a, b=None, *, bins: int = LEVELS, color: str = "flatten", device=None) -> np.ndarray:
    """``pairwise_mi`` computed by the torch kernel on ``device`` (default: CUDA if available).

    Bit-identical to ``pairwise_mi``. Returns a float64 numpy array.
    """
    codes_a, codes_b = _codes_pair(a, b, bins, color)
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return mi_block(codes_a, codes_b, bins, device=device)
