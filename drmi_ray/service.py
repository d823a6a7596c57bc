"""The target as a metered HTTP service: started, found and stopped from the driver, and ``drmi serve``.

The service itself (Ray Serve deployments: model replicas that are also the HTTP ingress, and
one ledger) is ``drmi_ray.service_replicas``, whose doc lists the API; what an infer request and
its answer look like is ``drmi_ray.service_protocol``'s.

``start_target(checkpoint, journal)`` starts it and returns a ``TargetService`` (base URL,
model name, operator key); ``stop_target`` deletes the application. When it starts Serve, the
proxy listens on ``127.0.0.1`` (unless told otherwise) on a free port (unless told one: a taken
port is refused in one line), so two runs on one machine, each with its own Ray, never share a
proxy; it then checks that its own application answers at the URL it returns. ``run_target``
does the same for a run folder (its journal and operator key kept there), ``serve_forever`` is
``drmi serve``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import fsspec
import ray
from fsspec.implementations.local import LocalFileSystem
from ray import serve
from ray.serve.context import _get_global_client

from .client import TargetClient
from .ledger import new_operator_key
from .runtime import init_ray
from .service_journal import check_service, read_journal
from .service_protocol import MODEL_NAME, OUTPUTS
from .service_replicas import LedgerReplica, TargetReplica
from .settings import check_choice, check_int

DEFAULT_MAX_BATCH = 4096  # images per request
DEFAULT_MAX_BODY_BYTES = 128 << 20  # a request body, decompressed (about 4,000 CIFAR-10 images as JSON)


@dataclasses.dataclass(frozen=True)
class TargetService:
    """A running target: ``url`` (the application's base URL), the operator key, the app name."""

    url: str
    operator_key: str
    app: str
    model: str = MODEL_NAME

    def _operator(self):
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
    from .target import load_checkpoint  # torch: only where a target is served

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
    from .checks import check_checkpoint, check_out  # torch: it reads checkpoints

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