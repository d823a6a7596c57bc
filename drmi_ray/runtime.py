"""What every stage's Ray tasks share: thread pools sized to the task's CPUs.

Ray sets ``OMP_NUM_THREADS`` to a task's (or actor's) ``num_cpus``, but numba sizes its pool to
every core of the node, and with numba's OpenMP threading layer, starting that pool (on the first
parallel call) also sets the OpenMP thread count that torch reads to every core. So a 1-CPU task
that computes MI with numba would run on every core and then train on every core. ``use_cpus``
starts numba's pool first, then sets both to one count.
"""

from __future__ import annotations

import os


def use_cpus(n: float | None = None) -> int:
    """Size torch's and numba's thread pools to ``n`` CPUs (default: ``OMP_NUM_THREADS``, which Ray
    sets to the task's ``num_cpus``; 1 when unset). Returns the thread count used."""
    import numba
    import torch

    if n is None:
        n = os.environ.get("OMP_NUM_THREADS", "1")
    threads = max(1, int(float(n)))
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # starts numba's pool
    torch.set_num_threads(threads)  # after it: starting the pool resets torch's count
    return threads
