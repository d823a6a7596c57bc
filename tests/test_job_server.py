"""`ray job submit` runs jobs/imagenet.py on a real local two-node cluster, token auth on.

The test starts its own Ray cluster with `ray start --block`: a head node (GCS, dashboard and
job server) and a second node joined to it, one CPU each, all ports free ones picked here, a
temp dir of its own and an auth token of its own (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH to a
file in that temp dir, never ~/.ray/auth_token). It submits jobs/imagenet.py with the Job SDK and
the repository as working_dir, waits for SUCCEEDED and checks selection.json: exactly K distinct
files of the folder, the corrupt JPEG skipped with its reason. The cluster must have had two
alive nodes while the job ran (state API before and after, the job's own "Ray: 2 node(s)"), and
the job's tasks must have run on both.

In the default run: about 1-3 minutes on a 2-core machine (cluster start-up 25-90 s, the job
60-100 s, teardown 5-10 s, the longer figures under load from other sessions).

Teardown stops only the processes this test started: it never runs `ray stop`, which would stop
every Ray on the machine. The blocking `ray start` processes are their nodes' parents; the test
interrupts them (they then stop their nodes), kills whatever of their process trees or whatever
still names the test's temp dir is left, and asserts that none of it is alive.
"""

import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
RAY = os.path.join(BIN, "ray") if os.path.exists(os.path.join(BIN, "ray")) else shutil.which("ray")
PER_CLASS = 30
BUDGET = 20
CORRUPT = "corrupt.jpg"


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all held open until all are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def local_path(url: str) -> str:
    """The file path of a local file or file:// URL (the job lists files as fsspec URLs)."""
    return url.removeprefix("file://")


@pytest.fixture
def image_folder(tmp_path, digits):
    """300 real digits as JPEGs in 10 class folders, and one corrupt JPEG."""
    from PIL import Image

    images, labels = digits
    root = tmp_path / "pool"
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True)
        for i in np.flatnonzero(labels == c)[:PER_CLASS]:
            buf = io.BytesIO()
            Image.fromarray(images[i]).save(buf, format="JPEG", quality=95)
            (root / f"class{c}" / f"{i:05d}.jpg").write_bytes(buf.getvalue())
    (root / "class4" / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return root


class LocalCluster:
    """A head node and one more node on this machine, each a blocking `ray start` child."""

    def __init__(self):
        # AF_UNIX socket paths (TEMP/session_<date>_<time>_<us>_<pid>/sockets/plasma_store, ~62
        # bytes under TEMP) must stay under 108 bytes: pytest's tmp_path (/tmp/pytest-of-USER/
        # pytest-N/<30 characters of the test name>0/, ~55 bytes) is too long, so a short dir of
        # its own in /tmp, one per test (mkdtemp), removed by stop() (the fixture asserts it).
        self.temp_dir = tempfile.mkdtemp(prefix="rjs-", dir="/tmp")
        self.token = os.urandom(32).hex()
        token_path = os.path.join(self.temp_dir, "auth_token")
        with open(token_path, "w") as f:
            f.write(self.token)
        self.gcs_port, self.dashboard_port, client_port, agent_a, agent_b = free_ports(5)
        self.gcs = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        # The same environment a user sets (see the README): token mode and where the token is.
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_path, RAY_USAGE_STATS_ENABLED="0")
        common = ["--block", "--num-cpus=1", "--num-gpus=0", "--object-store-memory=200000000",
                  "--disable-usage-stats"]
        self.procs: list[subprocess.Popen] = []
        self.logs: list[str] = []
        try:
            self._start("head", [RAY, "start", "--head", f"--temp-dir={self.temp_dir}", f"--port={self.gcs_port}",
                                 "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                 f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={client_port}",
                                 f"--dashboard-agent-listen-port={agent_a}", *common])
            self.wait_for(lambda: self._get("/api/version") is not None, "the head node's dashboard")
            # Its own temp dir under ours: two nodes sharing one session dir on one machine would
            # unpack the job's working_dir into the same folder, one over the other.
            self._start("node2", [RAY, "start", f"--address={self.gcs}", f"--temp-dir={self.temp_dir}/n2",
                                  f"--dashboard-agent-listen-port={agent_b}", *common])
            self.wait_for(lambda: len(self.alive_nodes()) == 2, "two alive nodes")
        except BaseException as err:
            left = self.stop()
            if left:
                err.add_note(f"still alive after stopping: {left}")
            raise

    def _start(self, name: str, cmd: list[str]) -> None:
        log = os.path.join(self.temp_dir, f"{name}.log")
        self.logs.append(log)
        with open(log, "w") as f:
            self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL))

    def http_status(self, path: str, headers: dict) -> int:
        try:
            with urllib.request.urlopen(urllib.request.Request(self.dashboard + path, headers=headers), timeout=5):
                return 200
        except urllib.error.HTTPError as err:
            return err.code

    def _get(self, path: str):
        """GET a dashboard endpoint with the token; the JSON reply, or None while it is not up."""
        request = urllib.request.Request(self.dashboard + path, headers=self.auth_headers)
        try:
            with urllib.request.urlopen(request, timeout=5) as reply:
                return json.loads(reply.read())
        except (OSError, ValueError):
            return None

    @property
    def auth_headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def alive_nodes(self) -> list[dict]:
        reply = self._get("/api/v0/nodes?limit=100")
        if not reply or not reply.get("result"):
            return []
        return [n for n in reply["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def task_nodes(self, job_id: str) -> set[str]:
        """The nodes that ran the tasks of job ``job_id`` (state API)."""
        query = urllib.parse.urlencode({"limit": 10000, "detail": "true", "filter_keys": "job_id",
                                        "filter_predicates": "=", "filter_values": job_id})
        reply = self._get(f"/api/v0/tasks?{query}") or {}
        tasks = ((reply.get("data") or {}).get("result") or {}).get("result") or []
        return {t["node_id"] for t in tasks if t.get("type") == "NORMAL_TASK" and t.get("node_id")}

    def wait_for(self, ready, what: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p, log in zip(self.procs, self.logs):
                if p.poll() is not None:
                    raise RuntimeError(f"`ray start` exited with {p.returncode} waiting for {what}:\n"
                                       + open(log).read()[-3000:])
            if ready():
                return
            time.sleep(0.5)
        raise TimeoutError(f"no {what} after {timeout:.0f} s:\n" + "\n".join(open(l).read()[-2000:] for l in self.logs))

    def ours(self) -> dict[int, "object"]:
        """Every live process this cluster owns: the `ray start` processes, their descendants,
        and any process whose command line names this cluster's temp dir or GCS port."""
        import psutil

        port = re.compile(rf":{self.gcs_port}\b")
        found = {}
        for p in self.procs:
            try:
                parent = psutil.Process(p.pid)
                found[parent.pid] = parent
                found.update((c.pid, c) for c in parent.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or ())
            if self.temp_dir in cmdline or port.search(cmdline):
                found[proc.pid] = proc
        found.pop(os.getpid(), None)
        return found

    def stop(self) -> list[str]:
        """Stop this cluster only; returns what is still alive afterwards (should be nothing)."""
        import psutil

        procs = self.ours()
        for p in reversed(self.procs):  # the second node first, then the head
            if p.poll() is None:
                p.send_signal(signal.SIGINT)  # `ray start --block` shuts its node down on SIGINT
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        procs.update(self.ours())
        _, alive = psutil.wait_procs(list(procs.values()), timeout=10)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(alive, timeout=10)
        left = []
        for proc in alive:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{proc.pid} {' '.join(proc.cmdline())[:150]}")
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left


@pytest.fixture
def cluster():
    if RAY is None:
        pytest.skip("no `ray` command")
    try:
        c = LocalCluster()
    except (RuntimeError, TimeoutError) as err:  # on 2 shared cores a raylet can miss Ray's 30 s start-up
        warnings.warn(f"local Ray cluster did not start, trying once more: {str(err)[:300]}")
        c = LocalCluster()
    try:
        yield c
    finally:
        left = c.stop()
        assert not left, f"Ray processes of this test still alive after teardown: {left}"
        assert not os.path.exists(c.temp_dir), f"the cluster's temp dir {c.temp_dir} was left behind"


def test_ray_job_submit_with_a_token_runs_the_imagenet_job_on_both_nodes(cluster, image_folder, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    assert len(cluster.alive_nodes()) == 2
    assert cluster.http_status("/api/jobs/", {}) == 401  # token auth is on: no token, no entry
    assert cluster.http_status("/api/jobs/", {"Authorization": "Bearer wrong"}) == 403
    out = tmp_path / "out"
    client = JobSubmissionClient(cluster.dashboard, headers=cluster.auth_headers)
    job = client.submit_job(
        # this interpreter, not whatever `python` the shell finds (an unactivated venv's is another)
        entrypoint=f"{shlex.quote(sys.executable)} jobs/imagenet.py --data {image_folder} --budget {BUDGET} --out {out} "
                   f"--partition kmeans --clusters 3",
        runtime_env={"working_dir": ROOT,
                     "excludes": ["runs/", "docs/", ".git/", "benchmarks/", "**/__pycache__/", "*.egg-info/"]},
    )
    deadline = time.monotonic() + 300
    status = client.get_job_status(job)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and time.monotonic() < deadline:
        time.sleep(1)
        status = client.get_job_status(job)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, f"job {job} is {status}; its logs:\n{logs[-6000:]}"
    assert "Ray: 2 node(s)" in logs, logs[-3000:]  # what the job saw at start
    assert len(cluster.alive_nodes()) == 2
    nodes = {n["node_id"] for n in cluster.alive_nodes()}
    assert cluster.task_nodes(client.get_job_info(job).job_id) == nodes  # its tasks ran on both
    # The CLI route of the README: RAY_AUTH_MODE=token and the token's path in the environment.
    cli = subprocess.run([RAY, "job", "status", job, "--address", cluster.dashboard], env=cluster.env,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and f"Job '{job}' succeeded" in cli.stdout + cli.stderr, cli.stdout + cli.stderr

    with open(out / "selection.json") as f:
        selection = json.load(f)
    files = {str(p) for p in image_folder.rglob("*.jpg")}
    corrupt = str(image_folder / "class4" / CORRUPT)
    selected = [local_path(p) for p in selection["selected"]]
    assert len(selected) == BUDGET and len(set(selected)) == BUDGET
    assert set(selected) <= files - {corrupt}, selected
    skipped = {local_path(s["path"]): s["reason"] for s in selection["skipped"]}
    assert list(skipped) == [corrupt] and skipped[corrupt]
