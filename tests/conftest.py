import os

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
