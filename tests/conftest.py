import os
import re
import signal
import time

# Ray Train V2 polls worker health every second by default; tests wait on it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import numpy as np
import pytest


def start_local_ray():
    """The local Ray instance the session shares (started on first use)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    return ray


@pytest.fixture
def ray_local():
    """A local Ray instance shared by the whole session (started on first use).

    Tests that need their own cluster (ray.cluster_utils.Cluster) shut it down first;
    the next test that asks for this fixture starts it again.
    """
    yield start_local_ray()


@pytest.fixture(scope="session")
def serve_port():
    """A free port for Ray Serve's HTTP proxy on 127.0.0.1 (the first test serving a target starts
    Serve there; Serve keeps it for the rest of the Ray session)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def digits():
    """The bundled real MNIST digits: (5000, 28, 28) uint8 images and int64 labels."""
    from drmi_ray.data import bundled_mnist

    return bundled_mnist()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One torch and numba thread in the test process, as in a 1-CPU Ray task: on 2 shared cores
    a thread per core oversubscribes with Ray's workers and trains several times slower."""
    import numba
    import torch

    from drmi_ray.runtime import use_cpus

    before = torch.get_num_threads(), numba.get_num_threads()
    use_cpus(1)
    yield
    torch.set_num_threads(before[0])
    numba.set_num_threads(before[1])


@pytest.fixture(scope="session")
def lenet5_checkpoint(digits, tmp_path_factory):
    """The session's one trained target: LeNet-5, Adam 2e-3, 20 epochs (320 steps) on 1,000
    bundled digits, ``perm[:1000]`` of ``perm = default_rng(0).permutation(5000)``, trained and
    saved by ``train_target``. Returns ``(checkpoint path, train_target's metadata, perm)``;
    later slices of ``perm`` are images it never saw.

    Trained once per session: every test that needs "a trained target" (a model, or a
    checkpoint to serve) takes this one; test_target.py checks what ``train_target`` wrote and
    test_models.py the held-out accuracy of this training. Read-only: tests copy it to change it.
    """
    from drmi_ray.models import TrainConfig
    from drmi_ray.target import train_target

    images, labels = digits
    perm = np.random.default_rng(0).permutation(len(images))
    path = str(tmp_path_factory.mktemp("lenet5-target") / "target.pt")
    meta = train_target(images[perm[:1000]], labels[perm[:1000]], path, config=TrainConfig(model="lenet5", lr=2e-3))
    return path, meta, perm


@pytest.fixture(scope="session")
def lenet5_target(lenet5_checkpoint):
    """The session's target (``lenet5_checkpoint``) loaded as a model, and its ``perm``."""
    from drmi_ray.target import load_classifier

    path, _, perm = lenet5_checkpoint
    return load_classifier(path), perm


class DrmiServe:
    """``drmi serve`` started as a user starts it: ``python -m drmi_ray.cli serve --target
    CHECKPOINT --out FOLDER FLAGS...`` in a session of its own (as in a terminal: Ctrl-C reaches
    its whole process group), waited on until it prints its base URL.

    ``url``, ``service`` (a ``TargetService`` for the operator calls), ``operator_key``,
    ``key_file`` (as printed), ``stdout`` (lines so far); ``stop(signal)`` -> exit code;
    ``kill()`` for cleanup. Raises AssertionError with its stderr when it exits before serving.
    """

    READY = re.compile(r'^target: (http://\S+)  \(model "target"; operator key in (\S+)\)$')

    def __init__(self, checkpoint, out, *flags, wait_s: float = 240):
        import queue
        import subprocess
        import sys
        import tempfile
        import threading

        self.stderr = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "drmi_ray.cli", "serve", "--target", str(checkpoint), "--out", str(out),
             *map(str, flags)], stdout=subprocess.PIPE, stderr=self.stderr, text=True, start_new_session=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.stdout: list[str] = []
        self._lines = queue.Queue()  # its stdout a line at a time, None at the end
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self.key_file = None
        deadline = time.monotonic() + wait_s
        while self.url is None:
            line = self._line(deadline)
            match = self.READY.match(line)
            if match:
                self.url, self.key_file = match[1], match[2]
        self._line(deadline)  # the curl hint: printed with the URL, before it serves forever

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _line(self, deadline: float) -> str:
        import queue

        try:
            line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            self.kill()
            raise AssertionError(f"drmi serve printed no URL in time; stderr:\n{self.errors()}") from None
        if line is None:
            self.proc.wait()
            raise AssertionError(f"drmi serve exited ({self.proc.returncode}) before serving; stderr:\n{self.errors()}")
        self.stdout.append(line.rstrip("\n"))
        return self.stdout[-1]

    def errors(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    @property
    def operator_key(self) -> str:
        with open(self.key_file) as f:
            return f.read().strip()

    @property
    def service(self):
        from drmi_ray.service import TargetService

        return TargetService(url=self.url, operator_key=self.operator_key, app=self.url.rsplit("/", 1)[1])

    def stop(self, sig=signal.SIGINT, timeout: float = 120) -> int:
        """Send ``sig`` and wait; its exit code. SIGINT goes to its process group, as Ctrl-C in a
        terminal sends it (Ray's own processes ignore it); another signal to the command alone, as
        ``kill PID`` sends it (SIGTERM would stop Ray's processes under the command)."""
        (os.killpg if sig == signal.SIGINT else os.kill)(self.proc.pid, sig)
        code = self.proc.wait(timeout=timeout)
        self.stdout += [line.rstrip("\n") for line in iter(lambda: self._lines.get(timeout=10), None)]
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
