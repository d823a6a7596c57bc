"""The target service's Serve deployments: the model replicas, which are also the HTTP ingress, and the ledger.

- ``TargetReplica`` (``replicas`` of them): a model replica holding the target checkpoint, and
  the HTTP ingress (``app``, a FastAPI app, one route per endpoint): it checks keys and images,
  and asks the ledger before computing an answer and after it. It holds no state of its own.
- ``LedgerReplica`` (exactly one): ``drmi_ray.ledger.Ledger`` over the run's journal, shared by
  every model replica: keys, budgets, stored answers, PRADA.

``drmi_ray.service.start_target`` binds them into one Serve application per run folder.

The API (Open Inference Protocol v2; paths below the application's base URL
``http://HOST:PORT/<app>``; every ``/v2/models/target/...`` path also as
``/v2/models/target/versions/1/...``):

- ``POST /v2/models/{model}/infer`` with ``Authorization: Bearer <api key>``: the request, its
  answer, the binary and gzip forms and request ids are ``drmi_ray.service_protocol``'s doc.
  **Limits**: a body over ``max_body_bytes`` (default 128 MiB, decompressed) or a batch over
  ``max_batch`` images (default 4096) is refused with 413 before the model runs; so is a batch
  larger than the key's rate-limit burst (it could never pass; see ``ledger``).
- ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2`` (server metadata),
  ``GET /v2/models/{model}`` (metadata, with the API key: input name, shape and datatype, the
  output), ``GET /v2/models/{model}/ready``.
- Operator endpoints, ``Authorization: Bearer <operator key>`` only (403 for an API key):
  ``POST /v2/operator/keys`` ``{"name", "budget", "rate_limit", "burst", "prada_delta"}`` ->
  ``{"name", "key"}``; ``GET /v2/operator/keys`` (usage of every key), ``GET
  /v2/operator/keys/{name}`` (one key's usage), ``GET /v2/operator/keys/{name}/prada``,
  ``GET /v2/operator/audit[?key=name]``.

Errors are ``{"error": "<one line>"}``, always JSON: 400 malformed request (bad JSON, JSON
nested too deep, a bad shape, datatype, name or id...), 401 bad key, 402 over budget (the whole
batch refused), 404 unknown model, version or path, 409 request id reused for other images, 413
too large, 429 rate limit and 503 a replica failed (both with ``Retry-After`` seconds), 500 a
bug. A replica killed mid-request may also surface as another 5xx or a dropped connection:
retry the same id. No endpoint returns weights, the journal file or another key's records to an
API key.
"""

# No ``from __future__ import annotations`` here: FastAPI reads each route's ``request: Request`` at
# run time, in the replica, from Serve's pickled copy of the class, whose globals lack ``Request``;
# a string annotation there makes it a required query parameter (a 422 on every call).
import asyncio
import hmac
import math

import numpy as np
from fastapi import Depends, FastAPI
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .ledger import NAME, Ledger, Refused, images_digest, key_name
from .runtime import use_cpus
from .service_protocol import (MODEL_NAME, MODEL_VERSION, decode_body, encode_answer, model_metadata, parse_images,
                               read_json, request_id, shown_answer, split_binary, wants_binary)


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


# The routes that take every method: health, server metadata, a model's readiness (as the API always
# has), and the 404s below /v2/models and /v2/operator (a wrong model, version or key is named first).
ANY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"]

# No docs or OpenAPI pages (they would be paths this API does not have), no slash redirects
# (``_ApiPaths`` drops trailing slashes), and no pydantic bodies: handlers read the raw request, so
# FastAPI's own 422 can never answer.
app = FastAPI(redirect_slashes=False, openapi_url=None, docs_url=None, redoc_url=None)


class _ApiPaths:
    """ASGI middleware: a path's trailing slashes dropped (``/v2/health/live/`` is
    ``/v2/health/live``), and a bug answered as one JSON 500 line, never Starlette's text page."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope, started = {**scope, "path": scope["path"].rstrip("/")}, False

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception as e:  # a bug, not the request
            if started:
                raise
            await _error(500, f"internal error ({type(e).__name__}); nothing was charged unless answered")(
                scope, receive, send)


app.add_middleware(_ApiPaths)


@app.exception_handler(Refused)
async def _refused(request: Request, e: Refused) -> JSONResponse:
    return _error(e.status, e.message, e.retry_after)


@app.exception_handler(StarletteHTTPException)
async def _no_route(request: Request, e: StarletteHTTPException) -> JSONResponse:
    # The router's only HTTP errors: 404 (no such path) and 405 (a method no route takes).
    return _error(404, _no_endpoint(request))


def _api_path(request: Request) -> str:
    """The path below the application's base URL, trailing slashes dropped (``_ApiPaths``)."""
    return request.url.path[len(request.scope.get("root_path", "")):]


def _no_endpoint(request: Request) -> str:
    return f"no endpoint {request.method} /{_api_path(request)[1:][:100]}"


def _bearer(request: Request) -> str:
    return request.headers.get("authorization", "").removeprefix("Bearer ").strip()


def target_model(model: str) -> None:
    """404 unless ``model`` is the served model (a path's ``{model}``)."""
    if model != MODEL_NAME:
        raise Refused(404, f"no model named {model!r:.60}; this server serves {MODEL_NAME!r}")


def target_version(version: str) -> None:
    """404 unless ``version`` is the served model's (a path's ``{version}``)."""
    if version != MODEL_VERSION:
        raise Refused(404, f"no version {version!r:.60} of model {MODEL_NAME!r}; it has version {MODEL_VERSION!r}")


CHECK_MODEL = [Depends(target_model)]
CHECK_MODEL_AND_VERSION = [Depends(target_model), Depends(target_version)]


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100)
@serve.ingress(app)
class TargetReplica:
    """A model replica and the HTTP ingress (see the module doc): FastAPI routes, checks, and for a
    query ledger (reserve) -> the model, here -> ledger (journal and charge)."""

    def __init__(self, ledger, checkpoint: str, output: str, decimals: int, operator_key: str, max_batch: int,
                 max_body_bytes: int):
        from .target import load_checkpoint, load_classifier  # torch: in the replica, not in every importer

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
        from .models import predict_proba  # torch: as in __init__

        return shown_answer(predict_proba(self.model, images), self.output, self.decimals)

    @app.api_route("/v2/health/live", methods=ANY_METHOD)
    async def live(self):
        return JSONResponse({"live": True})

    @app.api_route("/v2/health/ready", methods=ANY_METHOD)
    async def ready(self):
        return JSONResponse({"ready": True})

    @app.api_route("/v2", methods=ANY_METHOD)
    async def server_metadata(self):
        return JSONResponse({"name": "drmi-target", "version": "2", "extensions": ["binary_tensor_data"]})

    @app.get("/v2/models/{model}", dependencies=CHECK_MODEL)
    @app.get("/v2/models/{model}/versions/{version}", dependencies=CHECK_MODEL_AND_VERSION)
    async def metadata(self, request: Request):
        key_name(self.operator_key, _bearer(request))
        return JSONResponse(model_metadata(self.image_shape, self.output, self.classes))

    @app.api_route("/v2/models/{model}/ready", methods=ANY_METHOD, dependencies=CHECK_MODEL)
    @app.api_route("/v2/models/{model}/versions/{version}/ready", methods=ANY_METHOD,
                   dependencies=CHECK_MODEL_AND_VERSION)
    async def model_ready(self):
        return JSONResponse({"ready": True})

    @app.post("/v2/models/{model}/infer", dependencies=CHECK_MODEL)
    @app.post("/v2/models/{model}/versions/{version}/infer", dependencies=CHECK_MODEL_AND_VERSION)
    async def infer(self, request: Request):
        name = key_name(self.operator_key, _bearer(request))
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
        content, headers = encode_answer(rid, self.output, stored, binary_out,
                                         request.headers.get("accept-encoding", ""))
        return Response(content, headers=headers)

    @app.api_route("/v2/models/{rest:path}", methods=ANY_METHOD)
    async def no_model_endpoint(self, request: Request, rest: str):
        """404 for the rest of ``/v2/models/``, naming a wrong model or version first."""
        model, *below = rest.split("/")
        target_model(model)
        if below[:1] == ["versions"] and len(below) >= 2:
            target_version(below[1])
        raise Refused(404, _no_endpoint(request))

    @app.post("/v2/operator/keys")
    async def create_key(self, request: Request):
        self._check_operator_key(request)
        body = read_json(await self._body(request))
        if not isinstance(body, dict) or "name" not in body or "budget" not in body:
            raise Refused(400, 'body: expected {"name", "budget"[, "rate_limit", "burst", "prada_delta"]}')
        settings = {k: body[k] for k in ("budget", "rate_limit", "burst", "prada_delta") if k in body}
        if not isinstance(body["name"], str) or not NAME.match(body["name"]):
            raise Refused(400, f"name: use 1-64 letters, digits, '_' or '-', got {body['name']!r:.60}")
        key = await self._ledger("create_key", body["name"], **settings)
        return JSONResponse({"name": body["name"], "key": key})

    @app.get("/v2/operator/keys")
    async def usage_of_every_key(self, request: Request):
        self._check_operator_key(request)
        return JSONResponse(await self._ledger("usage"))

    @app.get("/v2/operator/keys/{name}")
    async def usage(self, request: Request, name: str):
        self._check_operator_key(request)
        return JSONResponse(await self._ledger("usage", name))

    @app.get("/v2/operator/keys/{name}/prada")
    async def prada_state(self, request: Request, name: str):
        self._check_operator_key(request)
        return JSONResponse(await self._ledger("prada_state", name))

    @app.get("/v2/operator/audit")
    async def audit(self, request: Request):
        self._check_operator_key(request)
        return JSONResponse(await self._ledger("audit", request.query_params.get("key")))

    @app.api_route("/v2/operator", methods=ANY_METHOD)
    @app.api_route("/v2/operator/{rest:path}", methods=ANY_METHOD)
    async def no_operator_endpoint(self, request: Request):
        """404 for the rest of ``/v2/operator/``, after the operator key's check."""
        self._check_operator_key(request)
        rest = _api_path(request)[len("/v2/operator/"):]
        raise Refused(404, f"no endpoint {request.method} /v2/operator/{rest[:100]}")

    def _check_operator_key(self, request: Request) -> None:
        """401 without a key, 403 for any key but the operator's."""
        key = _bearer(request)
        if not hmac.compare_digest(key.encode(), self.operator_key.encode()):
            raise Refused(403 if key else 401, "operator endpoints need the operator key")

    async def _body(self, request: Request) -> bytes:
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

    async def _ledger(self, method, *args, **kwargs):
        try:
            reply = await self.ledger.call.remote(method, *args, **kwargs)
        except Exception as e:  # the ledger replica died: a journaled answer stays charged, nothing else
            raise Refused(503, f"the ledger failed ({type(e).__name__}); retry with the same request id",
                          retry_after=1) from None
        if reply[0] == "refused":
            raise Refused(*reply[1:])
        return reply[1]
