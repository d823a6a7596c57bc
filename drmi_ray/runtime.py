"""What every stage shares: Ray start-up, the "drmi" logger, waiting on Ray refs with progress,
and thread pools sized to a task's CPUs.

- ``init_ray(address)``: attach to a cluster (``RAY_ADDRESS``, ``ray job submit``) or start Ray here.
- ``log``: the ``logging.getLogger("drmi")`` every stage reports through; ``setup_logging()``
  (called by the CLI and the run entry points) prints its INFO lines as ``[drmi] ...`` on stdout.
- ``completed(refs)`` / ``bounded(submit, items, window)``: results as Ray tasks finish, with a
  tqdm bar when given a description; ``bounded`` keeps at most ``window`` tasks in flight.
- ``use_cpus(n)``: torch and numba thread pools for a task of ``n`` CPUs (below).

Ray sets ``OMP_NUM_THREADS`` to a task's (or actor's) ``num_cpus``, but numba sizes its pool to
every core of the node, and with numba's OpenMP threading layer, starting that pool (on the first
parallel call) also sets the OpenMP thread count that torch reads to every core. So a 1-CPU task
that computes MI with numba would run on every core and then train on every core. ``use_cpus``
starts numba's pool first, then sets both to one count.
"""

from __future__ import annotations

import logging
import os
import sys

import ray
from tqdm.auto import tqdm

log = logging.getLogger("drmi")


class _Stdout(logging.StreamHandler):
    """A handler on whatever ``sys.stdout`` is at the time (pytest and notebooks swap it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """``[drmi] message`` lines on stdout for the "drmi" logger (once per process)."""
    if not any(isinstance(h, _Stdout) for h in log.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("[drmi] %(message)s"))
        log.addHandler(handler)
    log.setLevel(level)


def use_cpus(n: float | None = None) -> int:
    """Size torch's and numba's thread pools to ``n`` CPUs (default: ``OMP_NUM_THREADS``, which Ray
    sets to the task's ``num_cpus``; 1 when unset). Returns the thread count used."""
    import numba  # numba and torch load where work runs, not with the logger every module imports
    import torch

    if n is None:
        n = os.environ.get("OMP_NUM_THREADS", "1")
    threads = max(1, int(float(n)))
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # starts numba's pool
    torch.set_num_threads(threads)  # after it: starting the pool resets torch's count
    return threads


def init_ray(address: str | None = None, **ray_init_kwargs) -> None:
    """Attach to the cluster at ``address`` (or ``RAY_ADDRESS``, as under ``ray job submit``), or
    start a local Ray (``address="local"`` always does); nothing when Ray is already up in this
    process. ``ray_init_kwargs`` go to ``ray.init``."""
    if ray.is_initialized():
        return
    if (address or os.environ.get("RAY_ADDRESS") or "local") == "local":
        # a local Ray's processes inherit this environment: Ray Train's controller then polls its
        # workers every 0.2 s instead of 2 s, about 7 s less per TorchTrainer.fit at start and end
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    ray.init(address=address, **ray_init_kwargs)


def completed(refs: list, *, what: str | None = None):
    """Yield ``(index, result)`` for each of ``refs`` as its task finishes (``index`` into
    ``refs``); a tqdm bar named ``what`` counts them (none when ``what`` is None)."""
    index = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    with tqdm(total=len(refs), desc=what, disable=what is None, file=sys.stderr) as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            bar.update(1)
            yield index[ready[0]], ray.get(ready[0])


def gather(refs: list, *, what: str | None = None) -> list:
    """``ray.get(refs)`` (results in order) with ``completed``'s progress bar."""
    results = [None] * len(refs)
    for i, result in completed(refs, what=what):
        results[i] = result
    return results


def bounded(submit, items, window: int):
    """Yield ``(item, result)`` as tasks finish, where ``submit(item)`` starts one task and returns
    its ref, with at most ``window`` tasks in flight (the rest of ``items`` waits its turn)."""
    queue, pending = list(items), {}
    while queue or pending:
        while queue and len(pending) < window:
            item = queue.pop(0)
            pending[submit(item)] = item
        ready, _ = ray.wait(list(pending), num_returns=1)
        yield pending.pop(ready[0]), ray.get(ready[0])
