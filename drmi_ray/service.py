"""The target as a metered HTTP service: Ray Serve, Open Inference Protocol, API keys, a ledger.

Two deployments, one Serve application per run folder:

- ``TargetReplica`` (``replicas`` of them): a model replica holding the target checkpoint, and
  the HTTP ingress: it parses requests, checks keys and images, and asks the ledger before
  computing an answer and after it. It holds no state of its own.
- ``LedgerReplica`` (exactly one): ``drmi_ray.ledger.Ledger`` over the run's journal, shared by
  every model replica: keys, budgets, stored answers, PRADA.

The API (Open Inference Protocol v2, as KServe, Triton and MLServer speak it, and as
``tritonclient.http`` calls it by default; paths below the application's base URL
``http://HOST:PORT/<app>``; every ``/v2/models/target/...`` path also as
``/v2/models/target/versions/1/...``):

- ``POST /v2/models/{model}/infer`` with ``Authorization: Bearer <api key>``, body
  ``{"id": rid, "inputs": [{"name": "images", "datatype": "UINT8", "shape": [n, H, W(, C)],
  "data": [... n·H·W(·C) values 0..255, row-major ...]}]}``. Answer (200):
  ``{"model_name", "model_version", "id", "outputs": [{"name": "label", "datatype": "INT64",
  "shape": [n], "data": [...]}]}`` (or ``"probs"``/``"top1"``/``"rounded"``: ``FP32 [n, classes]``).

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
    images it is refused (409). A request with no id gets a new server-made id (``srv-...``,
    in the answer): it is answered and charged once, but a retry of it is a new request.
  - **Limits**: a body over ``max_body_bytes`` (default 128 MiB, decompressed) or a batch over
    ``max_batch`` images (default 4096) is refused with 413 before the model runs; so is a batch
    larger than the key's rate-limit burst (it could never pass; see ``ledger``).

  Errors are ``{"error": "<one line>"}``, always JSON: 400 malformed request (bad JSON, JSON
  nested too deep, a bad shape, datatype, name or id...), 401 bad key, 402 over budget (the whole
  batch refused), 404 unknown model, version or path, 409 request id reused for other images, 413
  too large, 429 rate limit and 503 a replica failed (both with ``Retry-After`` seconds), 500 a
  bug. A replica killed mid-request may also surface as another 5xx or a dropped connection:
  retry the same id.
- ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2`` (server metadata),
  ``GET /v2/models/{model}`` (metadata, with the API key: input name, shape and datatype, the
  output), ``GET /v2/models/{model}/ready``.
- Operator endpoints, ``Authorization: Bearer <operator key>`` only (403 for an API key):
  ``POST /v2/operator/keys`` ``{"name", "budget", "rate_limit", "burst", "prada_delta"}`` ->
  ``{"name", "key"}``; ``GET /v2/operator/keys`` (usage of every key), ``GET
  /v2/operator/keys/{name}`` (one key's usage), ``GET /v2/operator/keys/{name}/prada``,
  ``GET /v2/operator/audit[?key=name]``.

No endpoint returns weights, the journal file or another key's records to an API key.

``start_target(checkpoint, journal)`` starts it and returns a ``TargetService`` (base URL,
model name, operator key); ``stop_target`` deletes the application. When it starts Serve, the
proxy listens on ``127.0.0.1`` (unless told otherwise) on a free port (unless told one: a taken
port is refused in one line), so two runs on one machine, each with its own Ray, never share a
proxy; it then checks that its own application answers at the URL it returns.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import hashlib
import hmac
import json
import math
import os
import secrets
import socket
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from contextlib import contextmanager

import numpy as np
import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .runtime import use_cpus
from .ledger import (NAME, Ledger, Refused, check_request_id, check_service, images_digest, key_name,
                     new_operator_key, read_journal)

MODEL_NAME = "target"
MODEL_VERSION = "1"
INPUT_NAME = "images"
OUTPUTS = ("label", "probs", "top1", "rounded")  # what a query answers (see Classifier)
DEFAULT_MAX_BATCH = 4096  # images per request
DEFAULT_MAX_BODY_BYTES = 128 << 20  # a request body, decompressed (about 4,000 CIFAR-10 images as JSON)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class LedgerReplica:
    """The one ledger; every method answers ``("ok", value)`` or ``("refused", status, message,
    retry_after)`` (an exception's type does not survive a Serve handle reliably)."""

    def __init__(self, journal: str, operator_key: str, service: dict):
        self.ledger = Ledger(journal, operator_key, service)

    def call(self, method: str, *args, **kwargs):
        try:
            return ("ok", getattr(self.ledger, method)(*args, **kwargs))
        except Refused as e:
            return ("refused", e.status, e.message, e.retry_after)
        except ValueError as e:  # bad key settings from the operator
            return ("refused", 400, str(e), None)


def _error(status: int, message: str, retry_after: float | None = None) -> JSONResponse:
    headers = {} if retry_after is None else {"Retry-After": str(max(1, math.ceil(retry_after)))}
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _json(raw: bytes, what: str = "body"):
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
        return _json(raw), b""
    if not header_length.strip().isdigit() or not 0 < int(header_length) <= len(raw):
        raise Refused(400, f"Inference-Header-Content-Length: expected the JSON header's length in bytes "
                           f"(1..{len(raw)}), got {header_length!r}")
    return _json(raw[:int(header_length)], "body's JSON header"), raw[int(header_length):]


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


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100)
class TargetReplica:
    """A model replica and the HTTP ingress (see the module doc): routes, checks, and for a query
    ledger (reserve) -> the model, here -> ledger (journal and charge)."""

    def __init__(self, ledger, checkpoint: str, output: str, decimals: int, operator_key: str,
                 max_batch: int = DEFAULT_MAX_BATCH, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        from .target import load_checkpoint, load_classifier

        use_cpus()
        ckpt = load_checkpoint(checkpoint)
        size, channels = ckpt["image_size"], ckpt["in_channels"]
        self.image_shape = (size, size) if channels == 1 else (size, size, channels)
        self.classes = ckpt["num_classes"]
        self.model, self.output, self.decimals = load_classifier(checkpoint), output, decimals
        self.ledger, self.operator_key = ledger, operator_key
        self.max_batch, self.max_body_bytes = max_batch, max_body_bytes

    def _predict(self, images: np.ndarray):
        """The target's labels and the answer its output kind shows."""
        from .models import predict_proba
        from .prada import round_probs, top1

        probs = predict_proba(self.model, images)
        labels = probs.argmax(axis=1).astype(np.int64)
        shown = {"label": lambda: labels, "probs": lambda: probs, "top1": lambda: top1(probs),
                 "rounded": lambda: round_probs(probs, self.decimals)}[self.output]()
        return labels.tolist(), shown.tolist()

    async def __call__(self, request: Request) -> Response:
        path = request.url.path[len(request.scope.get("root_path", "")):].rstrip("/")
        key = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        try:
            return await self._route(request, path.split("/")[1:], key)
        except Refused as e:
            return _error(e.status, e.message, e.retry_after)
        except Exception as e:  # a bug, not the request: still one JSON line, never a text page
            return _error(500, f"internal error ({type(e).__name__}); nothing was charged unless answered")

    async def _body(self, request) -> bytes:
        """The request body, decompressed, at most ``max_body_bytes`` (413 past it, unread)."""
        limit, length = self.max_body_bytes, request.headers.get("content-length", "")
        too_large = Refused(413, f"body: larger than {limit} bytes; send fewer images per request")
        if length.isdigit() and int(length) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return decode_body(b"".join(chunks), request.headers.get("content-encoding", ""), limit)

    async def _route(self, request, parts, key):
        method = request.method
        if parts in (["v2", "health", "live"], ["v2", "health", "ready"]):
            return JSONResponse({parts[2]: True})
        if parts == ["v2"]:
            return JSONResponse({"name": "drmi-target", "version": "2", "extensions": ["binary_tensor_data"]})
        if parts[:2] == ["v2", "operator"]:
            if not hmac.compare_digest(key.encode(), self.operator_key.encode()):
                raise Refused(403 if key else 401, "operator endpoints need the operator key")
            return await self._operator(method, parts[2:], request)
        if len(parts) >= 3 and parts[:2] == ["v2", "models"]:
            if parts[2] != MODEL_NAME:
                raise Refused(404, f"no model named {parts[2]!r:.60}; this server serves {MODEL_NAME!r}")
            rest = parts[3:]
            if rest[:1] == ["versions"] and len(rest) >= 2:
                if rest[1] != MODEL_VERSION:
                    raise Refused(404, f"no version {rest[1]!r:.60} of model {MODEL_NAME!r}; it has version "
                                       f"{MODEL_VERSION!r}")
                rest = rest[2:]
            if rest == [] and method == "GET":
                key_name(self.operator_key, key)
                return JSONResponse(self._metadata())
            if rest == ["ready"]:
                return JSONResponse({"ready": True})
            if rest == ["infer"] and method == "POST":
                return await self._infer(request, key)
        raise Refused(404, f"no endpoint {method} /{'/'.join(parts)[:100]}")

    def _metadata(self) -> dict:
        return {"name": MODEL_NAME, "versions": [MODEL_VERSION], "platform": "pytorch",
                "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, *self.image_shape]}],
                "outputs": [{"name": self.output, "datatype": self._dtype(),
                             "shape": [-1] if self.output == "label" else [-1, self.classes]}]}

    def _dtype(self) -> str:
        return "INT64" if self.output == "label" else "FP32"

    async def _ledger(self, method, *args, **kwargs):
        try:
            reply = await self.ledger.call.remote(method, *args, **kwargs)
        except Exception as e:  # the ledger replica died: a journaled answer stays charged, nothing else
            raise Refused(503, f"the ledger failed ({type(e).__name__}); retry with the same request id",
                          retry_after=1) from None
        if reply[0] == "refused":
            raise Refused(*reply[1:])
        return reply[1]

    async def _infer(self, request, key):
        name = key_name(self.operator_key, key)
        body, binary = split_binary(await self._body(request), request.headers.get("inference-header-content-length"))
        if not isinstance(body, dict):
            raise Refused(400, 'body: expected a JSON object {"inputs": [...]}')
        rid = request_id(request.headers.get("idempotency-key"), body)
        images = parse_images(body, self.image_shape, binary, self.max_batch)
        binary_out = wants_binary(body, self.output)
        digest = images_digest(images)
        status, stored = await self._ledger("begin", name, rid, len(images), digest)
        if status == "go":
            try:  # in a thread: the replica keeps answering other requests meanwhile
                labels, shown = await asyncio.to_thread(self._predict, images)
            except Exception as e:  # the model failed: nothing charged, retry the same id
                await self._ledger("release", name, rid)
                raise Refused(503, f"the model failed ({type(e).__name__}); retry with the same request id",
                              retry_after=1) from None
            stored = await self._ledger("commit", name, rid, digest, labels, shown, images)
        return self._answer(request, rid, np.asarray(stored, dtype=np.int64 if self.output == "label" else np.float32),
                            binary_out)

    def _answer(self, request, rid: str, data: np.ndarray, binary: bool) -> Response:
        """The infer response: JSON, or a JSON header then little-endian bytes (binary data
        extension); gzip/deflate when ``Accept-Encoding`` asks."""
        tensor = {"name": self.output, "datatype": self._dtype(), "shape": list(data.shape)}
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
        accepted = [e.split(";")[0].strip().lower() for e in request.headers.get("accept-encoding", "").split(",")]
        if "gzip" in accepted:
            content, headers["Content-Encoding"] = gzip.compress(content, compresslevel=1), "gzip"
        elif "deflate" in accepted:
            content, headers["Content-Encoding"] = zlib.compress(content, 1), "deflate"
        return Response(content, headers=headers)

    async def _operator(self, method, parts, request):
        if parts == ["keys"] and method == "POST":
            body = _json(await self._body(request))
            if not isinstance(body, dict) or "name" not in body or "budget" not in body:
                raise Refused(400, 'body: expected {"name", "budget"[, "rate_limit", "burst", "prada_delta"]}')
            settings = {k: body[k] for k in ("budget", "rate_limit", "burst", "prada_delta") if k in body}
            if not isinstance(body["name"], str) or not NAME.match(body["name"]):
                raise Refused(400, f"name: use 1-64 letters, digits, '_' or '-', got {body['name']!r:.60}")
            key = await self._ledger("create_key", body["name"], **settings)
            return JSONResponse({"name": body["name"], "key": key})
        if method != "GET":
            raise Refused(404, f"no endpoint {method} /v2/operator/{'/'.join(parts)[:100]}")
        if parts == ["keys"]:
            return JSONResponse(await self._ledger("usage"))
        if len(parts) == 2 and parts[0] == "keys":
            return JSONResponse(await self._ledger("usage", parts[1]))
        if len(parts) == 3 and parts[0] == "keys" and parts[2] == "prada":
            return JSONResponse(await self._ledger("prada_state", parts[1]))
        if parts == ["audit"]:
            return JSONResponse(await self._ledger("audit", request.query_params.get("key")))
        raise Refused(404, f"no endpoint GET /v2/operator/{'/'.join(parts)[:100]}")


# --------------------------------------------------------------------------- the driver's side

@dataclasses.dataclass(frozen=True)
class TargetService:
    """A running target: ``url`` (the application's base URL), the operator key, the app name."""

    url: str
    operator_key: str
    app: str
    model: str = MODEL_NAME

    def _operator(self):
        from .client import TargetClient

        return TargetClient(self.url, self.operator_key, model=self.model)

    def create_key(self, name: str, *, budget: int, rate_limit: float | None = None, burst: float = 1.0,
                   prada_delta: float | None = None) -> str:
        """An API key for client ``name`` (the same key again for the same name and settings)."""
        body = {"name": name, "budget": budget, "rate_limit": rate_limit, "burst": burst, "prada_delta": prada_delta}
        return self._operator().call("POST", "/v2/operator/keys", body)["key"]

    def usage(self, name: str) -> dict:
        """``{used, reserved, left, requests, prada_flagged_at, budget, ...}`` of client ``name``."""
        return self._operator().call("GET", f"/v2/operator/keys/{name}")


def service_record(checkpoint: str, output: str, decimals: int) -> dict:
    """What a journal is for: the checkpoint's SHA-256 and what the target answers."""
    h = hashlib.sha256()
    with open(checkpoint, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"checkpoint_sha256": h.hexdigest(), "output": output, "decimals": decimals if output == "rounded" else None}


def start_target(checkpoint: str, journal: str, *, operator_key: str | None = None, output: str = "label",
                 decimals: int = 2, replicas: int = 1, host: str = "127.0.0.1", port: int | None = None,
                 app: str | None = None, max_batch: int = DEFAULT_MAX_BATCH,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> TargetService:
    """Serve ``checkpoint`` with its ledger on ``journal``; see the module doc.

    ``operator_key``: the key of whoever runs the service (a new one when None). ``host``/``port``:
    where Serve's HTTP proxy listens when this call starts Serve (an already running Serve keeps
    its own): ``port`` None picks a free port; a port already taken is refused in one line (Serve's
    proxy shares a port with another Serve silently, and requests would reach the other run).
    ``app``: the application name and route prefix (default: from the journal's path, so two runs
    on one cluster do not collide). ``max_batch``: images per request; ``max_body_bytes``: a
    request body, decompressed (both 413 past it). The journal is checked first, so a damaged one
    is one clear error before anything starts.
    """
    from .target import load_checkpoint

    load_checkpoint(checkpoint)  # a missing or unsafe checkpoint: one clear error here
    operator_key = operator_key or new_operator_key()
    app = app or "drmi-target-" + hashlib.sha256(os.path.abspath(journal).encode()).hexdigest()[:10]
    service = service_record(checkpoint, output, decimals)
    check_service(journal, read_journal(journal), service)  # one clear line before Serve starts anything
    if _serve_http_options() is None:  # this call starts Serve
        serve.start(http_options={"host": host, "port": _free_port(host) if port is None else _check_port(host, port)})
    ledger = LedgerReplica.bind(os.path.abspath(journal), operator_key, service)
    ingress = TargetReplica.options(num_replicas=replicas).bind(ledger, os.path.abspath(checkpoint), output,
                                                                decimals, operator_key, max_batch, max_body_bytes)
    serve.run(ingress, name=app, route_prefix=f"/{app}", logging_config={"enable_access_log": False})
    http = _serve_http_options()
    address = ray.util.get_node_ip_address() if http.host in ("0.0.0.0", "::") else http.host
    target = TargetService(url=f"http://{address}:{http.port}/{app}", operator_key=operator_key, app=app)
    _check_reachable(target)
    return target


def _serve_http_options():
    # The running Serve's HTTP address (it may have been started before us, on another port), or
    # None when Serve is not running on this Ray. Ray has no public getter for it in 2.60.
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    return None if client is None else client.http_config


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_port(host: str, port: int) -> int:
    """``port`` when nothing listens on it; ``ValueError`` in one line otherwise (a plain bind,
    without the SO_REUSEPORT that lets Serve's proxies share a port)."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"port {port} on {host} is taken ({e.strerror}; another run's target?): choose a free "
                             "one with --serve-port, or leave --serve-port out to get a free port") from None
    return port


def _check_reachable(target: TargetService, wait_s: float = 15.0) -> None:
    """The proxy at ``target.url`` is this run's (another Serve on the same port answers 404)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with urllib.request.urlopen(f"{target.url}/v2/health/ready", timeout=10):
                return
        except urllib.error.HTTPError as e:
            problem = f"HTTP {e.code}"
        except OSError as e:
            problem = str(e)
        if time.monotonic() > deadline:
            serve.delete(target.app)
            raise RuntimeError(f"the target at {target.url} does not answer ({problem}): another program or run "
                               "holds its port; choose a free one with --serve-port, or leave it out")
        time.sleep(0.2)


def stop_target(service: TargetService) -> None:
    """Delete the application (its ledger closes the journal); Serve itself keeps running."""
    serve.delete(service.app)


def operator_key_file(folder: str) -> str:
    """The operator key kept in ``folder/operator.key`` (owner-only), made on first use: a rerun
    of the same run folder gets the same key, hence the same client keys and stored answers."""
    path = os.path.join(folder, "operator.key")
    os.makedirs(folder, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        with open(path) as f:
            return f.read().strip()
    key = new_operator_key()
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


@contextmanager
def run_target(checkpoint: str, out: str, **options):
    """The target of run folder ``out`` (path or fsspec URL) for the duration of a ``with``.

    Its journal and operator key live in ``{out}/target/`` (for a remote ``out``: in a local
    copy fetched at the start and put back at the end), so a rerun of the same ``out`` resumes:
    the same clients' keys, their spent budgets and stored answers. ``options``: ``start_target``'s.
    """
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    fs, path = fsspec.core.url_to_fs(out)
    local = isinstance(fs, LocalFileSystem)
    folder = os.path.join(path, "target") if local else tempfile.mkdtemp(prefix="drmi-target-")
    if not local and fs.exists(f"{path}/target"):
        fs.get(f"{path}/target/", folder + "/", recursive=True)
    service = start_target(checkpoint, os.path.join(folder, "journal.jsonl"),
                           operator_key=operator_key_file(folder), **options)
    try:
        yield service
    finally:
        stop_target(service)
        if not local:
            fs.put(folder + "/", f"{path}/target", recursive=True)


# --------------------------------------------------------------------------- `drmi serve`

def serve_forever(checkpoint: str, out: str, *, ready=None, host: str = "127.0.0.1", port: int | None = None,
                  output: str = "label", replicas: int = 1) -> None:
    """``drmi serve``: the target alone, on a local Ray started here, until SIGINT or SIGTERM.

    ``checkpoint``: a local target checkpoint. ``out``: a local folder; its ``target/`` holds the
    journal and the operator key (``run_target``), so serving the same folder again resumes every
    key's spent budget and stored answers. ``host``, ``port``, ``output``, ``replicas``:
    ``start_target``'s. ``ready(service)`` is called once the target answers. Every setting is
    checked first (a one-line ValueError naming the flag, before Ray starts); on the signal the
    application is deleted (the ledger closes the journal) and Ray is shut down.
    """
    import signal
    import threading

    from .config import check_checkpoint, check_choice, check_int, check_out
    from .runtime import init_ray

    check_checkpoint("--target", checkpoint)
    if not os.path.isfile(checkpoint):
        raise ValueError(f"--target {checkpoint}: drmi serve reads a local file; copy the checkpoint here first")
    check_choice("--output", output, OUTPUTS)
    check_int("--replicas", replicas, maximum=256)
    check_int("--port", port, minimum=1, maximum=65535, none_ok=True)
    try:
        with socket.socket() as probe:
            probe.bind((host, 0))
    except (OSError, TypeError) as e:
        raise ValueError(f"--host {host!r}: cannot listen there ({getattr(e, 'strerror', None) or e}); give an "
                         "address of this machine, e.g. 127.0.0.1 (default) or 0.0.0.0 (every interface)") from None
    if port is not None:
        try:
            _check_port(host, port)
        except ValueError as e:
            raise ValueError(str(e).replace("--serve-port", "--port")) from None
    if "://" in out:
        raise ValueError(f"--out {out}: drmi serve keeps its journal in a local folder; give a path")
    out = check_out(out)
    started = not ray.is_initialized()
    # a Ray of its own, never one found on this machine; no dashboard UI (another run's may hold its port)
    init_ray("local", include_dashboard=False, log_to_driver=False)
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():  # a second Ctrl-C: give up on the clean stop
            raise KeyboardInterrupt
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with run_target(checkpoint, out, output=output, replicas=replicas, host=host, port=port) as service:
            if ready is not None:
                ready(service)
            while not stop.wait(0.5):
                pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if started:
            ray.shutdown()
