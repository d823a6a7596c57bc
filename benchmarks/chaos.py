"""Chaos test of the MI tile store: faults at random moments, then the matrix must be bit-exact.

    python benchmarks/chaos.py                          # 10,000 images, tiles of 1024
    python benchmarks/chaos.py --n 1500 --tile-size 256 # a couple of minutes on 2 cores

The MI stage (``compute_mi_matrix``) runs as a driver subprocess with its own Ray. While it runs,
a thread injects, every ``--fault-interval`` seconds on average: tile deleted, tile truncated, tile
emptied, bytes of a tile flipped in place, a tile worker killed (only this driver's Ray workers:
processes whose parent is the raylet below the driver subprocess), or the driver killed (with its
Ray). A killed or failed driver is restarted; this repeats until one driver finishes with faults
still being injected (or --max-runs). Then, with faults stopped:

1. every tile is read back through ``TileStore.read_tile``: each read must either raise (the damage
   is detected) or return the reference block bit for bit (a silent mismatch is a wrong answer);
2. one last driver reruns with ``check_data=True`` (also catches bytes flipped inside a page) and
   every tile must then equal the reference bit for bit.

The reference is ``mi.pairwise_mi`` on each tile's rows and columns (``pairwise_mi(pool[r])`` on
the diagonal, ``pairwise_mi(pool[r], pool[c])`` off it), kept as SHA-256 per tile, so a 10k pool
never needs the dense matrix in memory; it costs about as much as the matrix itself on one core.
Pools beyond the 5,000 bundled digits are shifted copies (``benchmarks/mi_scale.shifted_pool``).
Prints faults injected by kind, faults survived, wrong answers (must be 0) and the wall time,
with the machine (hostname, cores, load at start) and the command of the run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from drmi_ray.matrix import TileStore, tile_grid  # noqa: E402
from drmi_ray.mi import pairwise_mi  # noqa: E402
from mi_scale import shifted_pool  # noqa: E402

DRIVER = """
import sys, ray
sys.path.insert(0, {bench!r})
from mi_scale import shifted_pool
from drmi_ray.matrix import compute_mi_matrix
ray.init(address="local", num_cpus={cpus}, include_dashboard=False, log_to_driver=False)
s = compute_mi_matrix(shifted_pool({n}, seed={seed}), {store!r}, tile_size={tile}, progress=False,
                      check_data={check})
print("driver stats", s.stats, flush=True)
"""

TILE_FAULTS = ("delete", "truncate", "empty", "flip")


def _parents() -> dict[int, int]:
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                out[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return out


def _descendants(root: int) -> list[int]:
    parent, tree, frontier = _parents(), [], [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        tree += kids
        frontier = kids
    return tree


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _tile_workers(driver_pid: int) -> list[int]:
    """Ray worker processes of this driver's own Ray: children of the raylet below the driver."""
    tree = _descendants(driver_pid)
    raylets = [p for p in tree if "raylet" in _cmdline(p).split(" ")[0]]
    parent = _parents()
    # not ray::DashboardAgent / ray::RuntimeEnvAgent: the raylet dies with those
    return [p for p, pp in parent.items() if pp in raylets and _cmdline(p).startswith(("ray::_tile_task", "ray::IDLE"))]


def _kill_tree(pid: int):
    for p in [pid] + _descendants(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Chaos(threading.Thread):
    def __init__(self, store, interval, rng):
        super().__init__(daemon=True)
        self.store, self.interval, self.rng = store, interval, rng
        self.driver: subprocess.Popen | None = None
        self.may_kill_driver = False
        self.counts = {k: 0 for k in TILE_FAULTS + ("kill_worker", "kill_driver")}
        self.stop = threading.Event()
        self.log: list[str] = []

    def run(self):
        while not self.stop.wait(self.rng.expovariate(1 / self.interval)):
            kind = self.rng.choices(list(self.counts), weights=[3, 3, 2, 3, 4, 1])[0]
            try:
                if getattr(self, "_" + kind)():
                    self.counts[kind] += 1
                    self.log.append(kind)
            except OSError:  # the file moved under us (renamed, deleted): no fault this time
                pass

    def _tile(self):
        folder = os.path.join(self.store, "tiles")
        tiles = [f for f in os.listdir(folder) if f.startswith("tile-")] if os.path.isdir(folder) else []
        return os.path.join(folder, self.rng.choice(tiles)) if tiles else None

    def _delete(self):
        if path := self._tile():
            os.remove(path)
            return True

    def _truncate(self):
        if path := self._tile():
            os.truncate(path, self.rng.randrange(max(1, os.path.getsize(path))))
            return True

    def _empty(self):
        if path := self._tile():
            os.truncate(path, 0)
            return True

    def _flip(self):
        if (path := self._tile()) and (size := os.path.getsize(path)) > 0:
            with open(path, "r+b") as f:
                for _ in range(self.rng.randint(1, 8)):
                    f.seek(self.rng.randrange(size))
                    f.write(bytes([self.rng.randrange(256)]))
            return True

    def _kill_worker(self):
        if self.driver and self.driver.poll() is None and (workers := _tile_workers(self.driver.pid)):
            os.kill(self.rng.choice(workers), signal.SIGKILL)
            return True

    def _kill_driver(self):  # once its Ray runs tiles, at most once per driver run (so runs progress)
        if self.driver and self.driver.poll() is None and self.may_kill_driver and _tile_workers(self.driver.pid):
            self.may_kill_driver = False
            _kill_tree(self.driver.pid)
            return True


def run_driver(args, store, check=False, chaos: Chaos | None = None) -> int:
    code = DRIVER.format(bench=os.path.dirname(os.path.abspath(__file__)), cpus=args.num_cpus, n=args.n,
                         seed=args.seed, store=store, tile=args.tile_size, check=check)
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    if chaos:
        chaos.driver, chaos.may_kill_driver = proc, True
    out = proc.communicate()[0]
    if chaos:
        print(f"  faults during this run: {', '.join(chaos.log) or 'none'}", flush=True)
        chaos.log.clear()
    _kill_tree(proc.pid)  # its Ray, if anything is left of it
    lines = [ln for ln in out.splitlines() if ln.startswith(("driver stats", "MI store")) or "Error" in ln]
    print(f"  driver rc={proc.returncode}: " + (" | ".join(lines[-3:]) if lines else "(no output)"), flush=True)
    return proc.returncode


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10_000, help="pool size (default 10000)")
    p.add_argument("--tile-size", type=int, default=1024, help="tile rows/columns (default 1024)")
    p.add_argument("--store", help="tile store folder (default: a new temporary folder)")
    p.add_argument("--fault-interval", type=float, default=1.0, help="mean seconds between faults (default 1)")
    p.add_argument("--max-runs", type=int, default=40, help="driver runs under chaos at most (default 40)")
    p.add_argument("--rounds", type=int, default=3,
                   help="driver runs that must finish under chaos before it stops (default 3)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of each driver's Ray (default 2)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    store = args.store or os.path.join(tempfile.mkdtemp(prefix="drmi-chaos-"), "store")
    command = " ".join(["python benchmarks/chaos.py", *(sys.argv[1:] if argv is None else argv)])
    machine = (f"machine {socket.gethostname()} ({os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f} at start); "
               f"run `{command}` started {time.strftime('%Y-%m-%d %H:%M:%S')}")
    print(machine, flush=True)
    start = time.perf_counter()

    pool = shifted_pool(args.n, seed=args.seed)
    t = args.tile_size
    print(f"reference: pairwise_mi per tile of {args.n} images, tile {t} ...", flush=True)
    ref = {}
    for i, j in tile_grid(args.n, t):
        r, c = pool[i * t:(i + 1) * t], pool[j * t:(j + 1) * t]
        ref[i, j] = hashlib.sha256(np.ascontiguousarray(pairwise_mi(r) if i == j else pairwise_mi(r, c))).hexdigest()
    print(f"  {len(ref)} tiles in {time.perf_counter() - start:.0f} s; store {store}", flush=True)

    chaos = Chaos(store, args.fault_interval, random.Random(args.seed))
    chaos.start()
    runs, finished = 0, 0
    while runs < args.max_runs and finished < args.rounds:
        runs += 1
        finished += run_driver(args, store, chaos=chaos) == 0
    chaos.stop.set()
    chaos.join()
    injected = sum(chaos.counts.values())
    print(f"chaos over after {runs} driver runs ({finished} finished under chaos); faults {chaos.counts}", flush=True)

    wrong, detected, fine = 0, 0, 0
    reader = TileStore(store)
    for (i, j), digest in ref.items():  # every read: detected, or bit-exact
        try:
            block = reader.read_tile(i, j)
        except (ValueError, FileNotFoundError) as e:
            detected += 1
            print(f"  refused tile ({i}, {j}): {str(e).split(';')[0][-110:]}", flush=True)
            continue
        if hashlib.sha256(np.ascontiguousarray(block)).hexdigest() == digest:
            fine += 1
        else:
            wrong += 1
            print(f"  WRONG: tile ({i}, {j}) read back without error but differs from pairwise_mi", flush=True)
    print(f"read-back under damage: {fine} exact, {detected} refused with an error, {wrong} wrong", flush=True)

    final_rc = run_driver(args, store, check=True)
    final_wrong = 0
    reader = TileStore(store)
    for (i, j), digest in ref.items():
        try:
            ok = hashlib.sha256(np.ascontiguousarray(reader.read_tile(i, j))).hexdigest() == digest
        except (ValueError, FileNotFoundError) as e:
            ok = False
            print(f"  final tile ({i}, {j}) unreadable: {e}", flush=True)
        final_wrong += not ok
    wrong += final_wrong
    survived = injected if final_rc == 0 and final_wrong == 0 else 0
    print(f"faults injected: {injected}  survived: {survived}  wrong answers: {wrong}  "
          f"final matrix bit-exact vs pairwise_mi: {final_rc == 0 and final_wrong == 0}  "
          f"wall: {time.perf_counter() - start:.0f} s\n{machine}")
    return 0 if wrong == 0 and final_rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
