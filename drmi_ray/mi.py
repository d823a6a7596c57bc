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
    MI is made from them by one shared numpy function (``mi_from_sums``). The rounding costs
    < 1e-12 in MI.
  * CPU kernel (``mi_cpu.py``: numba, multi-threaded): a pair is one pass over the positions where
    u or v is non-zero (OR of per-image bit masks; digits are ~80 % background), the both-zero
    positions being the one cell (0, 0) counted by subtraction. Counts live in a per-thread
    bins×bins array whose cells carry a per-pair generation stamp, so it is never cleared between
    pairs; a cell's running count c adds Δ(c) = T(c) − T(c−1), which telescopes to T(c) = c·log c.
    Pairs are walked in row × column blocks that stay in cache.
  * GPU kernels (``mi_gpu.py``: torch on the task's device, bit-identical to the CPU kernel):
    ``triton`` (default on CUDA) sorts only the keys at one image's non-zero positions, in
    registers; ``sort-search`` (pure torch, also what the CPU tests run) sorts int16 keys per pair
    in device memory; ``onehot`` (bins ≤ 16) makes a block's joint histograms one float32 matrix
    product of one-hot codes.

Example::

    from drmi_ray.mi import pairwise_mi
    mi = pairwise_mi(images)            # images: (n, 28, 28) uint8 -> (n, n) float64
"""

from __future__ import annotations

import math

import numpy as np

from drmi_ray.images import check_images
from drmi_ray.mi_cpu import entropy_sums, fixed_point_bits, joint_sums_cpu

LEVELS = 256  # uint8 pixel values 0..255 (R = 255 in the paper)
COLOR_MODES = ("flatten", "luminance")


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
# The float64 finish shared by every kernel


def mi_from_sums(s_ab: np.ndarray, s_a: np.ndarray, s_b: np.ndarray, d: int) -> np.ndarray:
    """float64 MI block from int64 sums: joint ``s_ab (na, nb)``, per-image ``s_a (na,)``, ``s_b (nb,)``.

    MI = log d − (S(u) + S(v) − S(u,v)) / (d·2^k), clipped at 0 like sklearn (a constant image
    gives −1e-16 otherwise).
    """
    x = (s_a[:, None] + s_b[None, :] - s_ab).astype(np.float64)
    mi = math.log(d) - x * (1.0 / (d * 2.0 ** fixed_point_bits(d)))
    return np.maximum(mi, 0.0)


def image_entropies(a, *, bins: int = LEVELS, color: str = "flatten") -> np.ndarray:
    """float64 ``(n,)``: entropy H(u) (nats) of each image's pixel values; = ``pairwise_mi`` diagonal."""
    codes = to_codes(a, bins=bins, color=color)
    return _entropy_from_sums(entropy_sums(codes, bins), codes.shape[1])


def _entropy_from_sums(s: np.ndarray, d: int) -> np.ndarray:
    # H(u) = MI(u, u): joint sum S(u,u) = S(u), so log d − S(u)/(d·2^k); same expression as mi_from_sums
    x = (s + s - s).astype(np.float64)
    return np.maximum(math.log(d) - x * (1.0 / (d * 2.0 ** fixed_point_bits(d))), 0.0)


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
        from drmi_ray.mi_gpu import joint_sums_torch  # torch and triton load only when a device is asked for

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
        import torch  # only here: pairwise_mi needs no torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return mi_block(codes_a, codes_b, bins, device=device)
