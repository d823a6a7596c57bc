"""The target service's Serve deployments: the model replicas, which are also the HTTP ingress, and the ledger.

- ``TargetReplica`` (``replicas`` of them): a model replica holding the target checkpoint, and
  the HTTP ingress: it routes requests, checks keys and images, and asks the ledger before
  computing an answer and after it. It holds no state of its own.
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

from __future__ import annotations

import asyncio
import hmac
import math

import numpy as np
from ray import serve
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


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100)
class TargetReplica:
    """A model replica and the HTTP ingress (see the module doc): routes, checks, and for a query
    ledger (reserve) -> the model, here -> ledger (journal and charge)."""

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
                return JSONResponse(model_metadata(self.image_shape, self.output, self.classes))
            if rest == ["ready"]:
                return JSONResponse({"ready": True})
            if rest == ["infer"] and method == "POST":
                return await self._infer(request, key)
        raise Refused(404, f"no endpoint {method} /{'/'.join(parts)[:100]}")

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
        content, headers = encode_answer(rid, self.output, stored, binary_out,
                                         request.headers.get("accept-encoding", ""))
        return Response(content, headers=headers)

    async def _operator(self, method, parts, request):
        if parts == ["keys"] and method == "POST":
            body = read_json(await self._body(request))
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
