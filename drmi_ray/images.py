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
"""

from __future__ import annotations

import math

import numpy as np

FLOAT_FIX = "convert floats in [0, 1] with np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)"
INT_FIX = "convert whole numbers in 0..255 with np.clip(x, 0, 255).astype(np.uint8)"


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
