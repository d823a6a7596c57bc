"""Stage throughput of jobs/imagenet.py end to end on real JPEG trees: decode, MI, selection.

    python benchmarks/reduce_scale.py                                 # 100k digits + 10k photos
    python benchmarks/reduce_scale.py --digits 2000 --photos 100      # a small try-out
    python benchmarks/reduce_scale.py --only digits --matrix-n 3000 --json runs/reduce-scale.json
    python benchmarks/reduce_scale.py --generate-only                 # only make the trees

Two ImageFolder trees of real JPEG files are made once under ``--cache`` (default
``~/.cache/drmi-ray/reduce-scale``) and reused; a run that is killed while making them continues
where it stopped (files that exist are kept; each file is written under a temporary name and
renamed). Making them uses ``--workers`` processes (spawn start method: fork hangs after torch or
numba have started threads).

  digits  ``--digits`` images (default 100,000 -> folder ``digits100k``), class folders of 100.
          Each is one of the 5,000 bundled real MNIST digits (``drmi_ray.data.bundled_mnist``;
          class c holds digits of label c mod 10) resized to 64x64, shifted by up to 4 pixels
          and given Gaussian pixel noise (sigma 12), grey JPEG at quality 90 (about 2 KB).
  photos  ``--photos`` images (default 10,000 -> folder ``photos10k``), class folders of 100.
          ImageNet-sized RGB 400x350 JPEGs at quality 90, about 100 KB each (the average is
          printed): a smooth random colour field, two sinusoidal gratings, 2-pixel grain and
          per-pixel noise. Synthetic: what they measure is the decode cost of a photo-sized file.

Other sizes go to their own folders (``digits-n2000``, ``photos-n100``), so a small run never
mixes with the full trees. Every image is seeded by (--seed, tree, class, index).

Then, for each tree, the job runs as a user would run it:

    python jobs/imagenet.py --data TREE --budget K --out OUT --partition kmeans --size 64
           [--tile-size T] [JOB_ARGS]

K = 1 % of the pool (``--budget-frac``). Both trees are reduced at 64x64 grey, the resolution of
the capacity plan's main scenario (``--photos-rgb`` adds ``--rgb`` to the photos' job; RGB MI
costs about three times as much on the CPU). The job attaches (RAY_ADDRESS) to a Ray head this
benchmark starts itself (``ray start --head --block`` with its own short --temp-dir and free
ports, no dashboard) and stops at the end by signalling that process and then ending, by pid,
any process left whose command line names its temp dir; it never runs ``ray stop``.

Ray 2.60 turns token authentication on for ``ray start --head`` when a token exists
(``~/.ray/auth_token``, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH), but a driver given an address
(RAY_ADDRESS or ``ray.init(address=...)``) never turns it on by itself: it fails with
"Authentication token is missing". So one mode is chosen (your RAY_AUTH_MODE if set, else
``token`` when a token exists, else ``disabled`` as ``ray start`` itself would) and passed as
RAY_AUTH_MODE to the head, to the job and to this process before it imports Ray (Ray reads the
variable at import).

While each job runs, a thread samples every 0.25 s:
  * the job driver's RSS (psutil on the job process: it is the driver) and with its children;
  * the object store's used bytes, from the head's Prometheus endpoint
    (``ray start --metrics-export-port``): the documented system metric ``ray_object_store_memory``
    summed over Location MMAP_SHM and MMAP_DISK (in-memory and fallback-mmapped objects) and over
    nodes; SPILLED is reported apart. The raylet publishes it every 0.5 s here
    (RAY_metrics_report_interval_ms=500 for the head), so a peak shorter than that can be missed.
    No state API: that needs the dashboard.

After each job it reads ``OUT/selection.json`` and prints a stage table: images/s decoded, MI
pairs and pairs/s, selection time, wall, driver peak, object-store peak. It reads
``seconds.{list,decode,partition,mi,select,total}`` and ``stats.{decoded_images_per_s, mi_pairs,
mi_pairs_per_s}`` when the job writes them; otherwise MI pairs = sum over computed partitions of
size*(size-1)/2, the decode rate comes from the job's last ``decode:`` log line (marked "log"),
and what is still missing prints as n/a. It also times ``data.decode_image`` on the first
``--decode-sample`` files of each tree in this one process (no Ray): images/s per core, the
figure the capacity plan's decode stage takes.

For the digits tree, on the same head after the job: ``compute_mi_matrix`` over the first
``--matrix-n`` decoded images (default 3,000; same size and tile side as the job) into a temp
store, after a warm-up; its pairs/s is printed beside the job's MI-stage pairs/s with the ratio
(the goal: the job's MI stage at least 0.5x one big matrix).

``--json PATH`` writes every figure (and the machine) as JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PER_CLASS = 100  # images per class folder, both trees
QUALITY = 90  # JPEG quality, both trees
FULL = {"digits": 100_000, "photos": 10_000}
TREE_VERSION = 1  # bump when the generators change: an old tree is then refused, not mixed
DIGIT_SIDE, DIGIT_SHIFT, DIGIT_NOISE = 64, 4, 12.0
PHOTO_W, PHOTO_H, PHOTO_NOISE, PHOTO_GRAIN = 400, 350, 28.0, 24.0
METRICS_INTERVAL_MS = 500


# --------------------------------------------------------------------------- 1. the trees

def tree_name(kind: str, n: int) -> str:
    return f"{kind}{n // 1000}k" if n == FULL[kind] else f"{kind}-n{n}"


def tree_spec(kind: str, n: int, seed: int) -> dict:
    spec = {"kind": kind, "n": n, "per_class": PER_CLASS, "seed": seed, "quality": QUALITY, "version": TREE_VERSION}
    if kind == "digits":
        spec.update(side=DIGIT_SIDE, shift=DIGIT_SHIFT, noise=DIGIT_NOISE, source="drmi_ray.data.bundled_mnist")
    else:
        spec.update(width=PHOTO_W, height=PHOTO_H, noise=PHOTO_NOISE, grain=PHOTO_GRAIN)
    return spec


def digit_image(digits: np.ndarray, labels: np.ndarray, cls: int, j: int, seed: int):
    """One 64x64 grey digit of label cls mod 10: resized, shifted, noisy (a PIL image)."""
    from PIL import Image

    rng = np.random.default_rng([seed, 0, cls, j])
    pool = np.flatnonzero(labels == cls % 10)
    src = Image.fromarray(digits[rng.choice(pool)]).resize((DIGIT_SIDE, DIGIT_SIDE), Image.BILINEAR)
    dy, dx = rng.integers(-DIGIT_SHIFT, DIGIT_SHIFT + 1, size=2)
    x = np.roll(np.asarray(src, dtype=np.float32), (int(dy), int(dx)), axis=(0, 1))  # margins are black
    x += rng.normal(0.0, DIGIT_NOISE, size=x.shape).astype(np.float32)
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8), mode="L")


_GRID = None


def photo_image(cls: int, j: int, seed: int):
    """One 400x350 RGB 'photo': colour field + two gratings + grain + pixel noise (a PIL image)."""
    from PIL import Image

    global _GRID
    if _GRID is None:
        _GRID = np.mgrid[0:PHOTO_H, 0:PHOTO_W].astype(np.float32)
    yy, xx = _GRID
    rng = np.random.default_rng([seed, 1, cls, j])
    gh, gw = rng.integers(3, 9, size=2)
    field = Image.fromarray(rng.integers(0, 256, size=(gh, gw, 3), dtype=np.uint8))
    x = np.asarray(field.resize((PHOTO_W, PHOTO_H), Image.BICUBIC), dtype=np.float32).copy()
    for _ in range(2):
        f, th, ph = rng.uniform(0.02, 0.25), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        wave = np.sin((2 * np.pi * f) * (xx * np.cos(th) + yy * np.sin(th)) + ph)
        x += wave[..., None] * (rng.uniform(8, 30) * rng.uniform(0.5, 1.0, size=3).astype(np.float32))
    grain = rng.standard_normal(size=(PHOTO_H // 2, PHOTO_W // 2), dtype=np.float32)
    x += np.repeat(np.repeat(grain, 2, 0), 2, 1)[..., None] * PHOTO_GRAIN
    x += rng.standard_normal(size=x.shape, dtype=np.float32) * PHOTO_NOISE
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8), mode="RGB")


_DIGITS = None


def _init_worker(digits):
    global _DIGITS
    _DIGITS = digits


def _make_class(job) -> tuple[int, int]:
    """Write the missing files of one class folder; returns (written, already there)."""
    kind, root, cls, count, seed = job
    folder = os.path.join(root, f"c{cls:04d}")
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):  # leftovers of a killed run (never listed by the job: not .jpg)
        path = os.path.join(folder, name)
        if ".part" in name and time.time() - os.path.getmtime(path) > 60:
            os.remove(path)
    written = 0
    for j in range(count):
        final = os.path.join(folder, f"{j:05d}.jpg")
        if os.path.exists(final):
            continue
        img = digit_image(*_DIGITS, cls, j, seed) if kind == "digits" else photo_image(cls, j, seed)
        tmp = f"{final}.part{os.getpid()}"
        img.save(tmp, format="JPEG", quality=QUALITY)
        os.replace(tmp, final)
        written += 1
    return written, count - written


def make_tree(kind: str, n: int, cache: str, *, workers: int, seed: int) -> str:
    """The tree's folder, made (or completed) first; prints progress and the average file size."""
    root = os.path.join(cache, tree_name(kind, n))
    spec = tree_spec(kind, n, seed)
    spec_path = os.path.join(root, "tree.json")
    os.makedirs(root, exist_ok=True)
    if os.path.exists(spec_path):
        with open(spec_path) as f:
            old = json.load(f)
        if {k: v for k, v in old.items() if k != "complete"} != spec:
            raise SystemExit(f"{root} was made with other settings ({old}); remove it or use another --cache")
        complete = old.get("complete", False)
    else:
        complete = False
        with open(spec_path, "w") as f:
            json.dump(spec, f)
    n_files = count_files(root)
    if not (complete and n_files == n):
        jobs = [(kind, root, c, min(PER_CLASS, n - c * PER_CLASS), seed) for c in range(-(-n // PER_CLASS))]
        digits = None
        if kind == "digits":
            from drmi_ray.data import bundled_mnist

            digits = bundled_mnist()
        print(f"{tree_name(kind, n)}: making {n:,} images in {len(jobs)} class folders under {root} "
              f"({n_files:,} there already), {workers} processes", flush=True)
        t0, last, done, written, kept = time.perf_counter(), 0.0, 0, 0, 0
        with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(digits,)) as pool:
            for w, k in pool.imap_unordered(_make_class, jobs):
                done, written, kept = done + 1, written + w, kept + k
                now = time.perf_counter()
                if now - last > 10 or done == len(jobs):
                    rate = written / max(now - t0, 1e-9)
                    left = n - written - kept
                    eta = f", ETA {left / rate:.0f} s" if rate and left else ""
                    print(f"  {tree_name(kind, n)}: {done}/{len(jobs)} folders, {written:,} written, "
                          f"{kept:,} already there, {rate:,.0f} images/s{eta}", flush=True)
                    last = now
        with open(spec_path, "w") as f:
            json.dump({**spec, "complete": True}, f)
    return root


def count_files(root: str) -> int:
    return sum(1 for _ in _jpegs(root))


def tree_files(root: str) -> list[str]:
    """The tree's JPEG paths, sorted: the order the job lists them in."""
    return sorted(e.path for e in _jpegs(root))


def _jpegs(root: str):
    for entry in os.scandir(root):
        if entry.is_dir():
            yield from (e for e in os.scandir(entry.path) if e.name.endswith(".jpg"))


def tree_bytes(root: str) -> tuple[int, int]:
    sizes = [e.stat().st_size for e in _jpegs(root)]
    return len(sizes), sum(sizes)


def decode_files(files: list[str], size: int, mode: str) -> list:
    """Read and decode files with ``data.decode_image`` (what each of the job's decode tasks does
    per file); None for a file that does not decode."""
    from drmi_ray.data import decode_image

    out = []
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        try:
            out.append(decode_image(data, size=size, mode=mode))
        except ValueError:
            out.append(None)
    return out


def decode_one_process(root: str, n: int, size: int, mode: str) -> dict:
    """images/s of reading + ``decode_image`` on the tree's first n files, in this process (one core)."""
    files = tree_files(root)[:n]
    decode_files(files[:8], size, mode)  # imports, warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    arrays = decode_files(files, size, mode)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    # per CPU-second: what one core does when this process has it to itself (other load on the
    # machine lowers the wall rate, not this one)
    return {"images": len(files), "seconds": round(seconds, 3), "images_per_s": len(files) / seconds,
            "cpu_seconds": round(cpu_seconds, 3), "images_per_cpu_s": len(files) / max(cpu_seconds, 1e-9),
            "skipped": sum(a is None for a in arrays)}


# --------------------------------------------------------------------------- 2. the Ray head

def _psutil():
    """psutil: Ray ships its own copy (ray/thirdparty_files), on sys.path once Ray is imported;
    call only after main() has set RAY_AUTH_MODE."""
    import ray  # noqa: F401  (puts ray/thirdparty_files on sys.path)
    import psutil

    return psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def auth_mode() -> tuple[str, str]:
    """(RAY_AUTH_MODE for head, job and this process, why)."""
    if os.environ.get("RAY_AUTH_MODE"):
        return os.environ["RAY_AUTH_MODE"], "RAY_AUTH_MODE from the environment"
    if (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
            or (Path.home() / ".ray" / "auth_token").exists()):
        return "token", "a Ray auth token exists"
    return "disabled", "no Ray auth token here (what `ray start --head` does then)"


class RayHead:
    """``ray start --head --block`` in its own session, own temp dir and ports; ``stop`` ends only
    that process tree (SIGTERM to ray start, then any process naming the temp dir, by pid)."""

    def __init__(self, *, num_cpus: int | None, env: dict, log_dir: str):
        self.temp_dir = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # short: socket paths are limited
        self.port, self.metrics_port = free_port(), free_port()
        cmd = ["ray", "start", "--head", "--block", "--temp-dir", self.temp_dir, "--port", str(self.port),
               "--include-dashboard=false", "--dashboard-port", str(free_port()),
               "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()),
               "--metrics-export-port", str(self.metrics_port), "--disable-usage-stats"]
        if num_cpus:
            cmd += ["--num-cpus", str(num_cpus)]
        self.log = os.path.join(log_dir, "ray-head.log")
        env = dict(env, RAY_metrics_report_interval_ms=str(METRICS_INTERVAL_MS))
        self.proc = subprocess.Popen(cmd, env=env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.address = None

    def wait(self, timeout: float = 300) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}; see {self.log}:\n{_tail(self.log)}")
            text = Path(self.log).read_text(errors="replace")
            if "Ray runtime started" in text:
                found = re.search(r"--address='([^']+)'", text)
                self.address = found.group(1) if found else f"127.0.0.1:{self.port}"
                return self.address
            time.sleep(0.5)
        raise RuntimeError(f"ray start did not come up in {timeout:.0f} s; see {self.log}")

    def stop(self) -> None:
        psutil = _psutil()

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # ray start --block drains and ends its processes
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        left = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if self.temp_dir in " ".join(p.info["cmdline"] or []):
                    left.append(p)
            except (psutil.Error, TypeError):
                continue
        for p in left:
            try:
                p.terminate()
            except psutil.Error:
                pass
        for p in psutil.wait_procs(left, timeout=10)[1]:
            try:
                p.kill()
            except psutil.Error:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _tail(path: str, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------- 3. sampling

def object_store_bytes(metrics_url: str) -> tuple[int, int] | None:
    """(used, spilled) bytes over all nodes from Ray's Prometheus endpoint; None when unreachable."""
    try:
        text = urllib.request.urlopen(metrics_url, timeout=2).read().decode()
    except OSError:
        return None
    used = spilled = 0.0
    seen = False
    for line in text.splitlines():
        if not line.startswith("ray_object_store_memory{"):
            continue
        labels, value = line.rsplit(" ", 1)
        location = re.search(r'Location="([^"]*)"', labels)
        where = location.group(1) if location else ""
        seen = True
        if where in ("MMAP_SHM", "MMAP_DISK"):
            used += float(value)
        elif where == "SPILLED":
            spilled += float(value)
    return (int(used), int(spilled)) if seen else None


class Sampler:
    """Peaks of the job driver's RSS (alone and with its children) and of the object store."""

    def __init__(self, pid: int, metrics_url: str, interval: float = 0.25):
        self.pid, self.url, self.interval = pid, metrics_url, interval
        self.driver = self.driver_tree = 0
        self.store = self.spilled = None
        self.store_samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        psutil = _psutil()

        try:
            proc = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            try:
                rss = proc.memory_info().rss
                kids = sum(c.memory_info().rss for c in proc.children(recursive=True))
                self.driver, self.driver_tree = max(self.driver, rss), max(self.driver_tree, rss + kids)
            except psutil.Error:
                pass
            got = object_store_bytes(self.url)
            if got is not None:
                self.store = max(self.store or 0, got[0])
                self.spilled = max(self.spilled or 0, got[1])
                self.store_samples += 1
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- 4. the job

DECODE_LINE = re.compile(r"\[(?:imagenet|drmi)\] decode: (\d+)/(\d+) units, (\d+) images, (\d+) skipped, (\d+) images/s")


def run_job(tree: str, out: str, *, budget: int, size: int, rgb: bool, tile_size: int, job_args: list[str],
            env: dict, metrics_url: str, quiet: bool) -> dict:
    """Run jobs/imagenet.py on the tree as a subprocess; returns its wall, peaks, log decode rate."""
    cmd = [sys.executable, "jobs/imagenet.py", "--data", tree, "--budget", str(budget), "--out", out,
           "--partition", "kmeans", "--size", str(size), "--tile-size", str(tile_size)]
    cmd += (["--rgb"] if rgb else []) + job_args
    print("  $ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    os.makedirs(out, exist_ok=True)
    log_path = os.path.join(out, "job.log")
    decode_rate, tail = None, []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(env, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        with Sampler(proc.pid, metrics_url) as peaks, open(log_path, "w") as log:
            for line in proc.stdout:
                log.write(line)
                tail = (tail + [line.rstrip()])[-30:]
                found = DECODE_LINE.search(line)
                if found:
                    decode_rate = float(found.group(5))
                if not quiet or line.startswith(("[imagenet]", "[drmi]")):
                    print("    | " + line.rstrip(), flush=True)
            rc = proc.wait()
    except BaseException:
        proc.terminate()
        proc.wait(30)
        raise
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"the job exited with {rc} (log: {log_path}):\n" + "\n".join(tail))
    return {"command": cmd, "wall_s": wall, "driver_peak_bytes": peaks.driver,
            "driver_tree_peak_bytes": peaks.driver_tree, "object_store_peak_bytes": peaks.store,
            "object_store_spilled_peak_bytes": peaks.spilled, "object_store_samples": peaks.store_samples,
            "log_decode_images_per_s": decode_rate, "log": log_path}


def stage_figures(sel: dict, run: dict) -> dict:
    """The stage figures from selection.json (what the job writes) and the run's own measurements."""
    secs, stats = sel.get("seconds", {}), sel.get("stats", {})
    n = sel.get("n_images")
    fig = {"n_images": n, "n_files": sel.get("n_files"), "skipped": len(sel.get("skipped", [])),
           "budget": sel.get("budget"), "partitions": len(sel.get("partitions", []))}
    for stage in ("list", "decode", "partition", "mi", "select", "total"):
        fig[f"{stage}_s"] = secs.get(stage)
    if stats.get("decoded_images_per_s") is not None:
        fig["decode_images_per_s"], fig["decode_source"] = stats["decoded_images_per_s"], "selection.json"
    elif secs.get("decode") and n:
        fig["decode_images_per_s"], fig["decode_source"] = n / secs["decode"], "selection.json"
    elif run.get("log_decode_images_per_s") is not None:
        fig["decode_images_per_s"], fig["decode_source"] = run["log_decode_images_per_s"], "log"
    else:
        fig["decode_images_per_s"], fig["decode_source"] = None, None
    if stats.get("mi_pairs_computed", stats.get("mi_pairs")) is not None:  # computed: a rerun skips tiles
        fig["mi_pairs"] = int(stats.get("mi_pairs_computed", stats.get("mi_pairs")))
    elif "partitions" in sel:  # partitions with a store are the ones whose MI was computed
        fig["mi_pairs"] = sum(p["size"] * (p["size"] - 1) // 2 for p in sel["partitions"] if p.get("store", True))
    else:
        fig["mi_pairs"] = None
    if stats.get("mi_pairs_per_s") is not None:
        fig["mi_pairs_per_s"] = stats["mi_pairs_per_s"]
    elif fig["mi_pairs"] is not None and secs.get("mi"):
        fig["mi_pairs_per_s"] = fig["mi_pairs"] / secs["mi"]
    else:
        fig["mi_pairs_per_s"] = None
    fig.update({k: run[k] for k in ("wall_s", "driver_peak_bytes", "driver_tree_peak_bytes",
                                    "object_store_peak_bytes", "object_store_spilled_peak_bytes")})
    return fig


# --------------------------------------------------------------------------- 5. one big matrix

def big_matrix(tree: str, m: int, *, size: int, tile_size: int, address: str, work: str) -> dict:
    """pairs/s of compute_mi_matrix over the tree's first m images on the running head (warm)."""
    import ray

    from drmi_ray.matrix import compute_mi_matrix

    arrays = decode_files(tree_files(tree)[:m], size, "L")
    images = np.stack([a for a in arrays if a is not None])
    m = len(images)
    ray.init(address=address, log_to_driver=False)
    try:
        warm = images[: min(m, 400)]
        compute_mi_matrix(warm, os.path.join(work, "matrix-warmup"), tile_size=max(2, len(warm) // 4),
                          progress=False)  # workers start and compile the kernel before the timing
        t0 = time.perf_counter()
        compute_mi_matrix(images, os.path.join(work, "matrix"), tile_size=tile_size, progress=False)
        seconds = time.perf_counter() - t0
        cpus = ray.cluster_resources().get("CPU", 0)
    finally:
        ray.shutdown()
    pairs = m * (m - 1) // 2
    return {"images": m, "pairs": pairs, "seconds": seconds, "pairs_per_s": pairs / seconds,
            "tile_size": tile_size, "ray_cpus": cpus}


# --------------------------------------------------------------------------- printing

def _na(x, spec: str = ",.0f", suffix: str = "") -> str:
    return "n/a" if x is None else format(x, spec) + suffix


def _mib(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.0f} MiB"


def print_tree(name: str, fig: dict, decode_1p: dict, mode: str) -> None:
    mark = {"log": " (job log)", "selection.json": ""}.get(fig["decode_source"], "")
    print(f"\n{name}: {fig['n_images']:,} images decoded of {fig['n_files']:,} files ({fig['skipped']} skipped), "
          f"--size 64 {mode}, K = {fig['budget']:,}, {fig['partitions']} k-means partitions")
    print("| stage | seconds | throughput |")
    print("|---|---:|---|")
    print(f"| list | {_na(fig['list_s'], '.1f')} | |")
    print(f"| decode | {_na(fig['decode_s'], '.1f')} | {_na(fig['decode_images_per_s'])} images/s{mark}; "
          f"one process, no Ray: {decode_1p['images_per_s']:,.0f} images/s wall, "
          f"{decode_1p['images_per_cpu_s']:,.0f} images per CPU-second ({decode_1p['images']} files) |")
    print(f"| partition | {_na(fig['partition_s'], '.1f')} | |")
    print(f"| MI | {_na(fig['mi_s'], '.1f')} | {_na(fig['mi_pairs'])} pairs, {_na(fig['mi_pairs_per_s'])} pairs/s |")
    print(f"| select | {_na(fig['select_s'], '.1f')} | |")
    print(f"| job's reduce total (selection.json) | {_na(fig['total_s'], '.1f')} | |")
    print(f"| job process, start to exit (imports, Ray attach, all stages) | {fig['wall_s']:.1f} | |")
    print(f"driver peak RSS {_mib(fig['driver_peak_bytes'])} (with its children {_mib(fig['driver_tree_peak_bytes'])}); "
          f"object-store peak {_mib(fig['object_store_peak_bytes'])} "
          f"(spilled peak {_mib(fig['object_store_spilled_peak_bytes'])})")


def machine() -> dict:
    import platform

    import ray

    psutil = _psutil()

    return {"hostname": socket.gethostname(), "cpu_count": os.cpu_count(),
            "physical_cores": psutil.cpu_count(logical=False), "ram_bytes": psutil.virtual_memory().total,
            "load_avg": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
            "ray": ray.__version__, "platform": platform.platform()}


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/drmi-ray/reduce-scale"),
                   help="where the trees are made once (default ~/.cache/drmi-ray/reduce-scale)")
    p.add_argument("--digits", type=int, default=FULL["digits"], help="digit images (default 100,000)")
    p.add_argument("--photos", type=int, default=FULL["photos"], help="photo-sized images (default 10,000)")
    p.add_argument("--only", choices=("digits", "photos"), help="run one tree only")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes making the trees (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the trees (default 0)")
    p.add_argument("--generate-only", action="store_true", help="make the trees, run nothing")
    p.add_argument("--budget-frac", type=float, default=0.01, help="K as a fraction of the pool (default 0.01)")
    p.add_argument("--size", type=int, default=64, help="the job's --size (default 64)")
    p.add_argument("--photos-rgb", action="store_true", help="reduce the photos in RGB (--rgb); default grey")
    p.add_argument("--tile-size", type=int, default=1300, help="the job's and the big matrix's tile side (default 1300)")
    p.add_argument("--job-args", default="", help="more options for jobs/imagenet.py, e.g. '--parallel-partitions 8'")
    p.add_argument("--matrix-n", type=int, default=3000, help="images in the one big matrix (digits; default 3000; 0: skip)")
    p.add_argument("--decode-sample", type=int, default=300, help="files timed by the one-process decode (default 300)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the Ray head (default: all)")
    p.add_argument("--work", help="run folders and stores (default: a temp dir, removed unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep --work (run folders, tile stores, job logs)")
    p.add_argument("--quiet", action="store_true", help="echo only the job's [drmi]/[imagenet] lines")
    p.add_argument("--json", help="write the figures to this JSON file")
    args = p.parse_args(argv)

    kinds = [args.only] if args.only else ["digits", "photos"]
    counts = {"digits": args.digits, "photos": args.photos}
    mode, why = auth_mode()
    os.environ["RAY_AUTH_MODE"] = mode  # before Ray is imported here (it reads it at import)
    info = machine()
    print(f"# reduce_scale on {info['hostname']}: {info['cpu_count']} CPU cores ({info['physical_cores']} physical), "
          f"{info['ram_bytes'] / 2**30:.1f} GiB RAM, load {' '.join(map(str, info['load_avg']))}, "
          f"Ray {info['ray']}, Python {info['python']}")

    trees, sizes = {}, {}
    for kind in kinds:
        if counts[kind] < 1:
            raise SystemExit(f"--{kind} must be at least 1")
        trees[kind] = make_tree(kind, counts[kind], args.cache, workers=max(1, args.workers), seed=args.seed)
        files, total = tree_bytes(trees[kind])
        sizes[kind] = {"files": files, "bytes": total, "avg_bytes": total / max(files, 1)}
        print(f"{tree_name(kind, counts[kind])}: {files:,} JPEG files, {total / 1e6:,.1f} MB, "
              f"average {total / max(files, 1) / 1e3:.1f} KB ({trees[kind]})", flush=True)
    if args.generate_only:
        return 0

    figures, decode_1p = {}, {}
    for kind in kinds:  # before the head starts: no Ray processes competing
        job_mode = "RGB" if kind == "photos" and args.photos_rgb else "L"
        decode_1p[kind] = decode_one_process(trees[kind], args.decode_sample, args.size, job_mode)
    work = args.work or tempfile.mkdtemp(prefix="reduce-scale-")
    os.makedirs(work, exist_ok=True)
    report = {"machine": info, "ray_auth_mode": mode, "ray_auth_mode_why": why, "trees": {},
              "settings": {k: v for k, v in vars(args).items() if k != "json"}}
    env = dict(os.environ, RAY_AUTH_MODE=mode)
    head = RayHead(num_cpus=args.num_cpus, env=env, log_dir=work)
    finished = False
    try:
        address = head.wait()
        env["RAY_ADDRESS"] = address
        metrics_url = f"http://127.0.0.1:{head.metrics_port}/metrics"
        print(f"Ray head at {address} (temp dir {head.temp_dir}, auth {mode}: {why}); metrics {metrics_url}; "
              f"work folder {work}", flush=True)
        for kind in kinds:
            name = tree_name(kind, counts[kind])
            rgb = kind == "photos" and args.photos_rgb
            budget = max(1, round(args.budget_frac * sizes[kind]["files"]))
            print(f"\n## {name}: jobs/imagenet.py, K = {budget:,}", flush=True)
            out = os.path.join(work, f"run-{name}")
            run = run_job(trees[kind], out, budget=budget, size=args.size, rgb=rgb, tile_size=args.tile_size,
                          job_args=shlex.split(args.job_args), env=env, metrics_url=metrics_url, quiet=args.quiet)
            with open(os.path.join(out, "selection.json")) as f:
                sel = json.load(f)
            figures[kind] = stage_figures(sel, run)
            report["trees"][name] = {"kind": kind, "path": trees[kind], **sizes[kind], "mode": "RGB" if rgb else "L",
                                     "command": run["command"], "decode_one_process": decode_1p[kind],
                                     "figures": figures[kind]}
            print_tree(name, figures[kind], decode_1p[kind], "RGB" if rgb else "grey")
        if "digits" in kinds and args.matrix_n > 0:
            name = tree_name("digits", counts["digits"])
            print(f"\n## one big matrix: compute_mi_matrix over the first {min(args.matrix_n, counts['digits']):,} "
                  f"images of {name} on the same head", flush=True)
            mat = big_matrix(trees["digits"], args.matrix_n, size=args.size, tile_size=args.tile_size,
                             address=address, work=work)
            job_rate = figures["digits"]["mi_pairs_per_s"]
            ratio = job_rate / mat["pairs_per_s"] if job_rate else None
            mat["job_mi_pairs_per_s"], mat["ratio"] = job_rate, ratio
            report["big_matrix"] = mat
            print(f"one big matrix: {mat['images']:,} images, {mat['pairs']:,} pairs in {mat['seconds']:.1f} s = "
                  f"{mat['pairs_per_s']:,.0f} pairs/s (tile {mat['tile_size']}, {mat['ray_cpus']:g} Ray CPUs)")
            print(f"job MI stage ({name}): {_na(job_rate)} pairs/s = {_na(ratio, '.2f')}x one big matrix "
                  f"(goal >= 0.5x: {'n/a' if ratio is None else 'met' if ratio >= 0.5 else 'NOT met'})")
        finished = True
    finally:
        head.stop()
        if finished and not (args.keep or args.work):
            shutil.rmtree(work, ignore_errors=True)
        elif not finished:
            print(f"kept {work} (job logs, ray-head.log) for a look", file=sys.stderr)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
