"""The numba CPU kernel of ``mi.py`` and the fixed-point c·log c table every kernel shares.

A pair's joint sum S(u,v) = Σ_cells round(c·log c·2^k) over its joint histogram, int64 and exact in
any order (see ``mi.py`` for the method): ``joint_sums_cpu`` (numba, multi-threaded, one pass per
pair over the positions where u or v is non-zero) and the per-image sums ``entropy_sums``. The torch
and Triton kernels (``mi_gpu.py``) use the same table and give the same int64 sums bit for bit.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange
from numba.extending import overload
from numba.cpython.unsafe.numbers import trailing_zeros


# ----------------------------------------------------------------------------------------------
# Fixed-point c·log c, and the per-image sums S(u)


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
