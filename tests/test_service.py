"""The target as an HTTP service (Ray Serve on 127.0.0.1): exact budgets under 100 concurrent
clients, replicas and the ledger killed mid-batch, an answer lost on its way back, what an
attacker's key can reach, bad and oversized requests (always a JSON error), request ids, the rate
limit, its own port per Ray, the output options, and the client against a second, minimal OIP
server. tests/test_tritonclient.py drives the service with a client nobody here wrote."""

import gzip
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from conftest import start_local_ray
from drmi_ray.client import QueryBudgetExceeded, TargetClient, TargetError
from drmi_ray.models import build_model, predict, predict_proba
from drmi_ray.service import start_target, stop_target
from drmi_ray.service_journal import read_journal
from drmi_ray.service_protocol import round_probs, top1
from drmi_ray.target import load_classifier, save_classifier


MAX_BATCH, MAX_BODY = 200, 1 << 20  # the served target's limits (a 100-image JSON body is about 0.3 MB)


@pytest.fixture(scope="module")
def served(lenet5_checkpoint, serve_port, tmp_path_factory):
    """The session's trained LeNet-5 target (conftest), served with its journal in a temp folder."""
    start_local_ray()
    folder = tmp_path_factory.mktemp("served")
    checkpoint = lenet5_checkpoint[0]
    service = start_target(checkpoint, str(folder / "journal.jsonl"), port=serve_port, app="served",
                           max_batch=MAX_BATCH, max_body_bytes=MAX_BODY)
    yield service, checkpoint, str(folder / "journal.jsonl")
    stop_target(service)


def raw(url, key=None, *, method="GET", body=None, headers=None):
    """(status, parsed body, headers) of one request, without the client's retries; status 0
    when the connection dropped."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body or b"{}"), e.headers
        except ValueError:  # not our JSON: e.g. Serve's own 500 page
            return e.code, {"error": body.decode(errors="replace")}, e.headers
    except (urllib.error.URLError, ConnectionError):
        return 0, {}, {}


def infer_body(images, rid="r"):
    return {"id": rid, "inputs": [{"name": "images", "datatype": "UINT8", "shape": list(images.shape),
                                   "data": images.reshape(-1).tolist()}]}


def paid(journal, key):
    return [r for r in read_journal(journal) if r["type"] == "answer" and r["key"] == key]


def test_round_probs_keeps_its_decimals_and_top1_keeps_only_the_top_probability(lenet5_target, digits):
    target, perm = lenet5_target
    probs = predict_proba(target, digits[0][perm[1000:1050]])
    r = round_probs(probs, 1)
    assert r.dtype == np.float32
    np.testing.assert_allclose(r * 10, np.round(r * 10), atol=1e-5)
    assert np.abs(r - probs).max() <= 0.05 + 1e-6
    t = top1(probs)
    np.testing.assert_array_equal(t.argmax(1), probs.argmax(1))
    assert ((t > 0).sum(1) == 1).all()
    np.testing.assert_array_equal(t.max(1), probs.max(1))
    with pytest.raises(ValueError, match="decimals"):
        round_probs(probs, -1)
    with pytest.raises(ValueError, match="probs must be"):
        top1(probs[0])


def test_answers_are_the_models_labels_and_metadata_says_the_input(served, digits):
    service, checkpoint, _ = served
    client = TargetClient(service.url, service.create_key("plain", budget=50), prefix="plain")
    images = digits[0][4000:4040]
    assert client.metadata()["inputs"][0] == {"name": "images", "datatype": "UINT8", "shape": [-1, 28, 28]}
    labels = client.query(images)
    np.testing.assert_array_equal(labels, predict(load_classifier(checkpoint), images))
    assert labels.dtype == np.int64 and service.usage("plain")["used"] == 40


def test_100_threads_on_one_key_get_exactly_its_budget(served, digits):
    service, _, journal = served
    key = service.create_key("shared", budget=300)
    answered = [0] * 100

    def caller(k):
        client = TargetClient(service.url, key, prefix=f"t{k}")
        size = 1 + k % 5
        while True:
            try:
                answered[k] += len(client.query(digits[0][:size]))
            except QueryBudgetExceeded:
                return

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert sum(answered) == service.usage("shared")["used"] == sum(r["n"] for r in paid(journal, "shared")) == 300


# 100 tasks start about as many Ray workers, 2 minutes on 2 cores: the default run takes 20
@pytest.mark.parametrize("tasks", [20, pytest.param(100, marks=pytest.mark.heavy)])
def test_ray_tasks_with_a_key_each_get_exactly_their_own_budget(served, digits, tasks):
    ray = start_local_ray()
    service, _, journal = served
    sizes = {f"task-{k}": 1 + k % 2 for k in range(tasks)}  # images per request
    # whole requests: each budget (2 to 6 requests' worth) is spent exactly, then the next is refused
    budgets = {name: size * (2 + k % 5) for k, (name, size) in enumerate(sizes.items())}
    keys = {name: service.create_key(name, budget=b) for name, b in budgets.items()}

    @ray.remote(num_cpus=0.01)
    def spend(url, key, images):
        client, answered = TargetClient(url, key, prefix="s"), 0
        while True:
            try:
                answered += len(client.query(images))
            except QueryBudgetExceeded:
                return answered

    batches = {size: ray.put(digits[0][:size]) for size in (1, 2)}
    got = ray.get([spend.remote(service.url, keys[name], batches[sizes[name]]) for name in budgets], timeout=300)
    for (name, budget), answered in zip(budgets.items(), got):
        assert answered == budget
        assert service.usage(name)["used"] == sum(r["n"] for r in paid(journal, name)) == answered


def test_an_attackers_key_reaches_no_weights_journal_or_prada_state(served):
    service, _, _ = served
    key = service.create_key("nosy", budget=5, prada_delta=0.95)
    base = service.url
    for path in ("/v2/operator/audit", "/v2/operator/keys", "/v2/operator/keys/nosy", "/v2/operator/keys/nosy/prada"):
        assert raw(base + path, key)[0] == 403, path
        assert raw(base + path)[0] == 401, path
    assert raw(base + "/v2/operator/keys", key, method="POST", body={"name": "mine", "budget": 10 ** 6})[0] == 403
    for path in ("/v2/models/target/weights", "/target.pt", "/journal.jsonl", "/v2/models/other/infer"):
        assert raw(base + path, key)[0] == 404, path
    assert raw(base + "/v2/models/target", "drk.nosy." + "0" * 32)[0] == 401
    assert raw(base + "/v2/operator/keys/nosy/prada", service.operator_key)[0] == 200  # the operator can


def infer(service, body, headers=None, key=None):
    return raw(service.url + "/v2/models/target/infer", key, method="POST", body=body, headers=headers)


@pytest.mark.parametrize("mangle, status, match", [
    (lambda b, h: b["inputs"][0].update(shape=[0, 28, 28], data=[]), 400, "empty batch"),
    (lambda b, h: b["inputs"][0].update(shape=[2, 27, 28]), 400, "takes \\[n, 28, 28\\]"),
    (lambda b, h: b["inputs"][0].update(shape=[True, 28, 28], data=[1] * 784), 400, "shape"),
    (lambda b, h: b["inputs"][0].update(shape=[2.0, 28, 28]), 400, "shape"),
    (lambda b, h: b["inputs"][0].update(shape="2,28,28"), 400, "shape"),
    (lambda b, h: b["inputs"][0].update(datatype="FP32"), 400, "UINT8"),
    (lambda b, h: b["inputs"][0].update(data=[300] * 2 * 784), 400, "0..255"),
    (lambda b, h: b["inputs"][0].update(data=[1.5] * 2 * 784), 400, "whole numbers|0..255"),
    (lambda b, h: b["inputs"][0].update(data=[True] * 2 * 784), 400, "whole numbers"),
    (lambda b, h: b["inputs"][0].update(data=[1] * 100), 400, "100 values"),
    (lambda b, h: b["inputs"][0].update(name="pixels"), 400, "input is 'images'"),
    (lambda b, h: b["inputs"][0].update(parameters={"shared_memory_region": "x"}), 400, "parameters"),
    (lambda b, h: b.update(inputs=[]), 400, "one tensor"),
    (lambda b, h: b.update(outputs=[{"name": "logits"}]), 400, "answers 'label' only"),
    (lambda b, h: b.update(outputs=[{"name": "label", "parameters": {"classification": 3}}]), 400, "parameters"),
    (lambda b, h: (h.pop("Idempotency-Key"), b.update(id=5)), 400, "string request id, got 5"),
    (lambda b, h: (h.pop("Idempotency-Key"), b.update(id=True)), 400, "string request id, got true"),
    (lambda b, h: b.update(id=["bad-0"]), 400, "string request id"),
    (lambda b, h: b.update(id="other"), 400, "Idempotency-Key header 'bad-0' and the body's id 'other' differ"),
    (lambda b, h: h.update({"Idempotency-Key": "a b"}), 400, "request id"),
    (lambda b, h: h.update({"Inference-Header-Content-Length": "99999999"}), 400, "Inference-Header-Content-Length"),
    (lambda b, h: h.update({"Content-Encoding": "br"}), 400, "Content-Encoding"),
    (lambda b, h: h.update({"Content-Encoding": "gzip"}), 400, "not valid gzip"),
    (lambda b, h: b["inputs"][0].update(shape=[MAX_BATCH + 1, 28, 28]), 413, "at most 200 per request"),
    (lambda b, h: h.update(Authorization="Bearer nope"), 401, "API key"),
])
def test_bad_requests_are_refused_in_one_json_line_and_charge_nothing(served, digits, mangle, status, match):
    service, _, _ = served
    name = f"bad-{status}-{abs(hash(match)) % 10 ** 6}"
    key = service.create_key(name, budget=10)
    body, headers = infer_body(digits[0][:2], "bad-0"), {"Idempotency-Key": "bad-0", "Authorization": f"Bearer {key}"}
    mangle(body, headers)
    got, reply, _ = infer(service, body, headers)
    assert got == status and len(reply["error"].splitlines()) == 1
    assert re.search(match, reply["error"]), reply
    assert service.usage(name)["used"] == service.usage(name)["reserved"] == 0


@pytest.mark.parametrize("body, match", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deep"),  # RecursionError in json.loads: was a text 500
    (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deep"),
    (b"\xff\xfe not json", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (b"", "not JSON"),
], ids=["deep-array", "deep-inputs", "not-utf8", "array", "empty"])
def test_malformed_bodies_are_a_json_400(served, body, match):
    service, _, _ = served
    key = service.create_key("malformed", budget=10)
    got, reply, headers = infer(service, body, key=key)
    assert got == 400 and re.search(match, reply["error"]) and len(reply["error"].splitlines()) == 1
    assert headers["Content-Type"] == "application/json"
    assert service.usage("malformed")["used"] == 0


def test_oversized_bodies_and_batches_are_refused_before_the_model_runs(served, digits):
    service, _, journal = served
    key = service.create_key("big-bodies", budget=10 ** 6)
    status, reply, _ = infer(service, b" " * (MAX_BODY + 1), key=key)
    assert status == 413 and "larger than 1048576 bytes" in reply["error"]
    bomb = gzip.compress(b" " * (2 * MAX_BODY))  # 2 MB of blanks in about 2 kB
    status, reply, _ = infer(service, bomb, {"Content-Encoding": "gzip"}, key)
    assert status == 413 and "once decompressed" in reply["error"] and len(bomb) < 10_000
    images = np.repeat(digits[0][:1], MAX_BATCH + 1, axis=0)
    status, reply, _ = infer(service, infer_body(images, "too-many"), key=key)  # under the body cap as JSON
    assert status == 413 and "at most 200 per request" in reply["error"]
    assert service.usage("big-bodies")["used"] == 0 and paid(journal, "big-bodies") == []


def test_a_batch_over_the_keys_burst_is_refused_413_before_the_model_runs(served, digits):
    service, _, journal = served
    key = service.create_key("bursty", budget=1000, rate_limit=10.0, burst=10.0)
    status, reply, headers = infer(service, infer_body(digits[0][:50], "burst-0"), key=key)
    assert status == 413 and "burst of 10" in reply["error"] and "Retry-After" not in headers
    assert infer(service, infer_body(digits[0][:10], "burst-1"), key=key)[0] == 200  # the burst itself passes
    assert service.usage("bursty")["used"] == 10 and [r["n"] for r in paid(journal, "bursty")] == [10]



def test_a_client_with_max_batch_splits_a_batch_over_the_burst_into_requests_it_accepts(served, digits):
    """``drmi run --rate-limit`` gives each cell's client ``max_batch`` = the key's burst."""
    from drmi_ray.client import TargetClient

    service, _, journal = served
    key = service.create_key("split", budget=1000, rate_limit=1000.0, burst=8.0)
    labels = TargetClient(service.url, key, prefix="split", max_batch=8).query(digits[0][:20])
    assert labels.shape == (20,) and [r["n"] for r in paid(journal, "split")] == [8, 8, 4]


def test_request_ids_header_body_and_none(served, digits):
    """A retried id is free (header or body); a request without any id gets a server-made one:
    answered and charged once per request (a resend is a new request)."""
    service, _, journal = served
    key = service.create_key("ids", budget=20)
    images = digits[0][100:104]
    status, first, _ = infer(service, infer_body(images, "ids-0"), key=key)
    assert status == 200 and first["id"] == "ids-0"
    body = infer_body(images)
    del body["id"]
    assert infer(service, body, {"Idempotency-Key": "ids-0"}, key)[1]["outputs"] == first["outputs"]  # free
    assert service.usage("ids")["used"] == 4
    status, reply, _ = infer(service, body, key=key)  # no id at all
    assert status == 200 and reply["id"].startswith("srv-") and reply["outputs"] == first["outputs"]
    assert service.usage("ids")["used"] == 8
    assert infer(service, {**body, "id": ""}, key=key)[1]["id"] != reply["id"]  # an empty id is no id
    assert service.usage("ids")["used"] == 12 == sum(r["n"] for r in paid(journal, "ids"))


def test_rate_limit_answers_429_with_retry_after_and_the_client_waits(served, digits):
    service, _, _ = served
    key = service.create_key("paced", budget=1000, rate_limit=200.0, burst=100.0)
    client = TargetClient(service.url, key, prefix="paced")
    start = time.monotonic()
    client.query(digits[0][:100])  # the whole burst: 100 more tokens take 0.5 s
    status, reply, headers = raw(service.url + "/v2/models/target/infer", key, method="POST",
                                 body=infer_body(digits[0][:100], "paced-x"), headers={"Idempotency-Key": "paced-x"})
    assert status == 429 and int(headers["Retry-After"]) >= 1 and "rate limit" in reply["error"]
    client.query(digits[0][:100])  # waits Retry-After, then answered
    assert time.monotonic() - start >= 0.45
    assert service.usage("paced")["used"] == 100 + 100


def replica_pid(app: str, deployment: str) -> int:
    import ray

    alive = [a for a in ray._private.state.actors().values()
             if a["ActorClassName"] == f"ServeReplica:{app}:{deployment}" and a["State"] == "ALIVE"]
    assert len(alive) == 1, alive
    return alive[0]["Pid"]


def send_unread(url, key, body, rid):
    """POST an infer request; its open connection, the answer not read."""
    where = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    connection.request("POST", where.path + "/v2/models/target/infer", json.dumps(body),
                       headers={"Authorization": f"Bearer {key}", "Idempotency-Key": rid,
                                "Content-Type": "application/json"})
    return connection


def test_killed_replicas_a_restarted_ledger_and_a_lost_answer_each_charge_a_request_once(digits, serve_port,
                                                                                          tmp_path):
    """SIGKILL the model replica and the ledger while a batch is reserved and being computed
    (an untrained ResNet-18 takes seconds on 512 images): the retry with the same request id is
    answered and charged once. The ledger killed after a request was answered comes back from the
    journal: the same request id gets the stored answer, not charged again. An answer lost on its
    way back (journaled and charged, then its connection closed unread) is fetched again with the
    same request id, not charged again."""
    import torch

    start_local_ray()
    torch.manual_seed(0)
    checkpoint = str(tmp_path / "slow.pt")
    save_classifier(build_model("resnet18", image_size=28), checkpoint, name="resnet18", in_channels=1,
                    num_classes=10, image_size=28)
    journal = str(tmp_path / "journal.jsonl")
    service = start_target(checkpoint, journal, port=serve_port, app="slow")
    try:
        key = service.create_key("big", budget=1040)
        images = digits[0][:512]
        first = {}

        def send():  # one try, no retry: what the client saw when the kill came
            first["status"] = raw(service.url + "/v2/models/target/infer", key, method="POST",
                                  body=infer_body(images, "big-0"), headers={"Idempotency-Key": "big-0"})[0]

        sender = threading.Thread(target=send)
        sender.start()
        deadline = time.monotonic() + 60
        while service.usage("big")["reserved"] == 0:  # reserved: begun, not yet committed
            assert time.monotonic() < deadline and sender.is_alive(), "the batch never went in flight"
            time.sleep(0.01)
        killed = [replica_pid("slow", d) for d in ("TargetReplica", "LedgerReplica")]
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        assert sender.is_alive() and paid(journal, "big") == []  # killed in flight: no answer, nothing charged
        sender.join(timeout=180)
        # Serve may retry the ledger call on its restarted replica itself (200); the model replica's
        # death reaches the client as a 5xx or a dropped connection
        assert first["status"] in (200, 500, 502, 503, 0)

        client = TargetClient(service.url, key, retry_for=180)
        answer = client.infer(images, "big-0")  # the client's retry with the same request id
        np.testing.assert_array_equal(answer, predict(load_classifier(checkpoint), images))
        assert service.usage("big")["used"] == 512 and len(paid(journal, "big")) == 1
        assert not set(killed) & {replica_pid("slow", d) for d in ("TargetReplica", "LedgerReplica")}  # new replicas

        second = client.infer(digits[0][512:1024], "big-1")
        os.kill(replica_pid("slow", "LedgerReplica"), signal.SIGKILL)  # after the journal write
        np.testing.assert_array_equal(client.infer(digits[0][512:1024], "big-1"), second)  # from the journal
        assert service.usage("big")["used"] == 1024 and [r["rid"] for r in paid(journal, "big")] == ["big-0", "big-1"]

        lost = digits[0][1024:1040]
        connection = send_unread(service.url, key, infer_body(lost, "big-2"), "big-2")
        deadline = time.monotonic() + 60
        while [r["rid"] for r in paid(journal, "big")][-1] != "big-2":  # journaled and charged: answered
            assert time.monotonic() < deadline, "the request was never answered"
            time.sleep(0.01)
        connection.close()  # the client never reads that answer
        np.testing.assert_array_equal(client.infer(lost, "big-2"), predict(load_classifier(checkpoint), lost))
        assert service.usage("big")["used"] == 1040 and [r["rid"] for r in paid(journal, "big")][2:] == ["big-2"]
        with pytest.raises(QueryBudgetExceeded):
            client.infer(digits[0][:1], "big-3")
    finally:
        stop_target(service)


def test_a_restarted_service_on_the_same_journal_keeps_budgets_and_answers(served, digits, serve_port):
    service, checkpoint, journal = served
    key = service.create_key("kept", budget=10)
    client = TargetClient(service.url, key, prefix="kept")
    before = client.query(digits[0][:8])
    stop_target(service)
    again = start_target(checkpoint, journal, operator_key=service.operator_key, port=serve_port, app="served")
    assert again.create_key("kept", budget=10) == key  # the same key for the same name
    np.testing.assert_array_equal(TargetClient(again.url, key, prefix="kept").query(digits[0][:8]), before)
    assert again.usage("kept")["used"] == 8
    with pytest.raises(QueryBudgetExceeded):
        TargetClient(again.url, key, prefix="more").query(digits[0][:3])


TWO_RUNS = """
import sys, ray
from drmi_ray.service import start_target, stop_target
checkpoint, journal, taken = sys.argv[1], sys.argv[2], int(sys.argv[3])
ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
try:
    start_target(checkpoint, journal, port=taken)
except ValueError as e:
    print("REFUSED", e, flush=True)
service = start_target(checkpoint, journal)
print("URL", service.url, flush=True)
print("READY", flush=True)
sys.stdin.read()  # until the test is done with it
stop_target(service)
"""


def test_a_second_run_with_its_own_ray_gets_its_own_port_and_a_taken_port_is_refused(served, lenet5_checkpoint,
                                                                                       serve_port, tmp_path):
    """The issue 23 collision: a second process starts its own Ray and Serve while this session's
    Serve holds ``serve_port``. Asked for that port it is refused in one line; left to itself it
    gets another port, and each proxy answers its own application only."""
    service, _, _ = served
    # the port our proxy holds now (serve_port, unless an earlier test's Serve of this session
    # started elsewhere first), checked to answer before the child tries it
    serve_port = int(service.url.split(":")[2].split("/")[0])
    assert raw(service.url + "/v2/health/ready")[0] == 200
    child = subprocess.Popen([sys.executable, "-c", TWO_RUNS, lenet5_checkpoint[0], str(tmp_path / "j.jsonl"),
                              str(serve_port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        lines = []
        while (line := child.stdout.readline()) and line.strip() != "READY":  # its lines, up to READY or EOF
            lines.append(line.strip())
        assert lines[0].startswith("REFUSED port"), lines
        assert f"port {serve_port} on 127.0.0.1 is taken" in lines[0] and "--serve-port" in lines[0]
        assert lines[1].startswith("URL http://127.0.0.1:"), lines
        url = lines[1].split()[1]
        port = int(url.split(":")[2].split("/")[0])
        assert port != serve_port
        assert raw(url + "/v2/health/ready")[0] == 200
        assert raw(f"http://127.0.0.1:{port}/{service.app}/v2/health/ready")[0] == 404  # not our app there
        assert raw(service.url + "/v2/health/ready")[0] == 200  # ours still answers on ours
    finally:
        child.communicate("", timeout=120)


# --------------------------------------------------------------------------- another OIP server

class _MinimalOIP(BaseHTTPRequestHandler):
    """An Open Inference Protocol v2 server written from the spec, not from drmi_ray: it answers
    ``sum of pixels mod 10`` per image, asks for one retry (429) on the first request, and
    refuses with 402 past 6 images."""

    seen: list = []
    answered = 0

    def log_message(self, *args):
        pass

    def _reply(self, status, body, headers=()):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/v2/models/digits":
            return self._reply(200, {"name": "digits", "platform": "custom",
                                     "inputs": [{"name": "x", "datatype": "UINT8", "shape": [-1, 4, 4]}],
                                     "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]}]})
        self._reply(404, {"error": "no such path"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        cls.seen.append((self.path, self.headers.get("Authorization"), self.headers.get("Idempotency-Key"), body["id"]))
        if len(cls.seen) == 1:
            return self._reply(429, {"error": "slow down"}, [("Retry-After", "1")])
        tensor = body["inputs"][0]
        images = np.asarray(tensor["data"], dtype=np.int64).reshape(tensor["shape"])
        if cls.answered + len(images) > 6:
            return self._reply(402, {"error": "budget spent"})
        cls.answered += len(images)
        labels = images.reshape(len(images), -1).sum(1) % 10
        self._reply(200, {"model_name": "digits", "id": body["id"], "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [len(images)], "data": labels.tolist()}]})


def test_the_client_speaks_the_protocol_to_a_minimal_server_written_here():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _MinimalOIP)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = TargetClient(f"http://127.0.0.1:{server.server_port}", "secret", model="digits", prefix="run")
        assert client.metadata()["inputs"][0]["shape"] == [-1, 4, 4]
        images = np.arange(4 * 16, dtype=np.uint8).reshape(4, 4, 4)
        start = time.monotonic()
        np.testing.assert_array_equal(client.query(images), images.reshape(4, -1).astype(np.int64).sum(1) % 10)
        assert time.monotonic() - start >= 0.9  # it waited the Retry-After of the 429
        with pytest.raises(QueryBudgetExceeded, match="budget spent"):
            client.query(images)
        with pytest.raises(TargetError) as e:
            TargetClient(f"http://127.0.0.1:{server.server_port}", "secret", model="other").metadata()
        assert e.value.status == 404
        # the 429 and its retry carried the same request id, in the header and the body
        assert _MinimalOIP.seen[:2] == [("/v2/models/digits/infer", "Bearer secret", "run-0", "run-0")] * 2
        assert _MinimalOIP.seen[2][2] == "run-1"
    finally:
        server.shutdown()
