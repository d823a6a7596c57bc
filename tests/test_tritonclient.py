"""The target driven by a client nobody here wrote: NVIDIA's ``tritonclient.http`` with its
defaults (binary tensor data, no request id, binary outputs), gzip/deflate bodies, versioned
paths, liveness/readiness/metadata, and every error code surfacing with the server's message.
The server is `drmi serve`, started as a user starts it (a subprocess, Ctrl-C at the end)."""

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import DrmiServe
from drmi_ray.models import predict
from drmi_ray.service import DEFAULT_MAX_BATCH as MAX_BATCH
from drmi_ray.target import load_classifier


@pytest.fixture(scope="module")
def triton(lenet5_checkpoint, tmp_path_factory):
    """(the session's LeNet-5 target served by `drmi serve`, a tritonclient for it, its checkpoint)."""
    checkpoint = lenet5_checkpoint[0]
    served = DrmiServe(checkpoint, tmp_path_factory.mktemp("triton"))
    try:
        client = httpclient.InferenceServerClient(url=served.url.removeprefix("http://"))
        yield served.service, client, checkpoint
        client.close()
        assert served.stop() == 0, served.errors()
    finally:
        served.kill()


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def images_input(images, binary=True, name="images"):
    tensor = httpclient.InferInput(name, list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images, binary_data=binary)
    return tensor


def test_liveness_readiness_and_metadata_with_and_without_a_version(triton):
    service, client, _ = triton
    key = service.create_key("tc-meta", budget=1)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("target") and client.is_model_ready("target", "1")
    assert not client.is_model_ready("target", "2") and not client.is_model_ready("other")
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    for version in ("", "1"):
        meta = client.get_model_metadata("target", model_version=version, headers=auth(key))
        assert meta["versions"] == ["1"]
        assert meta["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 28, 28]}]
        assert meta["outputs"] == [{"name": "label", "datatype": "INT64", "shape": [-1]}]


def test_the_default_call_binary_no_id_is_answered_and_charged_once(triton, digits):
    service, client, checkpoint = triton
    key = service.create_key("tc-default", budget=100)
    images = digits[0][3000:3020]
    result = client.infer("target", [images_input(images)], headers=auth(key))  # tritonclient's defaults
    expected = predict(load_classifier(checkpoint), images)
    np.testing.assert_array_equal(result.as_numpy("label"), expected)
    assert result.as_numpy("label").dtype == np.int64
    response = result.get_response()
    assert response["outputs"][0]["parameters"]["binary_data_size"] == 20 * 8  # answered as binary data
    assert response["id"].startswith("srv-") and service.usage("tc-default")["used"] == 20
    again = client.infer("target", [images_input(images)], headers=auth(key))  # no id: a new request
    assert again.get_response()["id"] != response["id"] and service.usage("tc-default")["used"] == 40


@pytest.mark.parametrize("compression", ["gzip", "deflate"])
def test_compressed_bodies_versioned_paths_json_data_and_requested_outputs(triton, digits, compression):
    service, client, checkpoint = triton
    name = f"tc-{compression}"
    key = service.create_key(name, budget=100)
    images = digits[0][3100:3116]
    expected = predict(load_classifier(checkpoint), images)
    result = client.infer("target", [images_input(images)], model_version="1", headers=auth(key),
                          request_compression_algorithm=compression, response_compression_algorithm=compression)
    np.testing.assert_array_equal(result.as_numpy("label"), expected)
    json_out = client.infer("target", [images_input(images, binary=False)], request_id=f"{name}-json",
                            outputs=[httpclient.InferRequestedOutput("label", binary_data=False)], headers=auth(key),
                            request_compression_algorithm=compression)
    assert json_out.get_response()["outputs"][0]["data"] == expected.tolist()
    assert json_out.get_response()["id"] == f"{name}-json"
    retried = client.infer("target", [images_input(images)], request_id=f"{name}-json", headers=auth(key),
                           outputs=[httpclient.InferRequestedOutput("label", binary_data=True)])
    np.testing.assert_array_equal(retried.as_numpy("label"), expected)  # the stored answer, free
    assert service.usage(name)["used"] == 32


def refusal(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as e:
        call()
    return e.value.status(), e.value.message()


def test_every_error_code_surfaces_with_the_servers_one_line_message(triton, digits):
    service, client, _ = triton
    key = service.create_key("tc-errors", budget=10)
    paced = service.create_key("tc-paced", budget=100, rate_limit=0.5, burst=4)
    two = digits[0][:2]

    def infer(images=two, k=key, model="target", **options):
        return lambda: client.infer(model, [options.pop("tensor", None) or images_input(images)], headers=auth(k),
                                    **options)

    status, message = refusal(infer(k="drk.tc-errors." + "0" * 32))
    assert status == "401" and message == "unknown API key"
    status, message = refusal(infer(model="other"))
    assert status == "404" and "no model named 'other'" in message
    status, message = refusal(infer(model_version="7"))
    assert status == "404" and "no version '7'" in message
    status, message = refusal(infer(outputs=[httpclient.InferRequestedOutput("probs")]))
    assert status == "400" and "answers 'label' only" in message
    status, message = refusal(infer(tensor=images_input(two, name="input__0")))
    assert status == "400" and "input is 'images'" in message
    status, message = refusal(infer(images=np.repeat(two, MAX_BATCH // 2 + 1, axis=0)))
    assert status == "413" and f"at most {MAX_BATCH} per request" in message
    client.infer("target", [images_input(two)], request_id="tc-e-0", headers=auth(key))
    status, message = refusal(infer(images=digits[0][2:4], request_id="tc-e-0"))
    assert status == "409" and "already used for other images" in message
    client.infer("target", [images_input(digits[0][:8])], headers=auth(key))
    status, message = refusal(infer(images=digits[0][:1]))
    assert status == "402" and "only 0 of the budget of 10 left" in message
    status, message = refusal(infer(images=digits[0][:5], k=paced))
    assert status == "413" and "burst of 4" in message
    client.infer("target", [images_input(digits[0][:4])], headers=auth(paced))
    status, message = refusal(infer(images=digits[0][:4], k=paced))
    assert status == "429" and "rate limit of 0.5 images/s" in message
    assert service.usage("tc-errors")["used"] == 10 and service.usage("tc-paced")["used"] == 4
