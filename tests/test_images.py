"""The one image validator (drmi_ray.images.check_images) and every public door that calls it."""

import numpy as np
import pytest
import torch

from drmi_ray.attack import pgd, transfer
from drmi_ray.acquisition import acquire
from drmi_ray.client import TargetClient
from drmi_ray.images import ImageTypeError, check_images
from drmi_ray.matrix import compute_mi_matrix
from drmi_ray.mi import image_entropies, pairwise_mi, pairwise_mi_torch
from drmi_ray.models import build_model, predict, predict_proba, to_tensor, train_classifier
from drmi_ray.prada import PradaDetector
from drmi_ray.substitute import evaluate, fit_substitute
from drmi_ray.target import train_target

GOOD = np.zeros((2, 8, 8), np.uint8)

# kind -> (bad input, exception types it must be, words the message must hold)
BAD = {
    "float": (np.full((2, 8, 8), 0.5, np.float32), (TypeError, ValueError),
              ("uint8", "float32", "np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)")),
    "nan": (np.full((2, 8, 8), np.nan), (TypeError, ValueError), ("uint8", "NaN")),
    "int": (np.zeros((2, 8, 8), np.int64), (TypeError, ValueError), ("uint8", "int64")),
    "ndim1": (np.zeros(64, np.uint8), (ValueError,), ("shape (n, H, W)",)),
    "ndim5": (np.zeros((2, 8, 8, 1, 1), np.uint8), (ValueError,), ("shape (n, H, W)",)),
    "channels": (np.zeros((2, 8, 8, 2), np.uint8), (ValueError,), ("C = 1 or 3", "C = 2")),
    "empty": (np.zeros((0, 8, 8), np.uint8), (ValueError,), ("empty",)),
    "too_few": (np.zeros((1, 8, 8), np.uint8), (ValueError,), ("too few", "at least 2")),
}
ALWAYS = {"float", "nan", "int", "ndim1", "ndim5"}


def _model():
    torch.manual_seed(0)
    return build_model("dnn5", image_size=8)


def _labels(x):
    return np.zeros(len(x), np.int64)


def _never_asked(images):
    raise AssertionError("the target was queried with images the door should have refused")


# door -> (call(x, tmp_path), argument name, kinds it refuses)
DOORS = {
    "models.to_tensor": (lambda x, _: to_tensor(x), "images", ALWAYS | {"channels"}),
    "models.train_classifier": (lambda x, _: train_classifier(x, _labels(x)), "images", ALWAYS | {"channels", "empty"}),
    "models.predict": (lambda x, _: predict(_model(), x), "images", ALWAYS | {"channels"}),
    "models.predict_proba": (lambda x, _: predict_proba(_model(), x), "images", ALWAYS | {"channels"}),
    "mi.pairwise_mi(a)": (lambda x, _: pairwise_mi(x), "a", ALWAYS | {"empty"}),
    "mi.pairwise_mi(b)": (lambda x, _: pairwise_mi(GOOD, x), "b", ALWAYS | {"empty"}),
    "mi.pairwise_mi_torch": (lambda x, _: pairwise_mi_torch(x, device="cpu"), "a", ALWAYS | {"empty"}),
    "mi.image_entropies": (lambda x, _: image_entropies(x), "a", ALWAYS | {"empty"}),
    "matrix.compute_mi_matrix": (lambda x, tmp: compute_mi_matrix(x, str(tmp / "mi"), progress=False), "images",
                                 ALWAYS | {"empty"}),
    "acquisition.acquire(random)": (lambda x, _: acquire("random", x, 1, _never_asked), "pool_images",
                                  ALWAYS | {"channels", "empty"}),
    "acquisition.acquire(drmi)": (lambda x, _: acquire("drmi", x, 2, _never_asked, mi=np.zeros((1, 1))),
                                "pool_images", ALWAYS | {"channels", "empty", "too_few"}),
    "prada.observe": (lambda x, _: PradaDetector().observe(x, _labels(x)), "images",
                      ALWAYS | {"channels", "empty"}),
    "attack.pgd": (lambda x, _: pgd(_model(), x, _labels(x)), "images", ALWAYS | {"channels"}),
    "attack.transfer": (lambda x, _: transfer(_model(), _model(), x, _labels(x)), "images", ALWAYS | {"channels"}),
    "substitute.fit_substitute": (lambda x, tmp: fit_substitute(x, _labels(x), storage_path=str(tmp)), "images",
                                  ALWAYS | {"channels", "empty"}),
    "substitute.evaluate": (lambda x, _: evaluate(_model(), x, _labels(x)), "test_images", ALWAYS | {"channels"}),
    "target.train_target": (lambda x, tmp: train_target(x, _labels(x), str(tmp / "t.pt")), "images",
                            ALWAYS | {"channels", "empty"}),
    "client.infer": (lambda x, _: TargetClient("http://127.0.0.1:9", "k").infer(x, "r"), "images",
                     ALWAYS | {"channels", "empty"}),
}
CASES = [(door, kind) for door, (_, _, kinds) in DOORS.items() for kind in BAD if kind in kinds]


@pytest.mark.parametrize("door, kind", CASES, ids=[f"{d}-{k}" for d, k in CASES])
def test_every_door_refuses_bad_images_in_one_line_naming_the_argument(door, kind, tmp_path):
    call, name, _ = DOORS[door]
    bad, types, words = BAD[kind]
    with pytest.raises(types[0]) as info:
        call(bad, tmp_path)
    msg = str(info.value)
    assert all(isinstance(info.value, t) for t in types), type(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{name} "), msg
    for word in words:
        assert word in msg, (word, msg)


@pytest.mark.parametrize("door", ["models.to_tensor", "models.predict", "models.predict_proba", "attack.pgd",
                                  "substitute.evaluate"])
def test_an_empty_batch_is_fine_where_nothing_needs_an_image(door, tmp_path):
    DOORS[door][0](BAD["empty"][0], tmp_path)


def test_the_mi_kernels_take_flat_rows_and_any_channel_count():
    # color="flatten" makes every channel a position, so an alpha channel is just more positions
    assert pairwise_mi(np.zeros((2, 8, 8, 4), np.uint8)).shape == (2, 2)
    assert pairwise_mi(np.zeros((2, 64), np.uint8)).shape == (2, 2)
    with pytest.raises(ValueError, match='a: color="luminance" needs C = 1 or 3'):
        pairwise_mi(np.zeros((2, 8, 8, 4), np.uint8), color="luminance")
    assert PradaDetector().observe(np.zeros((2, 64), np.uint8), [0, 1]) is False


def test_check_images_returns_the_array_and_reads_array_likes():
    assert check_images(GOOD) is GOOD
    colour = np.zeros((3, 8, 8, 3), np.uint8)
    assert check_images(colour, min_count=3) is colour
    stacked = check_images([GOOD[0], GOOD[1]])
    assert isinstance(stacked, np.ndarray) and stacked.shape == (2, 8, 8)
    assert check_images(torch.zeros(2, 8, 8, dtype=torch.uint8)).dtype == np.uint8
    assert check_images(np.zeros((2, 64), np.uint8), flat=True).shape == (2, 64)
    assert check_images(np.zeros((2, 8, 8, 4), np.uint8), channels=None).shape == (2, 8, 8, 4)


@pytest.mark.parametrize("bad, kwargs, error, words", [
    ([[1, 2], [3, 4]], {}, ImageTypeError, ("list of int64",)),
    ([np.zeros((2, 2), np.uint8), np.zeros((3, 3), np.uint8)], {}, ImageTypeError, ("np.stack",)),
    ("floats", {}, ImageTypeError, ("pass a numpy uint8 array",)),
    (np.zeros((8, 8), np.uint8), {}, ValueError, ("x[None]",)),
    (np.zeros((2, 8, 8), np.uint8)[:, :0], {}, ValueError, ("no pixels",)),
    (np.zeros((2, 3, 8, 8), np.uint8), {}, ValueError, ("channels first", "transpose(0, 2, 3, 1)")),
    (np.zeros((2, 8, 8, 4), np.uint8), {}, ValueError, ("alpha",)),
    (np.zeros((2, 8, 8), np.uint8), {"min_count": 3}, ValueError, ("holds 2 images, too few",)),
])
def test_check_images_says_what_to_do(bad, kwargs, error, words):
    with pytest.raises(error) as info:
        check_images(bad, name="pool", **kwargs)
    msg = str(info.value)
    assert msg.startswith("pool ") and "\n" not in msg
    for word in words:
        assert word in msg, (word, msg)


# ----------------------------------------------------------------------------- decoded image files

def encoded(image, fmt: str) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def digit_in_every_mode(digit) -> dict:
    """One 8-bit digit saved in every PIL mode that holds it exactly -> the encoded file."""
    from PIL import Image

    grey = Image.fromarray(digit)
    wide = digit.astype(np.uint16) * 257  # the same digit over 0..65535
    return {
        "L png": encoded(grey, "PNG"),
        "I;16 png": encoded(Image.fromarray(wide), "PNG"),
        "I;16B tiff": encoded(Image.fromarray(wide.astype(">u2")), "TIFF"),
        "I tiff": encoded(Image.fromarray(wide.astype(np.int32)), "TIFF"),
        "F tiff 0..1": encoded(Image.fromarray(digit.astype(np.float32) / 255), "TIFF"),
        "F tiff 0..255": encoded(Image.fromarray(digit.astype(np.float32)), "TIFF"),
        "P png": encoded(grey.convert("P"), "PNG"),
        "LA png": encoded(grey.convert("LA"), "PNG"),
        "RGBA png": encoded(grey.convert("RGBA"), "PNG"),
        "CMYK tiff": encoded(grey.convert("CMYK"), "TIFF"),
    }


def test_every_pil_mode_decodes_to_the_pixels_of_its_8_bit_save(digits):
    from PIL import Image

    from drmi_ray.data import decode_image

    digit = digits[0][7]
    for name, data in digit_in_every_mode(digit).items():
        assert np.array_equal(decode_image(data), digit), name
        assert np.array_equal(decode_image(data, mode="RGB"), np.repeat(digit[..., None], 3, axis=2)), name
    binary = digit >= 128  # mode "1": black or white
    assert np.array_equal(decode_image(encoded(Image.fromarray(binary), "PNG")), binary.astype(np.uint8) * 255)
    # transparent pixels are black, whatever colour they hold
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 255, digit
    assert np.array_equal(decode_image(encoded(Image.fromarray(rgba), "PNG")), digit)


def test_to_uint8_scales_by_the_type_range_never_clips():
    from drmi_ray.images import to_uint8

    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert np.array_equal(to_uint8(ramp.astype(np.uint16) * 257), ramp)
    assert np.array_equal(to_uint8(ramp.astype(np.int32) * 257), ramp)
    assert np.array_equal(to_uint8(ramp / 255), ramp)
    assert np.array_equal(to_uint8(ramp.astype(np.float32)), ramp)
    assert np.array_equal(to_uint8(ramp.astype(np.int32) * 1000 - 5000), ramp)  # out of range: stretched
    noise = np.random.default_rng(0).integers(0, 65536, (64, 64), dtype=np.uint16)
    assert abs(to_uint8(noise).mean() - 127.5) < 3  # not 99% white
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(np.full((8, 8), np.nan, np.float32))


def test_degenerate_images_are_named_and_real_digits_are_not(digits):
    from drmi_ray.images import degenerate

    assert not any(degenerate(d) for d in digits[0])  # none of the 5,000 bundled digits
    assert not degenerate(np.repeat(digits[0][0][..., None], 3, axis=2))
    near = np.full((28, 28), 200, np.uint8)
    near[::2] += 1
    near[0, :5] = 0  # 5 of 784 pixels (0.6%) far off
    cases = {
        "1x1 pixels, below the 8x8 floor": (np.zeros((1, 1), np.uint8), None),
        "4x300 pixels, below the 8x8 floor": (np.zeros((28, 28), np.uint8), (4, 300)),
        "blank (every pixel is 0)": (np.zeros((28, 28), np.uint8), None),
        "blank (every pixel is (10, 20, 30))": (np.full((28, 28, 3), (10, 20, 30), np.uint8), None),
        "nearly constant (99.4% of its pixels": (near, None),
    }
    for words, (image, size) in cases.items():
        reason = degenerate(image, size)
        assert reason.startswith("degenerate image: ") and words in reason, (words, reason)
