"""Chaos tests: the MI tile store (faults at random moments, then the matrix must be bit-exact),
and with ``--journal N`` the target's journal (N random damages to its tail and mark).

    python benchmarks/chaos.py                          # 10,000 images, tiles of 1024
    python benchmarks/chaos.py --n 1500 --tile-size 256 # a couple of minutes on 2 cores
    python benchmarks/chaos.py --journal 1000           # journal damages only: seconds, no Ray

**The journal case** (``--journal N``) builds a ledger journal (3 keys, 60 paid requests), then
N times: copies it, damages the copy one random way (truncate at any byte or at a line boundary,
empty or delete it, flip a bit in the last complete record or anywhere, overwrite bytes, take a
line out, damage or delete the high-water mark; or the two crashes a ledger must survive: a torn
last line past the mark, and the mark one record behind) and opens a ``Ledger`` on it. Each
outcome is one of: refused (``JournalCorrupt``, one line); accepted and exact (every key's spent
budget and every stored answer as written; after a torn tail: as before the unanswered request);
a refund (accepted with less spent or a paid answer missing) or a wrong answer (any other
difference). Goal: zero refunds and zero wrong answers.

The MI stage (``compute_mi_matrix``) runs as a driver subprocess with its own Ray. While it runs,
a thread injects, every ``--fault-interval`` seconds on average: tile deleted, tile truncated, tile
emptied, bytes of a tile flipped in place, a worker killed while it computes a tile (a worker of
this driver's own Ray, a child of the raylet below the driver subprocess, whose process title is
``ray::_tile_task``: idle ``ray::IDLE`` workers are never killed, so each kill counted costs Ray a
tile in flight and its retry), or the driver killed (with its Ray) once a tile is in flight. A
killed or failed driver is restarted; this repeats until ``--rounds`` drivers finish with faults
still being injected (or --max-runs). Then, with faults stopped:

1. every tile is read back through ``TileStore.read_tile``: each read must either raise (the damage
   is detected) or return the reference block bit for bit (a silent mismatch is a wrong answer);
2. one last driver reruns with ``check_data=True`` (also catches bytes flipped inside a page) and
   every tile must then equal the reference bit for bit.

The reference is ``mi.pairwise_mi`` on each tile's rows and columns (``pairwise_mi(pool[r])`` on
the diagonal, ``pairwise_mi(pool[r], pool[c])`` off it), kept as SHA-256 per tile, so a 10k pool
never needs the dense matrix in memory; it costs about as much as the matrix itself on one core.
Pools beyond the 5,000 bundled digits are shifted copies (``benchmarks/mi_scale.shifted_pool``).
Prints faults injected by kind (``kill_worker_mid_tile``: workers killed mid-tile), faults
survived, wrong answers (must be 0) and the wall time, with the machine (hostname, cores, load at
start) and the command of the run.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import random
import shutil
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

from drmi_ray.data import bundled_mnist  # noqa: E402
from drmi_ray.ledger import Ledger, Refused, images_digest, new_operator_key  # noqa: E402
from drmi_ray.mi import pairwise_mi  # noqa: E402
from drmi_ray.service_journal import JournalCorrupt  # noqa: E402
from drmi_ray.tiles import TileStore, tile_grid  # noqa: E402
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


TILE_TITLE = "ray::_tile_task"  # a Ray worker's title while it runs matrix._tile_task ("ray::IDLE" between)


def _busy_tile_workers(driver_pid: int) -> list[int]:
    """Workers of this driver's own Ray (children of the raylet below the driver) computing a tile
    now; never idle workers, nor ray::DashboardAgent / ray::RuntimeEnvAgent (the raylet dies with those)."""
    tree = _descendants(driver_pid)
    raylets = [p for p in tree if "raylet" in _cmdline(p).split(" ")[0]]
    parent = _parents()
    return [p for p, pp in parent.items() if pp in raylets and _cmdline(p).startswith(TILE_TITLE)]


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
        self.counts = {k: 0 for k in TILE_FAULTS + ("kill_worker_mid_tile", "kill_driver")}
        self.stop = threading.Event()
        self.log: list[str] = []
        self.tile_failures = 0  # "Task _tile_task failed ... retried" lines in the drivers' output: Ray's own count

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

    def _kill_worker_mid_tile(self):
        if self.driver and self.driver.poll() is None and (workers := _busy_tile_workers(self.driver.pid)):
            pid = self.rng.choice(workers)
            if _cmdline(pid).startswith(TILE_TITLE):  # still on its tile (a tile takes far longer than this check)
                os.kill(pid, signal.SIGKILL)
                return True

    def _kill_driver(self):  # once a tile is in flight, at most once per driver run (so runs progress)
        if (self.driver and self.driver.poll() is None and self.may_kill_driver
                and _busy_tile_workers(self.driver.pid)):
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
        failures = out.count("Task _tile_task failed")
        chaos.tile_failures += failures
        print(f"  faults during this run: {', '.join(chaos.log) or 'none'}; tile tasks Ray reported failed: "
              f"{failures}", flush=True)
        chaos.log.clear()
    _kill_tree(proc.pid)  # its Ray, if anything is left of it
    lines = [ln for ln in out.splitlines() if ln.startswith(("driver stats", "MI store")) or "Error" in ln]
    if proc.returncode not in (0, -signal.SIGKILL) and out.strip():  # a driver that failed on its own: why
        lines.append(out.strip().splitlines()[-1])
    print(f"  driver rc={proc.returncode}: " + (" | ".join(lines[-3:]) if lines else "(no output)"), flush=True)
    return proc.returncode


JOURNAL_DAMAGES = ("truncate", "truncate_line", "empty", "delete", "flip_last", "flip_any", "overwrite", "drop_line",
                   "mark_flip", "mark_truncate", "mark_delete", "torn_tail", "mark_behind")


def _ledger_state(ledger, asked):
    """Per key: (spent, {request id: stored answer}) for the requests in ``asked`` (name -> {rid: images})."""
    state = {}
    for name, requests in asked.items():
        try:
            spent, answers = ledger.usage(name)["used"], {}
        except Refused:  # the key itself is gone
            state[name] = (0, {})
            continue
        for rid, images in requests.items():
            status, stored = ledger.begin(name, rid, len(images), images_digest(images))
            if status == "stored":
                answers[rid] = stored
        state[name] = (spent, answers)
    return state


def journal_chaos(damages: int, seed: int) -> int:
    """The journal case (module doc); returns the number of refunds and wrong answers."""
    rng, images = random.Random(seed), bundled_mnist()[0]
    service, operator = {"checkpoint_sha256": "ab" * 32, "output": "label", "decimals": None}, new_operator_key()
    folder = tempfile.mkdtemp(prefix="drmi-journal-chaos-")
    path = os.path.join(folder, "journal.jsonl")
    ledger = Ledger(path, operator, service)
    asked = {}  # name -> {rid: images}
    for k, name in enumerate(("a", "b", "c")):
        ledger.create_key(name, budget=10_000, prada_delta=0.95 if k == 0 else None)
        asked[name] = {}
    for i in range(60):
        name, n = "abc"[i % 3], 1 + i % 7
        batch = images[i * 8:i * 8 + n]
        if i == 59:  # the files before the last request: a torn last line leaves these
            before = (open(path, "rb").read(), open(path + ".mark", "rb").read())
        ledger.commit(name, f"r{i}", *_go(ledger, name, f"r{i}", batch), batch)
        asked[name][f"r{i}"] = batch
    ledger.close()
    after = (open(path, "rb").read(), open(path + ".mark", "rb").read())
    ledger = Ledger(path, operator, service)
    expected_after = _ledger_state(ledger, asked)
    ledger.close()
    # after a torn last line: the last request (key "c", r59) unanswered, everything else as written
    expected_before = dict(expected_after)
    expected_before["c"] = (expected_after["c"][0] - len(asked["c"]["r59"]),
                            {r: a for r, a in expected_after["c"][1].items() if r != "r59"})

    counts = {k: collections.Counter() for k in JOURNAL_DAMAGES}
    trial = os.path.join(folder, "trial")
    os.makedirs(trial)
    for t in range(damages):
        kind = rng.choice(JOURNAL_DAMAGES)
        journal, mark, expected = bytearray(after[0]), bytearray(after[1]), expected_after
        lines = bytes(journal).split(b"\n")[:-1]
        if kind == "truncate":
            del journal[rng.randrange(len(journal)):]
        elif kind == "truncate_line":
            del journal[sum(len(x) + 1 for x in lines[:rng.randrange(len(lines))]):]
        elif kind == "empty":
            journal = bytearray()
        elif kind in ("flip_last", "flip_any"):
            start = len(journal) - len(lines[-1]) - 1 if kind == "flip_last" else 0
            journal[rng.randrange(start, len(journal))] ^= 1 << rng.randrange(8)
        elif kind == "overwrite":
            at = rng.randrange(len(journal))
            journal[at:at + rng.randint(1, 8)] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif kind == "drop_line":
            drop = rng.randrange(len(lines))
            journal = bytearray(b"".join(x + b"\n" for i, x in enumerate(lines) if i != drop))
        elif kind == "mark_flip":
            mark[rng.randrange(len(mark))] ^= 1 << rng.randrange(8)
        elif kind == "mark_truncate":
            del mark[rng.randrange(len(mark)):]
        elif kind == "torn_tail":  # a crash mid-append of the last record: part of its line, the old mark
            torn = after[0][len(before[0]):]
            journal, mark, expected = bytearray(before[0] + torn[:rng.randrange(1, len(torn))]), before[1], expected_before
        elif kind == "mark_behind":  # a crash between the last record's fsync and its mark
            mark = before[1]
        shutil.rmtree(trial)
        os.makedirs(trial)
        tpath = os.path.join(trial, "journal.jsonl")
        if kind != "delete":
            open(tpath, "wb").write(journal)
        if kind != "mark_delete":
            open(tpath + ".mark", "wb").write(mark)
        try:
            ledger = Ledger(tpath, operator, service)
        except (JournalCorrupt, ValueError) as e:
            counts[kind]["refused"] += 1
            assert len(str(e).splitlines()) == 1
            continue
        state = _ledger_state(ledger, asked)
        ledger.close()
        if state == expected:
            counts[kind]["exact"] += 1
        elif all(state[m][0] <= expected[m][0] and set(state[m][1]) <= set(expected[m][1]) for m in state):
            counts[kind]["refund"] += 1
            print(f"  REFUND: damage {t} ({kind}) accepted with less spent than written", flush=True)
        else:
            counts[kind]["wrong"] += 1
            print(f"  WRONG: damage {t} ({kind}) accepted with answers other than written", flush=True)
    shutil.rmtree(folder)
    print("| damage | tried | refused | accepted, exact | refunds | wrong answers |\n|---|---:|---:|---:|---:|---:|")
    for kind, c in counts.items():
        print(f"| {kind} | {sum(c.values())} | {c['refused']} | {c['exact']} | {c['refund']} | {c['wrong']} |")
    total = sum(counts.values(), collections.Counter())
    print(f"journal damages: {damages}  refused: {total['refused']}  accepted exact: {total['exact']} (torn tails "
          f"{counts['torn_tail']['exact']}, mark one behind {counts['mark_behind']['exact']})  refunds: "
          f"{total['refund']}  wrong answers: {total['wrong']}", flush=True)
    return total["refund"] + total["wrong"]


def _go(ledger, name, rid, batch):
    digest = images_digest(batch)
    assert ledger.begin(name, rid, len(batch), digest)[0] == "go"
    labels = [int(x) % 10 for x in batch.reshape(len(batch), -1).sum(1)]
    return digest, labels, labels


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
    p.add_argument("--journal", type=int, metavar="N", help="run only the journal case, with N random damages")
    args = p.parse_args(argv)
    if args.journal is not None:
        command = " ".join(["python benchmarks/chaos.py", *(sys.argv[1:] if argv is None else argv)])
        print(f"machine {socket.gethostname()} ({os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f} at start); "
              f"run `{command}` started {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
        start = time.perf_counter()
        bad = journal_chaos(args.journal, args.seed)
        print(f"wall: {time.perf_counter() - start:.1f} s")
        return 0 if bad == 0 else 1
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
    print(f"chaos over after {runs} driver runs ({finished} finished under chaos); faults by kind {chaos.counts}; "
          f"workers killed while computing a tile: {chaos.counts['kill_worker_mid_tile']} (idle workers are never "
          f"killed), tile tasks Ray reported failed: {chaos.tile_failures} (a driver killed soon after may not print "
          "its last)", flush=True)

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
