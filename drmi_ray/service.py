"""The target as a metered HTTP service: Ray Serve, Open Inference Protocol, API keys, a ledger.

Two deployments, one Serve application per run folder:

- ``TargetReplica`` (``replicas`` of them): a model replica holding the target checkpoint, and
  the HTTP ingress: it parses requests, checks keys and images, and asks the ledger before
  computing an answer and after it. It holds no state of its own.
- ``LedgerReplica`` (exactly one): ``drmi_ray.ledger.Ledger`` over the run's journal, shared by
  every model replica: keys, budgets, stored answers, PRADA.

The API (Open Inference Protocol v2, as KServe, Triton and MLServer speak it; paths below the
application's base URL ``http://HOST:PORT/<app>``):

- ``POST /v2/models/{model}/infer`` with ``Authorization: Bearer <api key>`` and
  ``Idempotency-Key: <request id>`` (or the body's ``"id"``), body
  ``{"id": rid, "inputs": [{"name": "images", "datatype": "UINT8", "shape": [n, H, W(, C)],
  "data": [... n·H·W(·C) values 0..255, row-major ...]}]}``. Answer (200):
  ``{"model_name", "id", "outputs": [{"name": "label", "datatype": "INT64", "shape": [n],
  "data": [...]}]}`` (or ``"probs"``/``"top1"``/``"rounded"``: ``FP32 [n, classes]``).
  A request id already answered returns the stored answer, not charged again.
  Errors are ``{"error": "<one line>"}``: 400 bad request, 401 bad key, 402 over budget (the
  whole batch refused), 404 unknown model or path, 409 request id reused for other images,
  429 rate limit and 503 a replica failed (both with ``Retry-After`` seconds); a replica killed
  mid-request may also surface as another 5xx or a dropped connection: retry the same id.
- ``GET /v2/health/ready``, ``GET /v2/models/{model}`` (metadata: input shape and datatype).
- Operator endpoints, ``Authorization: Bearer <operator key>`` only (403 for an API key):
  ``POST /v2/operator/keys`` ``{"name", "budget", "rate_limit", "burst", "prada_delta"}`` ->
  ``{"name", "key"}``; ``GET /v2/operator/keys`` (usage of every key), ``GET
  /v2/operator/keys/{name}`` (one key's usage), ``GET /v2/operator/keys/{name}/prada``,
  ``GET /v2/operator/audit[?key=name]``.

No endpoint returns weights, the journal file or another key's records to an API key.

``start_target(checkpoint, journal)`` starts it (Serve's proxy on ``127.0.0.1`` unless told
otherwise) and returns a ``TargetService`` (base URL, model name, operator key);
``stop_target`` deletes the application.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import math
import os
import tempfile
from contextlib import contextmanager

import numpy as np
import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from .runtime import use_cpus
from .ledger import (NAME, Ledger, Refused, check_service, images_digest, key_name, new_operator_key,
                     read_journal)

MODEL_NAME = "target"
OUTPUTS = ("label", "probs", "top1", "rounded")  # what a query answers (see Classifier)
DEFAULT_PORT = 8000  # Serve's own default


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


def parse_images(body: dict, shape: tuple) -> np.ndarray:
    """The uint8 batch in an OIP infer body; ``Refused(400)`` naming what is wrong.

    ``shape``: one image's shape, e.g. ``(28, 28)`` or ``(32, 32, 3)``.
    """
    inputs = body.get("inputs") if isinstance(body, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise Refused(400, 'body: expected {"inputs": [one tensor]} (Open Inference Protocol)')
    tensor = inputs[0]
    if tensor.get("datatype") != "UINT8":
        raise Refused(400, f"inputs[0].datatype: expected UINT8 images, got {tensor.get('datatype')!r}")
    dims = tensor.get("shape")
    if not isinstance(dims, list) or not all(isinstance(d, int) and d >= 0 for d in dims):
        raise Refused(400, f"inputs[0].shape: expected a list of sizes, got {dims!r}")
    if tuple(dims[1:]) != tuple(shape):
        raise Refused(400, f"inputs[0].shape: the target takes [n, {', '.join(map(str, shape))}], got {dims}")
    if dims[0] == 0:
        raise Refused(400, "empty batch: send at least one image")
    try:
        data = np.asarray(tensor.get("data")).reshape(-1)
    except (TypeError, ValueError):
        data = None
    if data is None or (data.size and data.dtype.kind not in "iu"):  # floats, bools, strings, ragged lists
        raise Refused(400, "inputs[0].data: expected whole numbers 0..255")
    if data.size != math.prod(dims):
        raise Refused(400, f"inputs[0].data: {data.size} values for shape {dims} ({math.prod(dims)} expected)")
    if data.size and (data.min() < 0 or data.max() > 255):
        raise Refused(400, "inputs[0].data: values must be 0..255 (uint8)")
    return data.astype(np.uint8).reshape(dims)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100)
class TargetReplica:
    """A model replica and the HTTP ingress (see the module doc): routes, checks, and for a query
    ledger (reserve) -> the model, here -> ledger (journal and charge)."""

    def __init__(self, ledger, checkpoint: str, output: str, decimals: int, operator_key: str):
        from .target import load_checkpoint, load_classifier

        use_cpus()
        ckpt = load_checkpoint(checkpoint)
        size, channels = ckpt["image_size"], ckpt["in_channels"]
        self.image_shape = (size, size) if channels == 1 else (size, size, channels)
        self.classes = ckpt["num_classes"]
        self.model, self.output, self.decimals = load_classifier(checkpoint), output, decimals
        self.ledger, self.operator_key = ledger, operator_key

    def _predict(self, images: np.ndarray):
        """The target's labels and the answer its output kind shows."""
        from .models import predict_proba
        from .prada import round_probs, top1

        probs = predict_proba(self.model, images)
        labels = probs.argmax(axis=1).astype(np.int64)
        shown = {"label": lambda: labels, "probs": lambda: probs, "top1": lambda: top1(probs),
                 "rounded": lambda: round_probs(probs, self.decimals)}[self.output]()
        return labels.tolist(), shown.tolist()

    async def __call__(self, request: Request) -> JSONResponse:
        path = request.url.path[len(request.scope.get("root_path", "")):].rstrip("/")
        key = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        try:
            return await self._route(request, path.split("/")[1:], key)
        except Refused as e:
            return _error(e.status, e.message, e.retry_after)

    async def _route(self, request, parts, key):
        method = request.method
        if parts[:2] == ["v2", "health"]:
            return JSONResponse({"live": True, "ready": True})
        if parts == ["v2"]:
            return JSONResponse({"name": "drmi-target", "version": "2", "extensions": []})
        if parts[:2] == ["v2", "operator"]:
            if not hmac.compare_digest(key.encode(), self.operator_key.encode()):
                raise Refused(403 if key else 401, "operator endpoints need the operator key")
            return await self._operator(method, parts[2:], request)
        if len(parts) >= 3 and parts[:2] == ["v2", "models"]:
            if parts[2] != MODEL_NAME:
                raise Refused(404, f"no model named {parts[2]!r}; this server serves {MODEL_NAME!r}")
            if parts[3:] == [] and method == "GET":
                key_name(self.operator_key, key)
                return JSONResponse(self._metadata())
            if parts[3:] == ["ready"]:
                return JSONResponse({"ready": True})
            if parts[3:] == ["infer"] and method == "POST":
                return await self._infer(request, key)
        raise Refused(404, f"no endpoint {method} /{'/'.join(parts)}")

    def _metadata(self) -> dict:
        return {"name": MODEL_NAME, "versions": [], "platform": "pytorch",
                "inputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, *self.image_shape]}],
                "outputs": [{"name": self.output, "datatype": "INT64" if self.output == "label" else "FP32",
                             "shape": [-1] if self.output == "label" else [-1, self.classes]}]}

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
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise Refused(400, "body: not JSON") from None
        rid = request.headers.get("idempotency-key") or (body.get("id") if isinstance(body, dict) else None)
        images = parse_images(body, self.image_shape)
        digest = images_digest(images)
        status, stored = await self._ledger("begin", name, str(rid or ""), len(images), digest)
        if status == "go":
            try:  # in a thread: the replica keeps answering other requests meanwhile
                labels, shown = await asyncio.to_thread(self._predict, images)
            except Exception as e:  # the model failed: nothing charged, retry the same id
                await self._ledger("release", name, rid)
                raise Refused(503, f"the model failed ({type(e).__name__}); retry with the same request id",
                              retry_after=1) from None
            stored = await self._ledger("commit", name, rid, digest, labels, shown, images)
        data = np.asarray(stored)
        dtype = "INT64" if self.output == "label" else "FP32"
        return JSONResponse({"model_name": MODEL_NAME, "id": rid, "outputs": [
            {"name": self.output, "datatype": dtype, "shape": list(data.shape), "data": data.reshape(-1).tolist()}]})

    async def _operator(self, method, parts, request):
        if parts == ["keys"] and method == "POST":
            try:
                body = json.loads(await request.body())
            except ValueError:
                raise Refused(400, "body: not JSON") from None
            if not isinstance(body, dict) or "name" not in body or "budget" not in body:
                raise Refused(400, 'body: expected {"name", "budget"[, "rate_limit", "burst", "prada_delta"]}')
            settings = {k: body[k] for k in ("budget", "rate_limit", "burst", "prada_delta") if k in body}
            if not isinstance(body["name"], str) or not NAME.match(body["name"]):
                raise Refused(400, f"name: use 1-64 letters, digits, '_' or '-', got {body['name']!r}")
            key = await self._ledger("create_key", body["name"], **settings)
            return JSONResponse({"name": body["name"], "key": key})
        if method != "GET":
            raise Refused(404, f"no endpoint {method} /v2/operator/{'/'.join(parts)}")
        if parts == ["keys"]:
            return JSONResponse(await self._ledger("usage"))
        if len(parts) == 2 and parts[0] == "keys":
            return JSONResponse(await self._ledger("usage", parts[1]))
        if len(parts) == 3 and parts[0] == "keys" and parts[2] == "prada":
            return JSONResponse(await self._ledger("prada_state", parts[1]))
        if parts == ["audit"]:
            return JSONResponse(await self._ledger("audit", request.query_params.get("key")))
        raise Refused(404, f"no endpoint GET /v2/operator/{'/'.join(parts)}")


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
                 decimals: int = 2, replicas: int = 1, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 app: str | None = None) -> TargetService:
    """Serve ``checkpoint`` with its ledger on ``journal``; see the module doc.

    ``operator_key``: the key of whoever runs the service (a new one when None). ``host``/``port``:
    where Serve's HTTP proxy listens when this call starts Serve (an already running Serve keeps
    its own). ``app``: the application name and route prefix (default: from the journal's path,
    so two runs on one cluster do not collide). The journal is checked first, so a damaged one is
    one clear error before anything starts.
    """
    from .target import load_checkpoint

    load_checkpoint(checkpoint)  # a missing or unsafe checkpoint: one clear error here
    operator_key = operator_key or new_operator_key()
    app = app or "drmi-target-" + hashlib.sha256(os.path.abspath(journal).encode()).hexdigest()[:10]
    service = service_record(checkpoint, output, decimals)
    check_service(journal, read_journal(journal), service)  # one clear line before Serve starts anything
    serve.start(http_options={"host": host, "port": port})
    ledger = LedgerReplica.bind(os.path.abspath(journal), operator_key, service)
    ingress = TargetReplica.options(num_replicas=replicas).bind(ledger, os.path.abspath(checkpoint), output,
                                                                decimals, operator_key)
    serve.run(ingress, name=app, route_prefix=f"/{app}", logging_config={"enable_access_log": False})
    http = _serve_http_options()
    address = ray.util.get_node_ip_address() if http.host in ("0.0.0.0", "::") else http.host
    return TargetService(url=f"http://{address}:{http.port}/{app}", operator_key=operator_key, app=app)


def _serve_http_options():
    # The running Serve's HTTP address (it may have been started before us, on another port).
    # Ray has no public getter for it in 2.60.
    from ray.serve.context import _get_global_client

    return _get_global_client().http_config


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
