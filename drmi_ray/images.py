"""The one image-batch validator: every public function that takes images calls ``check_images``.

An image batch is a uint8 array (pixel values 0..255) of shape ``(n, H, W)`` (grey) or
``(n, H, W, C)`` with ``C`` in ``(1, 3)`` (grey or RGB, channels last). Array-likes (a list of
equal-sized uint8 images, a uint8 torch tensor) are turned into one ndarray; use the returned
array. Anything else is refused with one line that names the argument, says what is wrong and
what to do:

- floats (also with NaN), other integers, bools: ``TypeError`` (also a ``ValueError``, so code
  that catches either keeps working). Floats in [0, 1] convert with
  ``np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)``; integers in 0..255 with
  ``np.clip(x, 0, 255).astype(np.uint8)``.
- a wrong number of axes, a channel count other than 1 or 3, images with no pixels, fewer than
  ``min_count`` images: ``ValueError``.

Options, per door: ``flat=True`` also accepts ``(n, D)`` rows of already-flattened pixels (the MI
kernels, PRADA); ``channels=None`` accepts any channel count (MI's ``color="flatten"``, where an
alpha channel is just more positions); ``min_count`` is the fewest images the caller can use.

Example::

    images = check_images(images, name="pool_images", min_count=1)

Decoded image files pass two more helpers before they join a pool (``data.decode_image``):
``to_uint8`` scales the pixels of any PIL mode to 0..255 (16-bit, 32-bit, float), and
``degenerate`` names what makes an image not worth a query (smaller than ``MIN_SIDE``, blank,
nearly constant): such images have near-zero MI with everything, so DRMI would prefer them.
"""

from __future__ import annotations

import math

import numpy as np

FLOAT_FIX = "convert floats in [0, 1] with np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)"
INT_FIX = "convert whole numbers in 0..255 with np.clip(x, 0, 255).astype(np.uint8)"


MIN_SIDE = 8  # image files narrower or lower than this (before resizing) are degenerate
NEAR_LEVELS = 2  # "nearly constant": NEAR_SHARE of the pixels within NEAR_LEVELS of one value...
NEAR_SHARE = 0.99  # ...(every channel); the 5,000 bundled MNIST digits reach at most 0.94
DEGENERATE = "degenerate image"  # first words of every reason ``degenerate`` gives


class ImageTypeError(TypeError, ValueError):
    """Images of the wrong kind (not uint8). Both a ``TypeError`` and a ``ValueError``."""


def check_images(images, *, name: str = "images", min_count: int = 0, flat: bool = False,
                 channels: tuple[int, ...] | None = (1, 3)) -> np.ndarray:
    """Validate a uint8 image batch and return it as an ndarray (the same object when it is one).

    images: uint8 ``(n, H, W)`` or ``(n, H, W, C)`` (or an array-like of those).
    name: the caller's argument name, first word of every error.
    min_count: fewest images accepted (0: an empty batch is fine).
    flat: also accept ``(n, D)``. channels: the accepted ``C`` of 4-D input (None: any).
    """
    arr = images
    if not isinstance(arr, np.ndarray):
        try:
            arr = np.asarray(images)
        except (TypeError, ValueError, RuntimeError) as e:  # ragged lists, GPU tensors, ...
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ImageTypeError(f"{name} must be uint8 pixel values 0..255 (a numpy uint8 array), got a "
                                 f"{type(images).__name__} numpy cannot read as one array ({reason}); "
                                 "pass equal-sized images as one numpy array (np.stack)") from None
    if arr.dtype != np.uint8:
        got = f"dtype {arr.dtype}" if arr is images else f"a {type(images).__name__} of {arr.dtype}"
        if arr.dtype.kind in "fc":
            if np.isnan(arr).any():
                raise ImageTypeError(f"{name} must be uint8 pixel values 0..255 (a numpy uint8 array), got "
                                     f"{got} with NaN; drop or fill the NaN pixels, then {FLOAT_FIX}")
            fix = FLOAT_FIX
        elif arr.dtype.kind in "iub":
            fix = INT_FIX
        else:
            fix = "pass a numpy uint8 array"
        raise ImageTypeError(f"{name} must be uint8 pixel values 0..255 (a numpy uint8 array), got {got}; {fix}")
    shapes = "(n, H, W), (n, H, W, C) or (n, D)" if flat else "(n, H, W) or (n, H, W, C)"
    if arr.ndim not in ((2, 3, 4) if flat else (3, 4)):
        if arr.ndim == 2:
            fix = "one image needs a leading batch axis (x[None]); a batch of flat rows x.reshape(n, H, W)"
        elif arr.ndim < 2:
            fix = "give each image its own axes, e.g. x.reshape(n, H, W)"
        else:
            fix = "drop the extra axes, e.g. x.reshape(n, H, W, C)"
        raise ValueError(f"{name} must have shape {shapes}, got shape {arr.shape}; {fix}")
    if arr.ndim == 4 and channels is not None and arr.shape[3] not in channels:
        allowed = " or ".join(map(str, channels))
        if arr.shape[1] in channels:
            fix = "channels first? move them last with x.transpose(0, 2, 3, 1)"
        elif arr.shape[3] == 4:
            fix = "drop the alpha channel with x[..., :3]"
        else:
            fix = "keep grey or RGB channels only"
        raise ValueError(f"{name} must have C = {allowed} channels in (n, H, W, C), got C = {arr.shape[3]} "
                         f"(shape {arr.shape}); {fix}")
    if math.prod(arr.shape[1:]) == 0:
        raise ValueError(f"{name} has images with no pixels (shape {arr.shape}); every image needs H, W (and C) >= 1")
    if len(arr) < min_count:
        if len(arr) == 0:
            raise ValueError(f"{name} is empty (shape {arr.shape}); pass at least {min_count} "
                             f"image{'s' if min_count > 1 else ''}")
        raise ValueError(f"{name} holds {len(arr)} image{'s' if len(arr) > 1 else ''}, too few: "
                         f"pass at least {min_count}")
    return arr


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Scale decoded pixels of any dtype to uint8 0..255, by their type's range, never by clipping.

    uint8: as is. bool (PIL mode '1'): 0 or 255. 16-bit integers (modes 'I;16', 'I;16B', ...) and
    32-bit integers within 0..65535 (mode 'I', how PIL reads 16-bit files): ``rint(x / 257)``, so
    ``x * 257`` gives back ``x``. Floats (mode 'F') within 0..1: ``rint(x * 255)``; within
    0..255: ``rint(x)``. Anything else (negative, larger) is stretched from its min..max.
    Raises ValueError on NaN or infinite pixels.
    """
    x = np.asarray(pixels)
    kind = x.dtype.kind
    if x.dtype == np.uint8:
        return x
    if kind == "b":
        return x.astype(np.uint8) * 255
    if kind not in "iuf":
        raise ValueError(f"pixels of dtype {x.dtype} cannot be read as an image")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError("image has NaN or infinite pixels")
    lo, hi = (x.min(), x.max()) if x.size else (0.0, 0.0)
    if kind == "f" and lo >= 0 and hi <= 1:
        x = x * 255
    elif kind == "f" and lo >= 0 and hi <= 255:
        pass
    elif kind in "iu" and lo >= 0 and hi <= 65535:
        x = x / 257
    elif hi > lo:
        x = (x - lo) * (255 / (hi - lo))
    else:
        x = np.zeros_like(x)
    return np.rint(x).clip(0, 255).astype(np.uint8)


def degenerate(image: np.ndarray, size: tuple[int, int] | None = None) -> str:
    """Why one uint8 image ``(H, W)`` or ``(H, W, C)`` is not worth a query, or '' when it is.

    size: the file's own (width, height) before any resizing (default: the image's).
    Degenerate: smaller than ``MIN_SIDE`` on a side, blank (one value), or nearly constant
    (``NEAR_SHARE`` of the pixels within ``NEAR_LEVELS`` of one value, in every channel).
    """
    width, height = size or (image.shape[1], image.shape[0])
    if width < MIN_SIDE or height < MIN_SIDE:
        return f"{DEGENERATE}: {width}x{height} pixels, below the {MIN_SIDE}x{MIN_SIDE} floor"
    channels = image.reshape(-1, image.shape[2] if image.ndim == 3 else 1).T
    if all((c == c[0]).all() for c in channels):
        value = int(channels[0][0]) if len(channels) == 1 else tuple(int(c[0]) for c in channels)
        return f"{DEGENERATE}: blank (every pixel is {value})"
    window = np.ones(2 * NEAR_LEVELS + 1, dtype=np.int64)
    share = min(np.convolve(np.bincount(c, minlength=256), window).max() / c.size for c in channels)
    if share >= NEAR_SHARE:
        return (f"{DEGENERATE}: nearly constant ({100 * share:.1f}% of its pixels within "
                f"{NEAR_LEVELS} levels of one value)")
    return ""
