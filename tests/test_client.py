"""The client against real HTTP: a stand-in Open Inference Protocol server (tests/oip_server.py)
with the metadata, answer forms and failures of other servers (MLServer's ``[n, 1]`` INT64
``predict``, FP32 inputs, NCHW shapes, several outputs, 5xx, 429, a missing model, nobody
listening). Every answer form gives the right labels or a one-line refusal: never a silent misread."""

import socket
import time

import numpy as np
import pytest
from oip_server import OIPServer, tensor

from drmi_ray.client import TargetClient, TargetError, as_answers, labels_of


@pytest.fixture(scope="module")
def images(digits):
    return digits[0][:6]


def truth(received) -> np.ndarray:
    """The stand-in's labels: the sum of each image's pixel values mod 10 (from what it received)."""
    pixels = np.asarray(received, dtype=np.float64).reshape(len(received), -1)
    if pixels.max() <= 1.0:  # FP inputs arrive as value/255
        pixels = np.rint(pixels * 255)
    return (pixels.sum(1) % 10).astype(np.int64)


def scores(labels, dtype=np.float32):
    rows = np.full((len(labels), 10), 0.01, dtype=dtype)
    rows[np.arange(len(labels)), labels] = 0.91
    return rows


def client_for(server, **kwargs):
    return TargetClient(server.url, "secret", model=server.model, **kwargs)


def one_line(error) -> str:
    text = str(error)
    assert "\n" not in text and text, text
    return text


ACCEPTED = {  # answer form -> the reply's outputs for labels L
    "INT64 [n]": lambda L: [tensor("label", "INT64", L)],
    "INT64 [n, 1] (MLServer predict)": lambda L: [tensor("predict", "INT64", L[:, None])],
    "INT32 [n]": lambda L: [tensor("label", "INT32", L)],
    "UINT8 [n]": lambda L: [tensor("label", "UINT8", L)],
    "FP64 [n] whole numbers": lambda L: [tensor("label", "FP64", L.astype(np.float64))],
    "FP32 [n, 1] whole numbers": lambda L: [tensor("label", "FP32", L[:, None].astype(np.float32))],
    "FP32 [n, 10] scores": lambda L: [tensor("probs", "FP32", scores(L))],
    "FP64 [n, 10] scores": lambda L: [tensor("probs", "FP64", scores(L, np.float64))],
}


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("form", ACCEPTED)
def test_every_label_or_score_form_reads_as_the_right_labels(form, binary, images):
    with OIPServer(answer=lambda x: ACCEPTED[form](truth(x)), outputs=[], binary=binary) as server:
        answer = client_for(server).query(images)
        assert len(server.infers()) == 1
    expected = truth(images)
    np.testing.assert_array_equal(labels_of(answer), expected)
    if "scores" in form:
        assert answer.dtype == np.float32 and answer.shape == (len(images), 10)
    else:
        assert answer.dtype == np.int64 and answer.shape == (len(images),)


REFUSED = {  # answer form -> (the reply's outputs for labels L, words of the one-line refusal)
    "BYTES [n]": (lambda L: [tensor("label", "BYTES", [str(v) for v in L])], "not labels or scores"),
    "BOOL [n]": (lambda L: [tensor("label", "BOOL", L > 4)], "not labels or scores"),
    "INT64 [n, 10] one-hot": (lambda L: [tensor("label", "INT64", np.eye(10, dtype=np.int64)[L])], "integer rows"),
    "FP64 [n] fractions": (lambda L: [tensor("score", "FP64", L + 0.5)], "not a whole number"),
    "FP32 [n, 1] scores": (lambda L: [tensor("score", "FP32", np.full((len(L), 1), 0.7))], "not a whole number"),
    "FP32 [n, 10] with NaN": (lambda L: [tensor("probs", "FP32", np.where(scores(L) > 0.5, np.nan, 0.1))], "NaN"),
    "INT64 [n - 1]": (lambda L: [tensor("label", "INT64", L[:-1])], "for 6 images"),
    "FP32 [n, 1, 10]": (lambda L: [tensor("probs", "FP32", scores(L)[:, None])], "for 6 images"),
    "INT64 [n] negative": (lambda L: [tensor("label", "INT64", L - 10)], "negative labels"),
    "INT64 data short of its shape": (lambda L: [tensor("label", "INT64", L[:-1], shape=[len(L)])],
                                      "do not fill its shape"),
    "two outputs, none asked for": (lambda L: [tensor("label", "INT64", L), tensor("probs", "FP32", scores(L))],
                                    "2 outputs (label, probs); pass --target-output"),
}


@pytest.mark.parametrize("form", REFUSED)
def test_every_other_answer_form_is_a_one_line_refusal_never_a_guess(form, images):
    outputs, words = REFUSED[form]
    with OIPServer(answer=lambda x: outputs(truth(x)), outputs=[]) as server:
        with pytest.raises(TargetError) as e:
            client_for(server).query(images)
        assert len(server.infers()) == 1
    assert words in one_line(e.value)


def test_the_output_named_by_the_metadata_or_the_caller_is_asked_for_and_read():
    images = np.arange(3 * 16, dtype=np.uint8).reshape(3, 4, 4)
    both = lambda x: [tensor("label", "INT64", np.zeros(len(x), dtype=np.int64)),  # noqa: E731
                      tensor("probs", "FP32", scores(truth(x)))]
    inputs = [{"name": "x", "datatype": "UINT8", "shape": [-1, 4, 4]}]
    listed = [{"name": "probs", "datatype": "FP32", "shape": [-1, 10]}]
    with OIPServer(inputs=inputs, outputs=listed, answer=both) as server:  # the metadata lists one output
        np.testing.assert_array_equal(labels_of(client_for(server).query(images)), truth(images))
    with OIPServer(inputs=inputs, outputs=[], answer=both) as chosen:  # the caller names it
        np.testing.assert_array_equal(labels_of(client_for(chosen, output="probs").query(images)), truth(images))
    for s in (server, chosen):
        assert [r["body"]["outputs"] for r in s.infers()] == [[{"name": "probs"}]]


def test_a_flat_fp32_input_gets_each_image_flattened_as_floats_in_0_to_1(images):
    inputs = [{"name": "pixels", "datatype": "FP32", "shape": [-1, 784]}]
    with OIPServer(inputs=inputs, answer=lambda x: [tensor("label", "INT64", truth(x))]) as server:
        client = client_for(server)
        np.testing.assert_array_equal(client.query(images), truth(images))
    (sent,) = server.infers()
    tensor_sent = sent["body"]["inputs"][0]
    assert (tensor_sent["name"], tensor_sent["datatype"], tensor_sent["shape"]) == ("pixels", "FP32", [6, 784])
    data = np.asarray(tensor_sent["data"])
    assert data.dtype == np.float64 and 0.0 <= data.min() and data.max() <= 1.0
    np.testing.assert_allclose(data, images.reshape(-1) / 255.0, atol=1e-7)
    assert client.contract().shape == (784,) and client.answered == 6


def test_an_nchw_input_gets_channel_first_images(images):
    inputs = [{"name": "input__0", "datatype": "UINT8", "shape": [-1, 1, 28, 28]}]
    with OIPServer(inputs=inputs, answer=lambda x: [tensor("label", "INT64", truth(x))]) as server:
        client_for(server).query(images)
    (sent,) = server.infers()
    assert sent["body"]["inputs"][0]["shape"] == [6, 1, 28, 28]
    np.testing.assert_array_equal(sent["images"], images[:, None])


def test_rgb_images_are_transposed_to_chw_for_a_3_h_w_input_and_kept_for_h_w_3():
    rgb = np.random.default_rng(0).integers(0, 256, size=(2, 5, 4, 3), dtype=np.uint8)
    for shape, expected in (([-1, 3, 5, 4], rgb.transpose(0, 3, 1, 2)), ([-1, 5, 4, 3], rgb)):
        inputs = [{"name": "x", "datatype": "INT32", "shape": shape}]
        with OIPServer(inputs=inputs, answer=lambda x: [tensor("label", "INT64", truth(x))]) as server:
            client_for(server).query(rgb)
        (sent,) = server.infers()
        assert sent["body"]["inputs"][0]["shape"] == [2, *shape[1:]]
        np.testing.assert_array_equal(sent["images"], expected)


def test_the_callers_input_name_datatype_shape_and_output_win_and_the_metadata_is_not_read(images):
    answer = lambda x: [tensor("label", "INT64", np.zeros(len(x), dtype=np.int64)),  # noqa: E731
                        tensor("scores", "FP32", scores(truth(x)))]
    with OIPServer(answer=answer) as server:  # its metadata: "images" UINT8 [-1, 28, 28], output "label"
        client = client_for(server, input_name="flat", datatype="FP64", shape=(784,), output="scores")
        np.testing.assert_array_equal(labels_of(client.query(images)), truth(images))
        assert [r["method"] for r in server.requests] == ["POST"]  # no metadata request
        partly = client_for(server, datatype="FP32")  # the rest from the metadata
        np.testing.assert_array_equal(partly.query(images), np.zeros(6))
    first, second = (r["body"] for r in server.infers())
    assert (first["inputs"][0]["name"], first["inputs"][0]["datatype"], first["inputs"][0]["shape"]) == \
        ("flat", "FP64", [6, 784])
    assert first["outputs"] == [{"name": "scores"}]
    assert (second["inputs"][0]["name"], second["inputs"][0]["datatype"], second["inputs"][0]["shape"]) == \
        ("images", "FP32", [6, 28, 28])
    assert second["outputs"] == [{"name": "label"}]


def test_a_shape_mismatch_is_one_line_saying_both_shapes_and_nothing_is_sent(images):
    with OIPServer(inputs=[{"name": "x", "datatype": "UINT8", "shape": [-1, 32, 32]}]) as server:
        with pytest.raises(ValueError) as e:
            client_for(server).query(images)
        assert server.infers() == []
    text = one_line(e.value)
    assert "[28, 28]" in text and "[32, 32]" in text and "--target-shape" in text and "resize" in text


@pytest.mark.parametrize("datatype", ["BYTES", "BOOL", "INT8"])
def test_an_input_datatype_that_cannot_carry_pixels_is_one_line_and_nothing_is_sent(datatype, images):
    with OIPServer(inputs=[{"name": "x", "datatype": datatype, "shape": [-1, 28, 28]}]) as server:
        with pytest.raises(ValueError, match=f"unsupported input datatype '{datatype}'") as e:
            client_for(server).query(images)
        assert server.infers() == []
    one_line(e.value)


TWO = [{"name": "a", "datatype": "UINT8", "shape": [-1, 28, 28]}, {"name": "b", "datatype": "FP32", "shape": [-1, 3]}]


@pytest.mark.parametrize("inputs, given, words", [
    ([{"name": "x", "datatype": "UINT8", "shape": [-1, -1, -1]}], {}, "--target-shape"),
    ([], {}, "lists no inputs"),
    (TWO, {}, "several inputs: a, b; pass --target-input"),
    (TWO, {"input_name": "c"}, "no input 'c', only a, b; pass --target-input"),
], ids=["dynamic-image-dims", "no-inputs", "two-inputs", "unknown-input-name"])
def test_metadata_that_does_not_fix_the_input_is_one_line_saying_what_to_pass(inputs, given, words, images):
    with OIPServer(inputs=inputs) as server:
        with pytest.raises(TargetError) as e:
            client_for(server, **given).query(images)
        assert server.infers() == []
    assert words in one_line(e.value)


def test_the_input_named_by_the_caller_is_picked_from_several(images):
    with OIPServer(inputs=TWO) as server:
        client_for(server, input_name="a").query(images)
    assert server.infers()[0]["body"]["inputs"][0]["name"] == "a"


def test_a_missing_model_is_one_line_naming_it_and_the_option():
    with OIPServer(model="digits") as server:
        with pytest.raises(TargetError) as e:
            TargetClient(server.url, "secret", model="mnist-svc").query(np.zeros((2, 28, 28), dtype=np.uint8))
        assert server.infers() == []
    assert e.value.status == 404
    text = one_line(e.value)
    assert "'mnist-svc'" in text and "--target-model" in text


def test_a_persistent_500_fails_at_once_in_one_line_and_is_sent_once(images):
    with OIPServer(always=(500, {})) as server:
        start = time.monotonic()
        with pytest.raises(TargetError) as e:
            client_for(server).query(images)
        assert time.monotonic() - start < 10
        assert len(server.infers()) == 1
    assert e.value.status == 500 and "stand-in status 500" in one_line(e.value)


@pytest.mark.parametrize("status, headers, waits", [
    (503, {}, 0.9), (502, {}, 0.9), (504, {}, 0.9), (429, {"Retry-After": "2"}, 1.9), (500, {"Retry-After": "1"}, 0.9),
    ("drop", None, 0.4),
], ids=["503", "502", "504", "429-retry-after-2", "500-retry-after-1", "dropped-connection"])
def test_a_retryable_failure_is_retried_with_the_same_request_id(status, headers, waits, images):
    with OIPServer(statuses=[(status, headers)], answer=lambda x: [tensor("label", "INT64", truth(x))]) as server:
        client = client_for(server, prefix="run")
        start = time.monotonic()
        np.testing.assert_array_equal(client.query(images), truth(images))
        assert time.monotonic() - start >= waits
        client.query(images[:2])
    sent = server.infers()
    assert [(r["body"]["id"], r["headers"]["Idempotency-Key"]) for r in sent] == \
        [("run-0", "run-0"), ("run-0", "run-0"), ("run-1", "run-1")]
    assert client.answered == 8


def test_a_url_nobody_listens_on_fails_in_one_line_within_10_s():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nobody listens there
    client = TargetClient(f"http://127.0.0.1:{port}/app", "secret", shape=(28, 28), input_name="x", datatype="UINT8",
                          output="label")
    start = time.monotonic()
    with pytest.raises(TargetError) as e:
        client.query(np.zeros((2, 28, 28), dtype=np.uint8))
    assert time.monotonic() - start < 10
    assert e.value.status == 0 and f"127.0.0.1:{port}" in one_line(e.value)
    with pytest.raises(TargetError, match="no answer"):  # the metadata read fails the same way
        TargetClient(f"http://127.0.0.1:{port}", "secret", connect_timeout=1).contract()


def test_as_answers_and_labels_of_on_plain_data():
    assert as_answers([tensor("y", "INT64", [[3], [1]])], 2).tolist() == [3, 1]
    with pytest.raises(TargetError, match="no output 'z'"):
        as_answers([tensor("y", "INT64", [3, 1])], 2, "z")
    np.testing.assert_array_equal(labels_of(np.array([2, 0])), [2, 0])
    np.testing.assert_array_equal(labels_of(scores(np.array([4, 7]))), [4, 7])
    for bad in (np.eye(3, dtype=np.int64), np.ones((2, 1), np.float32), np.array([0.0, 1.0]), [[np.nan, 1.0]]):
        with pytest.raises(ValueError, match="integer labels"):
            labels_of(bad)
    with pytest.raises(ValueError, match="one label per image"):
        labels_of(np.array([1, 2]), 3)
