"""The target service's side of the Open Inference Protocol v2: infer requests read, answers shaped.

Plain Python (no Ray, no HTTP server): ``drmi_ray.service``'s ingress calls these for each
request, and each problem is a ``Refused`` with its HTTP status and one line. The attacker's side
of the same protocol is ``drmi_ray.client``.

An infer request (as KServe, Triton and MLServer speak it, and as ``tritonclient.http`` sends it
by default), with ``Authorization: Bearer <api key>``: body ``{"id": rid, "inputs": [{"name":
"images", "datatype": "UINT8", "shape": [n, H, W(, C)], "data": [... n·H·W(·C) values 0..255,
row-major ...]}]}``. Its answer (200): ``{"model_name", "model_version", "id", "outputs":
[{"name": "label", "datatype": "INT64", "shape": [n], "data": [...]}]}`` (or
``"probs"``/``"top1"``/``"rounded"``: ``FP32 [n, classes]``; ``OUTPUTS``, ``shown_answer``).

- **Binary tensor data** (Triton's extension): with an ``Inference-Header-Content-Length: L``
  header the body is an ``L``-byte JSON header and then the raw bytes of the input, whose
  ``parameters.binary_data_size`` gives their count (no ``"data"``). The answer comes back the
  same way (little-endian bytes, ``Inference-Header-Content-Length`` in the response) when the
  request asks: ``parameters.binary_data`` true on a requested output, or
  ``parameters.binary_data_output`` true in the request's parameters.
- ``Content-Encoding: gzip`` or ``deflate`` request bodies are read; an infer answer is
  compressed when ``Accept-Encoding`` names gzip or deflate (error answers never are).
- ``"outputs"``, when given, may name only the output this target answers; the input must be
  named ``images``; anything else is 400.
- **The request id** is the ``Idempotency-Key`` header or the body's ``"id"`` (a string: a
  number or boolean is refused, 400; header and body both given must agree, 400 otherwise).
  A request id already answered returns the stored answer, not charged again; with other
  images it is refused (409; the ledger). A request with no id gets a new server-made id
  (``srv-...``, in the answer): it is answered and charged once, but a retry of it is a new
  request.
"""

from __future__ import annotations

import gzip
import json
import math
import secrets
import zlib

import numpy as np

from .ledger import Refused, check_request_id

MODEL_NAME = "target"
MODEL_VERSION = "1"
INPUT_NAME = "images"
OUTPUTS = ("label", "probs", "top1", "rounded")  # what a query answers (see shown_answer)


def read_json(raw: bytes, what: str = "body"):
    """``raw`` parsed as JSON; ``Refused(400)`` naming ``what`` otherwise."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
        raise Refused(400, f"{what}: not JSON (or nested too deep)") from None


def _is_size(d) -> bool:
    return type(d) is int and d >= 0  # not bool, not float


def decode_body(raw: bytes, encoding: str, limit: int) -> bytes:
    """The request body under its ``Content-Encoding`` (gzip, deflate or none), at most ``limit``
    bytes once decompressed; ``Refused`` 400/413 otherwise."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding not in ("gzip", "deflate"):
        raise Refused(400, f"Content-Encoding {encoding!r}: send gzip, deflate or an uncompressed body")
    inflate = zlib.decompressobj(31 if encoding == "gzip" else 15)  # deflate over HTTP: the zlib format
    try:
        body = inflate.decompress(raw, limit + 1)
    except zlib.error:
        raise Refused(400, f"body: not valid {encoding} data") from None
    if len(body) > limit:
        raise Refused(413, f"body: larger than {limit} bytes once decompressed; send fewer images per request")
    if not inflate.eof:
        raise Refused(400, f"body: {encoding} data cut short")
    return body


def split_binary(raw: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """An infer body's JSON header and the binary tensor data after it (the binary data extension:
    ``Inference-Header-Content-Length`` says where the JSON ends)."""
    if header_length is None:
        return read_json(raw), b""
    if not header_length.strip().isdigit() or not 0 < int(header_length) <= len(raw):
        raise Refused(400, f"Inference-Header-Content-Length: expected the JSON header's length in bytes "
                           f"(1..{len(raw)}), got {header_length!r}")
    return read_json(raw[:int(header_length)], "body's JSON header"), raw[int(header_length):]


def parse_images(body: dict, shape: tuple, binary: bytes = b"", max_batch: int | None = None) -> np.ndarray:
    """The uint8 batch in an OIP infer body; ``Refused`` naming what is wrong (400; 413 for a batch
    over ``max_batch`` images, checked before the data is read).

    ``shape``: one image's shape, e.g. ``(28, 28)`` or ``(32, 32, 3)``. ``binary``: the bytes after
    the JSON header when the input has ``parameters.binary_data_size``.
    """
    inputs = body.get("inputs") if isinstance(body, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise Refused(400, 'body: expected {"inputs": [one tensor]} (Open Inference Protocol)')
    tensor = inputs[0]
    if tensor.get("name") != INPUT_NAME:
        raise Refused(400, f"inputs[0].name: this model's input is {INPUT_NAME!r}, got {tensor.get('name')!r:.60}")
    if tensor.get("datatype") != "UINT8":
        raise Refused(400, f"inputs[0].datatype: expected UINT8 images, got {tensor.get('datatype')!r:.60}")
    dims = tensor.get("shape")
    if not isinstance(dims, list) or not dims or not all(_is_size(d) for d in dims):
        raise Refused(400, f"inputs[0].shape: expected a list of sizes, got {dims!r:.60}")
    if tuple(dims[1:]) != tuple(shape):
        raise Refused(400, f"inputs[0].shape: the target takes [n, {', '.join(map(str, shape))}], got {dims}")
    if dims[0] == 0:
        raise Refused(400, "empty batch: send at least one image")
    if max_batch is not None and dims[0] > max_batch:
        raise Refused(413, f"batch of {dims[0]} images: this target answers at most {max_batch} per request")
    parameters = tensor.get("parameters", {})
    if not isinstance(parameters, dict) or set(parameters) - {"binary_data_size"}:
        raise Refused(400, f"inputs[0].parameters: only binary_data_size is supported, got {parameters!r:.60}")
    expected = math.prod(dims)
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if "data" in tensor or not _is_size(size) or size != len(binary):
            raise Refused(400, f"inputs[0].parameters.binary_data_size: expected the {len(binary)} bytes after the "
                               f"JSON header and no \"data\", got {size!r:.40}")
        if size != expected:
            raise Refused(400, f"inputs[0]: {size} bytes of UINT8 data for shape {dims} ({expected} expected)")
        return np.frombuffer(binary, dtype=np.uint8).reshape(dims)
    if binary:
        raise Refused(400, "body: binary data after the JSON header, but no input has parameters.binary_data_size")
    try:
        data = np.asarray(tensor.get("data")).reshape(-1)
    except (TypeError, ValueError, RecursionError):
        data = None
    if data is None or (data.size and data.dtype.kind not in "iu"):  # floats, bools, strings, ragged lists
        raise Refused(400, "inputs[0].data: expected whole numbers 0..255")
    if data.size != expected:
        raise Refused(400, f"inputs[0].data: {data.size} values for shape {dims} ({expected} expected)")
    if data.size and (data.min() < 0 or data.max() > 255):
        raise Refused(400, "inputs[0].data: values must be 0..255 (uint8)")
    return data.astype(np.uint8).reshape(dims)


def wants_binary(body: dict, output: str) -> bool:
    """Whether the answer goes back as binary data; ``Refused(400)`` for an output this target
    does not have (``output``: the one it answers) or a request parameter it cannot honour."""
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise Refused(400, "parameters: expected an object")
    binary = parameters.get("binary_data_output", False)
    outputs = body.get("outputs")
    if outputs is None:
        return binary is True
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise Refused(400, 'outputs: expected a list of {"name": ...}')
    for i, o in enumerate(outputs):
        if o.get("name") != output:
            raise Refused(400, f"outputs[{i}].name: this model answers {output!r} only, got {o.get('name')!r:.60}")
        wanted = o.get("parameters", {})
        if not isinstance(wanted, dict) or set(wanted) - {"binary_data"}:
            raise Refused(400, f"outputs[{i}].parameters: only binary_data is supported, got {wanted!r:.60}")
        binary = wanted.get("binary_data", binary)
    return binary is True


def request_id(header: str | None, body: dict) -> str:
    """The request's id: the ``Idempotency-Key`` header or the body's ``"id"`` (a string; both
    given must agree), or a new server-made one when neither is given (then not idempotent)."""
    given = body.get("id")
    if given is not None and not isinstance(given, str):
        raise Refused(400, f"id: expected a string request id, got {json.dumps(given)[:40]}")
    header, given = header or None, given or None
    if header and given and header != given:
        raise Refused(400, f"request id: the Idempotency-Key header {header[:40]!r} and the body's id "
                           f"{given[:40]!r} differ; send one, or the same in both")
    return check_request_id(header or given or f"srv-{secrets.token_hex(16)}")


# --------------------------------------------------------------------------- answers

def round_probs(probs: np.ndarray, decimals: int) -> np.ndarray:
    """Probability rows rounded to ``decimals`` places (not renormalised), float32."""
    if not isinstance(decimals, (int, np.integer)) or decimals < 0:
        raise ValueError(f"decimals must be an int >= 0, got {decimals!r}")
    return np.round(np.asarray(probs, dtype=np.float64), int(decimals)).astype(np.float32)


def top1(probs: np.ndarray) -> np.ndarray:
    """Keep only each row's largest probability (the others set to 0), float32 ``(n, classes)``.

    The top-1 output: the predicted class and its confidence. ``argmax`` still gives the label
    (ties: the lowest class, as ``argmax``).
    """
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 2:
        raise ValueError(f"probs must be (n, classes), got shape {probs.shape}")
    out = np.zeros_like(probs)
    rows = np.arange(len(probs))
    best = probs.argmax(axis=1)
    out[rows, best] = probs[rows, best]
    return out


def shown_answer(probs: np.ndarray, output: str, decimals: int) -> tuple[list, list]:
    """The target's labels and the answer its ``output`` kind shows (one of ``OUTPUTS``; ``decimals``
    for ``"rounded"``), as lists (what the ledger journals)."""
    labels = probs.argmax(axis=1).astype(np.int64)
    shown = {"label": lambda: labels, "probs": lambda: probs, "top1": lambda: top1(probs),
             "rounded": lambda: round_probs(probs, decimals)}[output]()
    return labels.tolist(), shown.tolist()


def answer_datatype(output: str) -> str:
    return "INT64" if output == "label" else "FP32"


def model_metadata(image_shape: tuple, output: str, classes: int) -> dict:
    """``GET /v2/models/target``: the input this target takes and the output it answers."""
    return {"name": MODEL_NAME, "versions": [MODEL_VERSION], "platform": "pytorch",
            "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, *image_shape]}],
            "outputs": [{"name": output, "datatype": answer_datatype(output),
                         "shape": [-1] if output == "label" else [-1, classes]}]}


def encode_answer(rid: str, output: str, shown, binary: bool, accept_encoding: str) -> tuple[bytes, dict]:
    """The infer answer's body and headers: JSON, or a JSON header then little-endian bytes
    (``binary``: the binary data extension); gzip/deflate when ``accept_encoding`` asks."""
    data = np.asarray(shown, dtype=np.int64 if output == "label" else np.float32)
    tensor = {"name": output, "datatype": answer_datatype(output), "shape": list(data.shape)}
    raw, headers = b"", {"Content-Type": "application/json"}
    if binary:
        raw = data.astype(data.dtype.newbyteorder("<")).tobytes()
        tensor["parameters"] = {"binary_data_size": len(raw)}
    else:
        tensor["data"] = data.reshape(-1).tolist()
    header = json.dumps({"model_name": MODEL_NAME, "model_version": MODEL_VERSION, "id": rid,
                         "outputs": [tensor]}).encode()
    if binary:
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    content = header + raw
    accepted = [e.split(";")[0].strip().lower() for e in accept_encoding.split(",")]
    if "gzip" in accepted:
        content, headers["Content-Encoding"] = gzip.compress(content, compresslevel=1), "gzip"
    elif "deflate" in accepted:
        content, headers["Content-Encoding"] = zlib.compress(content, 1), "deflate"
    return content, headers
