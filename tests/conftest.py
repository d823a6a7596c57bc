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
def lenet5_target(digits):
    """A LeNet-5 target trained on 1,000 bundled digits and the permutation that chose them
    (``perm[:1000]``); later slices of ``perm`` are images it never saw."""
    from drmi_ray.models import TrainConfig, train_classifier

    images, labels = digits
    perm = np.random.default_rng(0).permutation(len(images))
    target = train_classifier(images[perm[:1000]], labels[perm[:1000]], TrainConfig(model="lenet5", lr=2e-3))
    return target, perm
