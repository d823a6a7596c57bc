"""A stand-in Open Inference Protocol v2 server for client tests, written from the protocol text
(KServe's "Open Inference Protocol (V2)" REST API), not from drmi_ray.service.

    with OIPServer(model="digits", inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 784]}],
                   answer=lambda x: [tensor("label", "INT64", x.reshape(len(x), -1).sum(1) % 10)]) as server:
        client = TargetClient(server.url, "secret", model="digits")
        ...
        server.requests  # every request it got: method, path, headers, body (parsed JSON), images

Serves ``GET /v2/models/{model}`` (metadata: ``inputs``, ``outputs``) and
``POST /v2/models/{model}/infer``; another model name is 404 with ``{"error": ...}``. An infer
request's first input is decoded (``data`` as a flat or nested list, reshaped to its ``shape``)
and passed to ``answer``, which returns the reply's ``outputs``; when the request names
``outputs``, only those are returned (an unknown name is 400), as the protocol says. ``statuses``:
``(status, headers)`` pairs answered, in order, to the first infer requests instead of an answer
(status ``"drop"``: the connection is closed with no answer); ``always``: one ``(status, headers)``
answered to every infer request. ``binary``: answers use the binary tensor data extension (a JSON
header of ``Inference-Header-Content-Length`` bytes, then each output's little-endian bytes).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np


NUMPY = {"BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "<i1",
         "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}


def tensor(name: str, datatype: str, values, shape=None) -> dict:
    """One output tensor: ``data`` as a flat row-major list, ``shape`` from ``values`` unless given."""
    values = np.asarray(values)
    return {"name": name, "datatype": datatype, "shape": list(values.shape if shape is None else shape),
            "data": values.reshape(-1).tolist()}


class OIPServer:
    def __init__(self, *, model: str = "digits", inputs=None, outputs=None, answer=None, statuses=(),
                 always=None, binary: bool = False):
        self.model = model
        self.inputs = [{"name": "images", "datatype": "UINT8", "shape": [-1, 28, 28]}] if inputs is None else inputs
        self.outputs = [{"name": "label", "datatype": "INT64", "shape": [-1]}] if outputs is None else outputs
        self.answer = answer or (lambda x: [tensor("label", "INT64", np.zeros(len(x), dtype=np.int64))])
        self.statuses, self.always, self.binary = list(statuses), always, binary
        self.requests: list[dict] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_port}"

    def __enter__(self):
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def infers(self) -> list[dict]:
        """The infer requests received, in order."""
        return [r for r in self.requests if r["path"].endswith("/infer")]

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status, body, headers=None, raw=b""):
                data = json.dumps(body).encode()
                if raw:
                    headers = {**(headers or {}), "Inference-Header-Content-Length": str(len(data))}
                    data += raw
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def record(self, body=None, images=None):
                server.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                        "body": body, "images": images})

            def do_GET(self):
                self.record()
                if self.path == f"/v2/models/{server.model}":
                    return self.reply(200, {"name": server.model, "versions": ["1"], "platform": "stand-in",
                                            "inputs": server.inputs, "outputs": server.outputs})
                self.reply(404, {"error": f"model not found: {self.path}"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path != f"/v2/models/{server.model}/infer":
                    self.record(body)
                    return self.reply(404, {"error": f"model not found: {self.path}"})
                first = body["inputs"][0]
                images = np.asarray(first["data"]).reshape(first["shape"])
                self.record(body, images)
                status = server.always or (server.statuses.pop(0) if server.statuses else None)
                if status is not None and status[0] == "drop":
                    return  # no answer: HTTP/1.0 closes the connection
                if status is not None:
                    return self.reply(status[0], {"error": f"stand-in status {status[0]}"}, status[1])
                outputs = server.answer(images)
                if "outputs" in body:
                    names = [o["name"] for o in body["outputs"]]
                    if not set(names) <= {o["name"] for o in outputs}:
                        return self.reply(400, {"error": f"unknown output requested: {names}"})
                    outputs = [o for o in outputs if o["name"] in names]
                raw = b""
                if server.binary:
                    chunks = [np.asarray(o.pop("data"), dtype=NUMPY[o["datatype"]]).tobytes() for o in outputs]
                    for o, chunk in zip(outputs, chunks):
                        o["parameters"] = {"binary_data_size": len(chunk)}
                    raw = b"".join(chunks)
                self.reply(200, {"model_name": server.model, "model_version": "1", "id": body.get("id"),
                                 "outputs": outputs}, raw=raw)

        return Handler
