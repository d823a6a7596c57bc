"""Cluster scale: cluster.yaml, and fault injection on a simulated multi-node Ray cluster.

``ray.cluster_utils.Cluster`` starts a head and worker raylets on this machine (fake GPUs), so
node loss (``remove_node``), worker crashes (SIGKILL of a task's process) and actor crashes can be
tested without a real cluster. The head has no CPUs: every task and actor lands on a worker node.

One cluster serves the whole module (starting one costs ~20 s on 2 cores). It shuts the shared
local Ray (conftest's ``ray_local``) down first and shuts itself down at the end, so tests after
this module start ``ray_local`` again.
"""

import os
import signal
import threading
import time

import numpy as np
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- cluster.yaml

def test_cluster_yaml_is_a_valid_launcher_config():
    import copy

    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        config = yaml.safe_load(f)
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "setup_commands",
                "docker", "max_workers", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in config, key
    validate_config(prepare_config(copy.deepcopy(config)))  # the launcher's own schema and defaults

    image = config["docker"]["image"]
    assert image == f"rayproject/ray:{ray.__version__}-py311-gpu", image  # not the discontinued ray-ml
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for name, t in types.items() if name != config["head_node_type"] and t["resources"].get("GPU")]
    assert gpu_types and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu_types)
    assert any(t["node_config"]["InstanceType"].startswith(("g5.", "p4d.")) for t in gpu_types)
    assert any("pip install" in c and "drmi-ray" in c for c in config["setup_commands"])
    mount = next(iter(config["file_mounts"]))
    assert any(mount in c for c in config["setup_commands"])


# --------------------------------------------------------------------------- the simulated cluster

@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the shared local Ray of other tests, if any
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(2):
            c.add_node(num_cpus=1, num_gpus=1)
        ray.init(address=c.address, log_to_driver=False)
        c.wait_for_nodes()
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def worker_nodes(c):
    return [n for n in c.list_all_nodes() if n is not c.head_node]


def ensure_workers(c, count=2):
    """Bring the cluster back to ``count`` worker nodes (a test may have removed one)."""
    while len(worker_nodes(c)) < count:
        c.add_node(num_cpus=1, num_gpus=1)
    c.wait_for_nodes()


def raylet_pid(node) -> int:
    return node.all_processes["raylet"][0].process.pid


def task_processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, title) of Ray worker processes running a task or actor right now."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace")
            if not title.startswith("ray::") or title.startswith("ray::IDLE"):
                continue
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        found[int(entry)] = (ppid, title)
    return found


def proc_state(pid: int) -> tuple[str, int, str] | None:
    """(state letter, parent pid, title) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read().split(b"\0")[0].decode(errors="replace")
    except (OSError, IndexError, ValueError):
        return None
    return fields[0], int(fields[1]), title


def freeze_if_running(pid: int, parents: set[int], running) -> str | None:
    """SIGSTOP ``pid`` if it is a child of one of ``parents`` (raylets of this test's cluster) and
    its title satisfies ``running``; once it is stopped, read the title again. Returns the title
    when the process is frozen in the middle of that work (it can no longer finish it), else
    resumes it and returns None. Ray sets a worker's title to ``ray::<task>`` or
    ``ray::<Actor>.<method>`` while it executes and resets it before it replies, so a frozen
    process whose title still names the work has not finished it."""
    before = proc_state(pid)
    if before is None or before[1] not in parents or not running(before[2]):
        return None
    os.kill(pid, signal.SIGSTOP)  # a worker of this test's own cluster (checked just above)
    deadline = time.time() + 5
    while (now := proc_state(pid)) is not None and now[0] not in "Tt" and time.time() < deadline:
        time.sleep(0.0005)
    if now is not None and now[0] in "Tt" and now[1] in parents and running(now[2]):
        return now[2]
    if now is not None:
        os.kill(pid, signal.SIGCONT)
    return None


def freeze_a_running_task(parents: set[int], name: str) -> tuple[int, int, str] | None:
    """Freeze one process of this cluster that is running task ``name`` right now:
    (pid, parent raylet pid, title), or None if none is running at this instant."""
    for pid, (ppid, title) in task_processes().items():
        if ppid in parents and name in title:
            frozen = freeze_if_running(pid, {ppid}, lambda t: name in t)
            if frozen is not None:
                return pid, ppid, frozen
    return None


def task_events(name: str) -> list:
    """Ray's task events (one per attempt) of tasks called ``name``, read from the GCS (the
    dashboard, and with it ``ray.util.state``, is off in this cluster)."""
    import ray

    return [e for e in ray._private.state.state._get_all_task_events() if e.task_info.name == name]


def retried_attempts(name: str, failed) -> list:
    """Attempts of task ``name`` that ``failed(event)`` selects and that have a later attempt
    (the task was retried). Task events reach the GCS about once a second: polled."""
    deadline = time.time() + 30
    while True:
        events = task_events(name)
        later = {}
        for e in events:
            later[e.task_id] = max(later.get(e.task_id, -1), e.attempt_number)
        found = [e for e in events if failed(e) and later[e.task_id] > e.attempt_number]
        if found or time.time() > deadline:
            return found
        time.sleep(0.5)


class Watcher(threading.Thread):
    """Polls /proc while a job runs: which raylet (node) ran processes whose title has ``name``."""

    def __init__(self, name: str):
        super().__init__(daemon=True)
        self.name, self.parents, self.stop = name, set(), threading.Event()

    def run(self):
        while not self.stop.is_set():
            for pid, (ppid, title) in task_processes().items():
                if self.name in title:
                    self.parents.add(ppid)
            time.sleep(0.02)


def count_files(url: str, suffix: str = ".parquet") -> int:
    total = 0
    for _, _, files in os.walk(url):
        total += sum(f.endswith(suffix) for f in files)
    return total


@pytest.fixture(scope="module")
def pool(digits):
    images, _ = digits
    return np.ascontiguousarray(images[:360])


@pytest.fixture(scope="module")
def clean_matrix(pool):
    """The matrix from the plain kernel: what every faulty run must reproduce exactly."""
    from drmi_ray.mi import pairwise_mi

    return pairwise_mi(pool)


def run_matrix_with_fault(pool, store, fault, *, tile_size=24, trigger=6):
    """compute_mi_matrix in a thread; ``fault()`` once ``trigger`` tiles are in the store."""
    from drmi_ray.matrix import compute_mi_matrix

    result, error = {}, {}

    def work():
        try:
            result["store"] = compute_mi_matrix(pool, store, tile_size=tile_size, max_in_flight=4, progress=False)
        except Exception as e:  # noqa: BLE001 - re-raised in the test thread
            error["e"] = e

    thread = threading.Thread(target=work)
    thread.start()
    deadline = time.time() + 120
    while count_files(store) < trigger and thread.is_alive() and time.time() < deadline:
        time.sleep(0.01)
    done_before = count_files(store)
    fault()
    thread.join(timeout=300)
    assert not thread.is_alive(), "compute_mi_matrix did not finish after the fault"
    if error:
        raise error["e"]
    return result["store"], done_before


def tile_task_name() -> str:
    from drmi_ray import matrix

    return "_tile_task" if hasattr(matrix, "_tile_task") else "tile"  # the Ray task's process title


def test_tiles_spread_over_nodes(cluster, pool, clean_matrix, tmp_path):
    from drmi_ray.matrix import compute_mi_matrix

    ensure_workers(cluster)
    watcher = Watcher(tile_task_name())
    watcher.start()
    store = compute_mi_matrix(pool, str(tmp_path / "mi"), tile_size=24, max_in_flight=4, progress=False)
    watcher.stop.set()
    watcher.join()
    np.testing.assert_array_equal(store.to_dense(), clean_matrix)
    raylets = {raylet_pid(n) for n in worker_nodes(cluster)}
    assert watcher.parents & raylets == raylets, "tiles ran on only one node"
    assert raylet_pid(cluster.head_node) not in watcher.parents  # the head has no CPUs


def test_node_lost_mid_matrix_loses_no_tile(cluster, pool, clean_matrix, tmp_path):
    """A worker node is removed (raylet killed, no drain) while one of its workers is in the
    middle of a tile: that tile's attempt fails with the node and is retried elsewhere."""
    ensure_workers(cluster)
    victim = worker_nodes(cluster)[0]
    victim_raylet = raylet_pid(victim)
    name = tile_task_name()
    lost = {}

    def kill_node():
        # freeze a worker of the victim node mid-tile (retrying until one is caught), so the node
        # is certainly running a tile when it goes; then the node and that worker die together
        deadline = time.time() + 60
        while not lost and time.time() < deadline:
            frozen = freeze_a_running_task({victim_raylet}, name)
            if frozen is None:
                time.sleep(0.001)
                continue
            pid, _, title = frozen
            lost.update(pid=pid, title=title)
            cluster.remove_node(victim, allow_graceful=False)
            os.kill(pid, signal.SIGKILL)  # the frozen worker of the removed node, stopped since

    store_url = str(tmp_path / "mi")
    store, done_before = run_matrix_with_fault(pool, store_url, kill_node)
    n_tiles = (len(pool) // 24) * (len(pool) // 24 + 1) // 2
    assert lost, "no tile was seen running on the victim node before the matrix finished"
    assert name in lost["title"]  # frozen mid-tile, its parent the victim's raylet
    assert 0 < done_before < n_tiles, "the node must die mid-matrix"
    assert victim not in cluster.list_all_nodes()
    # Ray saw it too: a tile attempt that ran on the removed node failed with it and was retried
    victim_id = bytes.fromhex(victim.node_id)
    retried = retried_attempts(name, lambda e: e.state_updates.node_id == victim_id
                               and e.state_updates.HasField("error_info"))
    assert retried, "no tile attempt on the removed node was retried"
    np.testing.assert_array_equal(store.to_dense(), clean_matrix)


def test_worker_killed_mid_matrix_loses_no_tile(cluster, pool, clean_matrix, tmp_path):
    """A tile worker of this test's cluster (its parent is one of the cluster's raylets) is
    SIGKILLed in the middle of a tile; the tile is retried and the matrix is unchanged."""
    ensure_workers(cluster)
    name = tile_task_name()
    raylets = {raylet_pid(n) for n in worker_nodes(cluster)}
    killed = {}

    def kill_worker():
        deadline = time.time() + 60
        while not killed and time.time() < deadline:
            frozen = freeze_a_running_task(raylets, name)  # only children of this cluster's raylets
            if frozen is None:
                time.sleep(0.001)
                continue
            pid, parent, title = frozen
            os.kill(pid, signal.SIGKILL)
            killed.update(pid=pid, parent=parent, title=title)

    store, _ = run_matrix_with_fault(pool, str(tmp_path / "mi"), kill_worker)
    assert killed, "no tile worker of this cluster was caught running a tile"
    assert killed["parent"] in raylets and name in killed["title"]
    assert proc_state(killed["pid"]) is None or proc_state(killed["pid"])[1] != killed["parent"]
    # the killed attempt failed and the task was retried (Ray's own record of attempts): a failed
    # tile attempt on the killed worker's node (its pid, when the worker reported it in time)
    node_id = bytes.fromhex(next(n.node_id for n in worker_nodes(cluster) if raylet_pid(n) == killed["parent"]))
    retried = retried_attempts(name, lambda e: e.state_updates.HasField("error_info") and (
        e.state_updates.worker_pid == killed["pid"] or e.state_updates.node_id == node_id
        or f"PID: {killed['pid']}" in e.state_updates.error_info.error_message))
    assert retried, "the killed tile task was not retried"
    np.testing.assert_array_equal(store.to_dense(), clean_matrix)


def test_job_killed_mid_matrix_reruns_only_missing_tiles(cluster, pool, clean_matrix, tmp_path):
    """The job's driver is SIGKILLed mid-matrix (its tasks die with it); a rerun into the same
    store computes only the tiles that are missing and gives the same matrix."""
    import subprocess
    import sys

    from drmi_ray.tiles import tile_grid

    ensure_workers(cluster)
    store_url = str(tmp_path / "mi")
    np.save(tmp_path / "pool.npy", pool)
    script = (
        "import numpy as np, ray\n"
        "from drmi_ray.matrix import compute_mi_matrix\n"
        f"ray.init(address={cluster.address!r}, log_to_driver=False)\n"
        f"compute_mi_matrix(np.load({str(tmp_path / 'pool.npy')!r}), {store_url!r}, tile_size=24, max_in_flight=2,"
        " progress=False)\n"
    )
    driver = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    try:
        deadline = time.time() + 120
        while count_files(store_url) < 8 and driver.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert driver.poll() is None, "the driver finished before it could be killed"
        os.kill(driver.pid, signal.SIGKILL)  # the driver this test started
    finally:
        driver.wait(timeout=60)
    time.sleep(1.0)  # tasks of the dead driver finish or are cancelled
    present = {tuple(int(x) for x in f[len("tile-"):-len(".parquet")].split("-"))
               for f in os.listdir(os.path.join(store_url, "tiles")) if f.startswith("tile-")}
    total = len(tile_grid(len(pool), 24))
    assert 0 < len(present) < total

    from drmi_ray.matrix import compute_mi_matrix

    store = compute_mi_matrix(pool, store_url, tile_size=24, progress=False)
    assert store.computed and not set(store.computed) & present  # only missing tiles were computed
    assert len(store.computed) <= total - len(present)
    assert count_files(store_url) == total
    np.testing.assert_array_equal(store.to_dense(), clean_matrix)


# --------------------------------------------------------------------------- optimizer actors

def test_optimizer_actor_killed_mid_search_gives_the_same_selection(cluster, pool, clean_matrix, tmp_path):
    """Shard actors (one per node) read their rows from the tile store; from round 2 on, one of
    them is SIGKILLed while it is executing a call (frozen first, its title naming the method).
    It is restarted from its constructor, the interrupted call is retried, the driver re-sends the
    applied state, and the selection equals the clean run's."""
    import ray

    from drmi_ray.matrix import compute_mi_matrix
    from drmi_ray.optimize import objective, select_distributed

    ensure_workers(cluster)
    raylets = {raylet_pid(n) for n in worker_nodes(cluster)}
    store_url = str(tmp_path / "mi")
    compute_mi_matrix(pool, store_url, tile_size=90, progress=False)
    kwargs = dict(k=20, num_actors=2, seed=3, mode="shards", iterations=3)
    clean = select_distributed(store_url, **kwargs)

    rounds, armed, finished, killed = [], threading.Event(), threading.Event(), {}

    def on_round(info):
        rounds.append(info["round"])
        if info["round"] >= 2 and not armed.is_set():
            killed["actor"] = info["actors"][0]
            armed.set()

    def kill_during_a_call():
        armed.wait(timeout=120)
        if not armed.is_set():
            return
        actor_id = killed["actor"]._actor_id.hex()
        pid = ray._private.state.actors(actor_id)["Pid"]
        while not finished.is_set():
            title = freeze_if_running(pid, raylets, lambda t: t.startswith("ray::") and "." in t.split(" ")[0])
            if title is None:
                time.sleep(0.0005)
                continue
            os.kill(pid, signal.SIGKILL)  # the victim actor's process, frozen in the middle of a call
            killed.update(pid=pid, title=title, rounds_done=len(rounds), restarts=ray._private.state.actors(actor_id)["NumRestarts"])
            return

    killer = threading.Thread(target=kill_during_a_call, daemon=True)
    killer.start()
    try:
        faulty = select_distributed(store_url, progress=on_round, **kwargs)
    finally:
        finished.set()
        killer.join(timeout=30)
    assert "pid" in killed, f"the shard actor was never caught executing a call (rounds {len(rounds)})"
    method = killed["title"].split(" ")[0]
    assert method.startswith("ray::_Shard.") and method != "ray::_Shard.__init__", killed["title"]
    assert killed["rounds_done"] >= 2 and killed["restarts"] == 0
    info = ray._private.state.actors(killed["actor"]._actor_id.hex())
    assert info["NumRestarts"] >= 1, info  # restarted after the crash
    assert info["Pid"] != killed["pid"]
    np.testing.assert_array_equal(faulty.indices, clean.indices)
    assert faulty.objective == pytest.approx(clean.objective, abs=1e-9)
    assert faulty.objective == pytest.approx(objective(clean_matrix, faulty.indices), rel=1e-12)
