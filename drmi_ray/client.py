"""The attacker's whole view of the target: a small HTTP client for the Open Inference Protocol.

``TargetClient(url, key)`` talks to any image classifier that speaks OIP v2
(``POST {url}/v2/models/{model}/infer``: KServe, Triton, MLServer, or ``drmi_ray.service``),
sending the API key as ``Authorization: Bearer`` and a request id as ``Idempotency-Key`` (and as
the body's ``id``). Standard library only (and numpy): no Ray, no torch; it connects directly
(``http.client``: no HTTP proxy is read from the environment).

    client = TargetClient("http://127.0.0.1:8000/drmi-target-1a2b", key, prefix="random-50-0")
    labels = client.query(images)          # uint8 (n, H, W[, C]) -> int64 (n,) or float32 (n, C)
    client.answered                        # images answered so far (what the endpoint charged)

**The contract.** ``contract()`` reads the model's metadata (``GET {url}/v2/models/{model}``, with
the key) once: the input's name, datatype and shape, and the output to ask for (the model's only
listed output; None when it lists none or several). ``input_name``, ``datatype``, ``shape`` (one
image's shape, without the batch dim) and ``output`` given to the client win over the metadata;
with all four given the metadata is never read. A metadata shape must be ``[-1 or batch, dims...]``
with fixed image dims. A 404 (no such model) or any other failure is one ``TargetError`` line.

**Requests.** ``infer`` checks the images (``images.check_images``), then maps each image to the
model's per-image shape: as it is; CHW for an ``(H, W, C)`` image and a shape ``[C, H, W]``; else
reshaped when the number of values agrees (``[784]``, ``[1, 28, 28]``); else a one-line
``ValueError``. UINT8/UINT16/UINT32/UINT64/INT16/INT32/INT64 inputs get the pixel values 0..255,
FP16/FP32/FP64 inputs get value/255 (0..1); any other datatype (BYTES, BOOL, INT8) is a one-line
``ValueError``. The request names the output (``"outputs": [{"name": ...}]``) when one is known.

**Answers** (``as_answers``): the requested output, else the reply's only one (several: a line
listing them, pass ``--target-output``). Integer labels ``[n]`` or ``[n, 1]`` -> int64 ``(n,)``;
float score rows ``[n, C]``, ``C >= 2`` -> float32 ``(n, C)``; float ``[n]``/``[n, 1]`` holding
whole numbers -> int64 labels. Anything else (BYTES, BOOL, integer ``[n, C>1]``, another n, NaN,
negative labels) is a one-line ``TargetError``: an answer is never guessed at. JSON replies and
binary-tensor replies (``Inference-Header-Content-Length``) are read. ``labels_of(answer)`` turns
an answer into int64 labels (the argmax of score rows only).

**Request ids.** ``query`` numbers its requests ``{prefix}-0``, ``{prefix}-1``, ...: a run that
asks the same images in the same order again (a rerun, a retry) gets the stored answers and is not
charged twice by a server that keeps them (ours does). ``infer(images, request_id)`` sends one.

**Retries**, always with the same request id: 429, 502, 503, 504 and any answer with a
``Retry-After`` header wait that many seconds (1 s without one), for at most ``retry_for`` seconds;
a connection dropped mid-request or timed out (``timeout``) backs off and retries, also within
``retry_for``. A server that cannot be reached at all (refused, unknown host, no connection within
``connect_timeout``) is retried for at most ``connect_timeout`` seconds (10 by default), then one
``TargetError`` line. Every other status fails at once: 402 raises ``QueryBudgetExceeded``, the
rest ``TargetError`` with the server's one-line reason (a 500 is not retried).
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import math
import time
import urllib.parse

import numpy as np

from .images import check_images

WHOLE = {"UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
         "INT16": np.int16, "INT32": np.int32, "INT64": np.int64}  # input datatypes that take 0..255
SCALED = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}  # input datatypes that take 0..1
LABELS = {*WHOLE, "INT8"}  # output datatypes read as labels
SCORES = set(SCALED)  # output datatypes read as scores (or whole-number labels)
BINARY = {"BOOL": "?", "INT8": "<i1", **{k: np.dtype(v).newbyteorder("<") for k, v in {**WHOLE, **SCALED}.items()}}
RETRIED = (429, 502, 503, 504)


class TargetError(RuntimeError):
    """The target refused a request, or answered what is not labels (``status``: the HTTP
    status; 0 when nothing answered)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"target answered HTTP {status}: {message}" if status else f"target: {message}")
        self.status, self.message = status, message


class QueryBudgetExceeded(TargetError):
    """HTTP 402: the batch would pass the key's budget; nothing was answered or charged."""


@dataclasses.dataclass(frozen=True)
class Contract:
    """What the model takes and what to ask it for: the input's ``name`` and ``datatype``, one
    image's ``shape`` (no batch dim), and the ``output`` to request (None: whatever it answers)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    output: str | None


class TargetClient:
    def __init__(self, url: str, key: str, *, model: str = "target", prefix: str = "q", timeout: float = 120.0,
                 retry_for: float = 120.0, max_batch: int | None = None, input_name: str | None = None,
                 datatype: str | None = None, shape=None, output: str | None = None,
                 connect_timeout: float = 10.0):
        self.url, self.key, self.model, self.prefix = url.rstrip("/"), key, model, prefix
        self.timeout, self.retry_for, self.connect_timeout = timeout, retry_for, connect_timeout
        self.max_batch = max_batch  # query() sends at most this many images a request (a rate limit's burst)
        self.given = {"name": input_name, "datatype": datatype, "shape": None if shape is None else tuple(shape),
                      "output": output}  # what the caller fixed; the rest comes from the metadata
        self.requests = 0  # requests sent by query(): the next request id's number
        self.answered = 0  # images answered by infer() (a re-asked request id counts again)
        self._contract: Contract | None = None

    # ------------------------------------------------------------------ the contract

    def metadata(self) -> dict:
        """The model's metadata, as the server sends it."""
        return self.call("GET", f"/v2/models/{self.model}")

    def contract(self) -> Contract:
        """The input's name, datatype and per-image shape and the output to ask for (read once)."""
        if self._contract is None:
            given = self.given
            meta = {} if None not in given.values() else self._read_metadata()
            tensor = _the_input(meta.get("inputs"), given["name"], self.model) if None in (
                given["name"], given["datatype"], given["shape"]) else {}
            name, datatype = given["name"] or tensor.get("name"), given["datatype"] or tensor.get("datatype")
            shape = given["shape"] or _image_shape(tensor.get("shape"), self.model)
            if not isinstance(name, str) or not isinstance(datatype, str):
                raise TargetError(200, f"model {self.model!r}: its metadata gives no input name or datatype; pass "
                                       "--target-input and --target-datatype")
            outputs = meta.get("outputs")
            listed = [o.get("name") for o in outputs if isinstance(o, dict)] if isinstance(outputs, list) else []
            output = given["output"] or (listed[0] if len(listed) == 1 and isinstance(listed[0], str) else None)
            self._contract = Contract(name, datatype.upper(), tuple(int(d) for d in shape), output)
        return self._contract

    def _read_metadata(self) -> dict:
        try:
            meta = self.metadata()
        except TargetError as e:
            if e.status == 404:
                raise TargetError(404, f"no model {self.model!r} at {self.url} ({e.message}); pass --target-model "
                                       "with the name the server lists") from None
            raise TargetError(e.status, f"cannot read model {self.model!r}'s metadata at {self.url}: {e.message}") \
                from None
        if not isinstance(meta, dict):
            raise TargetError(200, f"model {self.model!r}: its metadata is not a JSON object")
        return meta

    # ------------------------------------------------------------------ requests

    def request_body(self, images: np.ndarray, request_id: str) -> dict:
        """The infer request for uint8 ``images`` under the contract (see the module doc)."""
        c = self.contract()
        n, image = len(images), images.shape[1:]
        if len(image) == 3 and c.shape == (image[2], image[0], image[1]) and image[2] > 1:
            x = images.transpose(0, 3, 1, 2)  # HWC -> CHW
        elif math.prod(image) == math.prod(c.shape):
            x = images.reshape(n, *c.shape)
        else:
            raise ValueError(f"images: the pool's images are {list(image)} ({math.prod(image)} values) but model "
                             f"{self.model!r} takes {c.name!r} of shape {list(c.shape)} per image "
                             f"({math.prod(c.shape)} values); pass --target-shape if the metadata is wrong, "
                             "or resize the pool to the model's input")
        if c.datatype in WHOLE:
            data = x.reshape(-1).tolist()
        elif c.datatype in SCALED:
            data = (x.reshape(-1) / 255.0).tolist()
        else:
            raise ValueError(f"unsupported input datatype {c.datatype!r} for model {self.model!r} input {c.name!r}: "
                             "this client sends images as UINT8..UINT64/INT16..INT64 pixel values 0..255 or "
                             "FP16/FP32/FP64 values in 0..1; pass --target-datatype if the metadata is wrong")
        body = {"id": request_id, "inputs": [{"name": c.name, "datatype": c.datatype, "shape": [n, *c.shape],
                                              "data": data}]}
        if c.output is not None:
            body["outputs"] = [{"name": c.output}]
        return body

    def infer(self, images: np.ndarray, request_id: str) -> np.ndarray:
        """One request: labels int64 ``(n,)`` or score rows float32 ``(n, C)`` (see ``as_answers``)."""
        images = check_images(images, min_count=1)
        body = self.request_body(images, request_id)
        reply = self.call("POST", f"/v2/models/{self.model}/infer", body, {"Idempotency-Key": request_id})
        answer = as_answers(reply.get("outputs") if isinstance(reply, dict) else None, len(images),
                            self.contract().output)
        self.answered += len(images)
        return answer

    def query(self, images: np.ndarray) -> np.ndarray:
        """``infer`` with the next request id of this client (see the module doc); a batch above
        ``max_batch`` goes as several requests, each with its own id."""
        step = self.max_batch or max(len(images), 1)
        answers = []
        for start in range(0, max(len(images), 1), step):
            answers.append(self.infer(images[start:start + step], f"{self.prefix}-{self.requests}"))
            self.requests += 1
        return np.concatenate(answers)

    # ------------------------------------------------------------------ HTTP

    def call(self, method: str, path: str, body: dict | None = None, headers: dict | None = None):
        """One JSON request to ``{url}{path}``, retried as the module doc says; the parsed answer."""
        start, backoff, unreachable_since = time.monotonic(), 0.5, None
        while True:
            tried = time.monotonic()
            try:
                status, reply_headers, reply = self._send(method, path, body, headers)
            except _Unreachable as e:
                unreachable_since = unreachable_since or tried
                wait, backoff = backoff, min(backoff * 2, 5.0)
                if time.monotonic() + wait - unreachable_since > self.connect_timeout:
                    raise TargetError(0, f"no answer from {self.url} for {time.monotonic() - unreachable_since:.0f} s "
                                         f"({e.reason}); check the URL and that the server is up") from None
            except (OSError, http.client.HTTPException) as e:  # dropped mid-request: retry the same id
                unreachable_since = None
                wait, backoff = backoff, min(backoff * 2, 5.0)
                if time.monotonic() + wait - start > self.retry_for:
                    raise TargetError(0, f"no answer from {self.url} for {self.retry_for:.0f} s: "
                                         f"{_one_line(e) or type(e).__name__}") from None
            else:
                if 200 <= status < 300:
                    return reply
                unreachable_since, message = None, _error_message(reply, status)
                retry_after = reply_headers.get("Retry-After")
                if (status not in RETRIED and retry_after is None) or time.monotonic() - start > self.retry_for:
                    raise (QueryBudgetExceeded if status == 402 else TargetError)(status, message)
                wait = _seconds(retry_after)
            time.sleep(max(0.0, min(wait, start + self.retry_for - time.monotonic()) + 0.01))

    def _send(self, method: str, path: str, body: dict | None, headers: dict | None):
        """One try: ``(status, headers, parsed reply)``; ``_Unreachable`` when no connection was made."""
        url = urllib.parse.urlsplit(f"{self.url}{path}")
        kind = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        connection = kind(url.netloc, timeout=min(self.connect_timeout, self.timeout))
        try:
            try:
                connection.connect()
            except OSError as e:
                raise _Unreachable(_one_line(e) or type(e).__name__) from None
            connection.sock.settimeout(self.timeout)
            connection.request(method, url.path + (f"?{url.query}" if url.query else ""),
                               body=None if body is None else json.dumps(body).encode(),
                               headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json",
                                        **(headers or {})})
            response = connection.getresponse()
            return response.status, response.headers, _parse(response.read(),
                                                              response.headers.get("Inference-Header-Content-Length"))
        finally:
            connection.close()


# ---------------------------------------------------------------------- answers

def as_answers(outputs, n: int, wanted: str | None = None) -> np.ndarray:
    """An infer reply's ``outputs`` as the answers for ``n`` images: int64 labels ``(n,)`` or
    float32 score rows ``(n, C)``; a one-line ``TargetError`` for anything else (module doc)."""
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, dict) for o in outputs):
        raise TargetError(200, "the reply has no outputs list")
    names = [o.get("name") for o in outputs]
    if wanted is not None:
        if wanted not in names:
            raise TargetError(200, f"the reply has no output {wanted!r}, only {names}; pass --target-output NAME")
        out = outputs[names.index(wanted)]
    elif len(outputs) == 1:
        out = outputs[0]
    else:
        raise TargetError(200, f"the reply has {len(outputs)} outputs ({', '.join(map(str, names))}); pass "
                               "--target-output NAME to say which holds the labels or scores")
    datatype, shape = out.get("datatype"), out.get("shape")
    what = f"output {out.get('name')!r} ({datatype} {shape})"
    if datatype not in LABELS | SCORES:
        raise TargetError(200, f"{what} is not labels or scores; pass --target-output with the model's label or "
                               "probability output")
    try:
        answer = np.asarray(out["data"], dtype=np.int64 if datatype in LABELS else np.float64).reshape(shape)
    except (KeyError, TypeError, ValueError, OverflowError):
        raise TargetError(200, f"{what}: its data do not fill its shape with numbers") from None
    if answer.ndim == 2 and answer.shape[1] == 1:
        answer = answer[:, 0]
    if answer.ndim not in (1, 2) or len(answer) != n:
        raise TargetError(200, f"{what}: expected labels [{n}] or score rows [{n}, classes] for {n} images")
    if datatype in SCORES:
        if not np.isfinite(answer).all():
            raise TargetError(200, f"{what}: the scores hold NaN or infinity")
        if answer.ndim == 2:
            return answer.astype(np.float32)
        if (answer != np.round(answer)).any():
            raise TargetError(200, f"{what}: one float per image that is not a whole number is neither a label "
                                   "nor a score row; pass --target-output with the label or probability output")
        answer = answer.astype(np.int64)
    if answer.ndim == 2:
        raise TargetError(200, f"{what}: integer rows are not labels (one per image) nor scores; pass "
                               "--target-output with the label or probability output")
    if (answer < 0).any():
        raise TargetError(200, f"{what}: negative labels ({answer.min()})")
    return answer


def labels_of(answer, n: int | None = None) -> np.ndarray:
    """int64 labels ``(n,)`` from an answer: integer labels ``(n,)`` as they are, float score rows
    ``(n, C)`` (C >= 2) by their argmax; a one-line ``ValueError`` for anything else."""
    a = np.asarray(answer)
    if a.ndim == 1 and a.dtype.kind in "iu":
        labels = a.astype(np.int64)
    elif a.ndim == 2 and a.dtype.kind == "f" and a.shape[1] >= 2 and np.isfinite(a).all():
        labels = a.argmax(axis=1).astype(np.int64)
    else:
        raise ValueError(f"an answer must be integer labels (n,) or finite float score rows (n, classes >= 2); "
                         f"got {a.dtype} shape {a.shape}")
    if n is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} answers for {n} images; the target must return one label per image")
    return labels


# ---------------------------------------------------------------------- helpers

class _Unreachable(Exception):
    """No connection to the server at all (refused, unknown host, connect timeout)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _the_input(inputs, name: str | None, model: str) -> dict:
    """The metadata entry of the images' input: the one named ``name``, else the only one."""
    listed = [t for t in inputs if isinstance(t, dict)] if isinstance(inputs, list) else []
    names = [t.get("name") for t in listed]
    if not listed:
        raise TargetError(200, f"model {model!r}: its metadata lists no inputs; pass --target-input, "
                               "--target-datatype and --target-shape")
    if name is None and len(listed) == 1:
        return listed[0]
    if name in names:
        return listed[names.index(name)]
    raise TargetError(200, f"model {model!r} has {'no input ' + repr(name) + ', only' if name else 'several inputs:'} "
                           f"{', '.join(map(str, names))}; pass --target-input with the images' one")


def _image_shape(shape, model: str) -> tuple[int, ...]:
    """One image's shape: the metadata's input shape without its leading batch dim."""
    if not isinstance(shape, list) or len(shape) < 2 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape[1:]):
        raise TargetError(200, f"model {model!r}: its metadata's input shape {shape!r:.80} is not [batch, fixed "
                               "image dims...]; pass --target-shape with one image's shape, like 784 or 1,28,28")
    return tuple(shape[1:])


def _parse(raw: bytes, header_length: str | None):
    """A reply body: JSON, or (binary tensor data) a JSON header then each output's raw bytes."""
    try:
        if header_length is None:
            return json.loads(raw) if raw else {}
        reply, at = json.loads(raw[:int(header_length)]), int(header_length)
        for out in reply.get("outputs", []):
            size = (out.get("parameters") or {}).get("binary_data_size")
            if size is not None and out.get("datatype") in BINARY:
                out["data"] = np.frombuffer(raw[at:at + size], dtype=BINARY[out["datatype"]])
            at += size or 0
        return reply
    except (ValueError, TypeError, AttributeError):
        return {"error": f"an answer that is not OIP JSON: {raw[:80]!r}"}


def _error_message(reply, status: int) -> str:
    error = reply.get("error") if isinstance(reply, dict) else None
    return _one_line(error) or http.client.responses.get(status, "no reason given")


def _one_line(text) -> str:
    return " ".join(str(text or "").split())[:300]


def _seconds(retry_after: str | None) -> float:
    try:
        return max(0.0, float(retry_after))
    except (TypeError, ValueError):  # absent, or an HTTP date
        return 1.0
