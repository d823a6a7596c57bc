"""The attacker's whole view of the target: a small HTTP client for the Open Inference Protocol.

``TargetClient(url, key)`` talks to any image classifier that speaks OIP v2
(``POST {url}/v2/models/{model}/infer``: KServe, Triton, MLServer, or ``drmi_ray.service``),
sending the API key as ``Authorization: Bearer`` and a request id as ``Idempotency-Key`` (and as
the body's ``id``). Standard library only: no Ray, no torch.

    client = TargetClient("http://127.0.0.1:8000/drmi-target-1a2b", key, prefix="random-50-0")
    labels = client.query(images)          # uint8 (n, H, W[, C]) -> int64 (n,) or float32 (n, C)

``query`` numbers its requests ``{prefix}-0``, ``{prefix}-1``, ...: a run that asks the same
images in the same order again (a rerun, a retry) gets the stored answers and is not charged
twice. ``infer(images, request_id)`` sends one request. Retries: 429 and 5xx wait their
``Retry-After`` (1 s without one), a dropped connection backs off, all with the same request id
(safe: the server answers a request id once), for at most
``retry_for`` seconds. 402 raises ``QueryBudgetExceeded``; any other refusal ``TargetError`` with
the server's one-line reason.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import numpy as np

from .images import check_images


class TargetError(RuntimeError):
    """The target refused a request (``status``: the HTTP status)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"target answered HTTP {status}: {message}")
        self.status, self.message = status, message


class QueryBudgetExceeded(TargetError):
    """HTTP 402: the batch would pass the key's budget; nothing was answered or charged."""


class TargetClient:
    def __init__(self, url: str, key: str, *, model: str = "target", prefix: str = "q", timeout: float = 120.0,
                 retry_for: float = 120.0, max_batch: int | None = None):
        self.url, self.key, self.model, self.prefix = url.rstrip("/"), key, model, prefix
        self.timeout, self.retry_for = timeout, retry_for
        self.max_batch = max_batch  # query() sends at most this many images a request (a rate limit's burst)
        self.requests = 0  # requests sent by query(): the next request id's number

    def _send(self, method: str, path: str, body: dict | None = None, headers: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method, headers={
            "Authorization": f"Bearer {self.key}", "Content-Type": "application/json", **(headers or {})})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read())

    def metadata(self) -> dict:
        """The model's metadata (``inputs[0].shape``: ``[-1, H, W(, C)]``)."""
        return self.call("GET", f"/v2/models/{self.model}")

    def infer(self, images: np.ndarray, request_id: str) -> np.ndarray:
        """One request: labels int64 ``(n,)`` or probability rows float32 ``(n, C)``."""
        images = check_images(images, min_count=1)
        body = {"id": request_id, "inputs": [{"name": "images", "datatype": "UINT8", "shape": list(images.shape),
                                              "data": images.reshape(-1).tolist()}]}
        reply = self.call("POST", f"/v2/models/{self.model}/infer", body, {"Idempotency-Key": request_id})
        out = reply["outputs"][0]
        dtype = np.int64 if out["datatype"].startswith(("INT", "UINT")) else np.float32
        answer = np.asarray(out["data"], dtype=dtype).reshape(out["shape"])
        if len(answer) != len(images):
            raise TargetError(200, f"{len(answer)} answers for {len(images)} images")
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

    def call(self, method: str, path: str, body: dict | None = None, headers: dict | None = None):
        """One JSON request to ``{url}{path}``, retried as the module doc says; the parsed answer."""
        deadline, backoff = time.monotonic() + self.retry_for, 0.5
        while True:
            try:
                return self._send(method, path, body, headers)
            except urllib.error.HTTPError as e:
                message = _error_message(e)
                if not (e.code == 429 or e.code >= 500) or time.monotonic() > deadline:
                    raise (QueryBudgetExceeded if e.code == 402 else TargetError)(e.code, message) from None
                wait = float(e.headers.get("Retry-After") or 1)
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:  # no answer: retry the same id
                if time.monotonic() > deadline:
                    raise TargetError(0, f"no answer from {self.url} for {self.retry_for:.0f} s: {e}") from None
                wait, backoff = backoff, min(backoff * 2, 5.0)
            time.sleep(min(wait, max(0.0, deadline - time.monotonic()) + 0.01))


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(e.read())["error"])
    except Exception:
        return e.reason or "no reason given"
