"""An end-to-end attack on a real MLServer endpoint (issue 22, item 5).

    bash benchmarks/mlserver_env.sh          # once: MLServer's own venv (prints its python)
    python benchmarks/mlserver_attack.py [--out FOLDER] [--methods random,drmi] [--budgets 50,100]
                                         [--pool-size 2000] [--test-size 1000] [--max-batch 64]
                                         [--learn answers|pool|auto] [--substitute-workers N]

Run it with the main environment's python (the one with drmi_ray installed). MLServer comes from
``${DRMI_MLSERVER_ENV:-~/.cache/drmi-ray/mlserver-env}`` (``--env`` to name another venv).

What it does, all on 127.0.0.1:

1. trains the target: a scikit-learn ``SVC`` (RBF kernel) on the protocol's target split of the
   bundled digits (``split_indices(5000, target_train=2000, ...)``, as ``drmi run`` splits them),
   flattened and scaled to 0..1 (float32 ``[n, 784]``); saves it with joblib as
   ``FOLDER/mlserver/digits/model.joblib`` beside a ``model-settings.json``
   (``mlserver_sklearn.SKLearnModel``, name ``digits``, input ``input-0`` FP32 ``[-1, 784]``,
   output ``predict`` INT64 ``[-1, 1]``, both listed so the model's metadata reports them) and a
   ``FOLDER/mlserver/settings.json`` (free HTTP, gRPC and metrics ports; no parallel workers);
2. starts ``mlserver start FOLDER/mlserver`` from the venv, waits for ``GET /v2/health/ready``;
3. runs ``python -m drmi_ray.cli run --target-url http://127.0.0.1:PORT --target-model digits
   --api-key anything --substitute lenet5 --seeds 1 --out FOLDER/run ...`` as a user would (its
   log: ``FOLDER/drmi-run.log``); the client reads the input contract from the metadata;
4. checks it against MLServer and against a referee holding the same sklearn model, and stops
   MLServer (also on an error or Ctrl-C; its log: ``FOLDER/mlserver/mlserver.log``).

What it prints: one table, then the wall time.

- **queries**: the images the run says it spent (``results.json``'s ``queries``, the attack, and
  ``report.md``'s "cost N evaluation queries") against MLServer's own count. MLServer 1.7 counts
  requests, not images: ``model_infer_request_success_total`` (and ``_failure_total``) on its
  metrics port, one per infer request (its access log too has no sizes). So the images are
  checked as requests: the client sends each call's ``n`` images as ``ceil(n / max_batch)``
  requests, and the run's calls are each cell's budget, the test split, and each substitute's
  adversarial examples (the test images the target labels right, counted here with the local
  model). The expected requests must equal MLServer's; with ``--max-batch 1`` they are images.
  ``misread`` counts attack answers that differ from the local model's prediction of the same
  images (read from the run's ``acquired/*.npz``): a client that misreads MLServer's ``[n, 1]``
  INT64 ``predict`` output would show here, or as one class for every image (``classes``).
- **referee**: the target's accuracy on the run's test split (report.md's, from MLServer's
  labels, beside the local model's); then per row, accuracy, fidelity and transfer rate as the run
  scored them black-box (through MLServer) beside the same with the sklearn model in this process
  (fidelity: agreement with its predictions on the test split; transfer: ``attack.transfer`` with
  its predictions as the target), and whether each pair agrees within 1 point.

``main(argv)`` returns the same numbers as a dict (tests/test_mlserver.py runs a small one).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ENV = os.environ.get("DRMI_MLSERVER_ENV", os.path.expanduser("~/.cache/drmi-ray/mlserver-env"))
MODEL = "digits"
INPUT = "input-0"
SCORES = ("accuracy", "fidelity", "transfer_rate")


# ---------------------------------------------------------------------- the target

def as_features(images: np.ndarray) -> np.ndarray:
    """uint8 ``(n, 28, 28)`` -> float32 ``(n, 784)`` in 0..1, the values MLServer decodes from
    the client's FP32 request (the client sends ``pixel / 255.0`` as JSON doubles)."""
    return (images.reshape(len(images), -1) / 255.0).astype(np.float32)


def train_digits():
    """The target: an RBF support-vector classifier (``SVC(C=5)``: about 93% here, where an
    ``MLPClassifier`` stops near 90% on 2,000 digits) on the protocol's target split, on one BLAS
    thread (two busy cores thrash with more). Returns ``(model, its accuracy on the protocol's
    1,000 test images, seconds to train)``."""
    from sklearn.svm import SVC
    from threadpoolctl import threadpool_limits

    from drmi_ray.data import bundled_mnist, split_indices

    images, labels = bundled_mnist()
    split = split_indices(len(images), target_train=2000, pool=2000, test=1000, seed=0)
    start = time.perf_counter()
    with threadpool_limits(1):
        model = SVC(C=5.0, gamma="scale").fit(as_features(images[split.target_train]), labels[split.target_train])
    seconds = time.perf_counter() - start
    accuracy = float((model.predict(as_features(images[split.test])) == labels[split.test]).mean())
    return model, accuracy, seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_repository(folder: str, model) -> dict:
    """MLServer's folder: ``settings.json`` and ``digits/{model.joblib, model-settings.json}``.
    Returns the ports it will listen on."""
    import joblib

    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    os.makedirs(os.path.join(folder, MODEL), exist_ok=True)
    joblib.dump(model, os.path.join(folder, MODEL, "model.joblib"))
    settings = {"host": "127.0.0.1", "http_port": ports["http"], "grpc_port": ports["grpc"],
                "metrics_port": ports["metrics"], "metrics_endpoint": "/metrics",
                "metrics_dir": os.path.join(folder, ".metrics"), "parallel_workers": 0, "debug": False,
                "load_models_at_startup": True}
    model_settings = {"name": MODEL, "implementation": "mlserver_sklearn.SKLearnModel",
                      "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, 784]}],
                      "outputs": [{"name": "predict", "datatype": "INT64", "shape": [-1, 1]}],
                      "parameters": {"uri": "./model.joblib"}}
    for path, data in ((os.path.join(folder, "settings.json"), settings),
                       (os.path.join(folder, MODEL, "model-settings.json"), model_settings)):
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
    return ports


class MLServer:
    """``mlserver start FOLDER`` from the venv ``env``, in a session of its own (stopped with its
    whole process group), as a context manager that waits for ``/v2/health/ready``."""

    def __init__(self, env: str, folder: str, ports: dict, *, wait_s: float = 180):
        self.env, self.folder, self.ports, self.wait_s = env, folder, ports, wait_s
        self.url = f"http://127.0.0.1:{ports['http']}"
        self.log = os.path.join(folder, "mlserver.log")
        self.proc = None

    def __enter__(self) -> "MLServer":
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        for name in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
            environment.pop(name, None)
        environment["PATH"] = f"{self.env}/bin:{environment.get('PATH', '')}"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([os.path.join(self.env, "bin", "mlserver"), "start", self.folder],
                                         cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, env=environment,
                                         start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.wait_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlserver exited ({self.proc.returncode}) before it was ready:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"mlserver not ready after {self.wait_s:.0f} s:\n{self.tail()}")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                pass

    def tail(self, lines: int = 30) -> str:
        with open(self.log, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def version(self) -> str:
        with urllib.request.urlopen(f"{self.url}/v2", timeout=10) as r:
            return json.load(r).get("version", "?")

    def metadata(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/v2/models/{MODEL}", timeout=10) as r:
            return json.load(r)

    def counts(self) -> dict:
        """MLServer's own counters for the model: infer requests answered and failed."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['metrics']}/metrics", timeout=10) as r:
            text = r.read().decode()
        out = {"ok": 0, "failed": 0}
        for line in text.splitlines():
            m = re.match(r'model_infer_request_(success|failure)_total\{([^}]*)\}\s+(\S+)$', line)
            if m and f'model="{MODEL}"' in m[2]:
                out["ok" if m[1] == "success" else "failed"] += int(float(m[3]))
        return out


# ---------------------------------------------------------------------- the attack

def run_drmi(url: str, out: str, log_path: str, args) -> None:
    """``drmi run`` against ``url``, as a user runs it; raises with its log's tail on failure."""
    command = [sys.executable, "-m", "drmi_ray.cli", "run", "--target-url", url, "--api-key", "anything",
               "--target-model", MODEL, "--methods", args.methods, "--budgets", args.budgets, "--seeds", "1",
               "--substitute", "lenet5", "--pool-size", str(args.pool_size), "--test-size", str(args.test_size),
               "--target-max-batch", str(args.max_batch), "--out", out]
    if args.learn:
        command += ["--learn", args.learn]
    if args.substitute_workers is not None:
        command += ["--substitute-workers", str(args.substitute_workers)]
    print("$ python " + " ".join(command[1:]), flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            code = proc.wait()
        except BaseException:  # Ctrl-C reached it too: let it stop its local Ray, then make sure
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
    if code:
        with open(log_path, errors="replace") as f:
            tail = "".join(f.readlines()[-25:])
        raise RuntimeError(f"drmi run exited {code}; the end of {log_path}:\n{tail}")


def stated(run: str) -> tuple[list[dict], int, float]:
    """The run's rows (results.json), and the evaluation queries and the target's accuracy (%) its
    report.md states."""
    with open(os.path.join(run, "results.json")) as f:
        rows = json.load(f)
    with open(os.path.join(run, "report.md")) as f:
        report = " ".join(f.read().split())
    queries = re.search(r"cost (\d+) evaluation queries", report)
    accuracy = re.search(r"accuracy ([\d.]+)% on the test split", report)
    if queries is None or accuracy is None:
        raise RuntimeError(f"{run}/report.md states no 'cost N evaluation queries' or no target accuracy")
    return rows, int(queries[1]), float(accuracy[1])


def close(a: float, b: float) -> bool:
    """Within one point (both NaN, e.g. no transfer rate, counts as agreeing)."""
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 0.01


def substitutes(run: str, n: int) -> list:
    """The run's substitutes, in results.json's row order."""
    import torch

    from drmi_ray.models import build_model

    folders = sorted(glob.glob(os.path.join(run, "train", "*", "checkpoint_final")), key=os.path.getmtime)
    if not folders:
        raise RuntimeError(f"no substitutes under {run}/train/*/checkpoint_final")
    models = []
    for i in range(n):
        model = build_model("lenet5")
        model.load_state_dict(torch.load(os.path.join(folders[-1], f"model-{i}.pt"), map_location="cpu",
                                         weights_only=True))
        models.append(model.eval())
    return models


def check_run(run: str, target, max_batch: int) -> dict:
    """What the table shows from the run folder and the local model: the images the run states and
    the requests they need, misread answers, and both referees' scores."""
    from threadpoolctl import threadpool_limits

    from drmi_ray.attack import transfer
    from drmi_ray.config import ExperimentConfig
    from drmi_ray.experiment import cell_name
    from drmi_ray.pools import load_data
    from drmi_ray.runtime import use_cpus
    from drmi_ray.substitute import evaluate

    use_cpus(1)
    config = ExperimentConfig.load(os.path.join(run, "config.json"))
    data = load_data(config.pool)
    rows, eval_queries, target_accuracy = stated(run)

    def answer(images):
        with threadpool_limits(1):
            return target.predict(as_features(np.asarray(images)))

    truth = answer(data.test_images)
    n_correct = int((truth == data.test_labels).sum())
    # the client's calls: each cell's budget at once, the test split, each substitute's PGD examples
    calls = [r["queries"] for r in rows] + [len(truth)] + [n_correct] * len(rows)
    misread, classes = 0, set()
    for r in rows:
        with np.load(os.path.join(run, "acquired", f"{cell_name((r['method'], r['budget'], r['seed']))}.npz")) as f:
            misread += int((answer(f["images"]) != f["labels"]).sum())
            classes |= set(f["labels"].tolist())
    referee = []
    for r, substitute in zip(rows, substitutes(run, len(rows))):
        local = evaluate(substitute, data.test_images, data.test_labels, truth)
        local["transfer_rate"] = transfer(substitute, answer, data.test_images, data.test_labels, config.attack,
                                          target_labels=truth)["transfer_rate"]
        scores = {k: (float(r[k]), float(local[k])) for k in SCORES}
        referee.append({"cell": f"{r['method']}-{r['budget']}", "queries": r["queries"], **scores,
                        "agree": all(close(*pair) for pair in scores.values())})
    local_accuracy = float((truth == data.test_labels).mean())
    queries = {"attack": sum(r["queries"] for r in rows), "eval": eval_queries,
               "expected_eval": len(truth) + n_correct * len(rows), "max_batch": max_batch,
               "expected_requests": sum(math.ceil(n / max_batch) for n in calls), "misread": misread,
               "classes": len(classes)}
    return {"queries": queries, "referee": referee, "target": (target_accuracy / 100, local_accuracy),
            "target_agree": close(target_accuracy / 100, local_accuracy)}


# ---------------------------------------------------------------------- the table

def table(result: dict) -> str:
    """The summary: queries against MLServer's counts, then the two referees side by side."""
    q, yes = result["queries"], {True: "yes", False: "NO"}

    def count(what, stated, expected, served, ok, tail=""):
        return f"  {what:<42}{stated:>11}{expected:>10}{served:>10}  {yes[ok]}{tail}"

    lines = [
        f"MLServer {result['mlserver']} at {result['url']}, model {MODEL!r} ({result['contract']}), "
        "target: sklearn SVC",
        "",
        f"{'queries':<44}{'run states':>11}{'expected':>10}{'MLServer':>10}  match",
        f"  {'attack images (results.json queries)':<42}{q['attack']:>11}",
        count("evaluation images (report.md)", q["eval"], q["expected_eval"], "", q["eval"] == q["expected_eval"]),
        count(f"infer requests, {q['max_batch']} image{'s' * (q['max_batch'] > 1)} at most each", "",
              q["expected_requests"], q["mlserver_requests"],
              q["expected_requests"] == q["mlserver_requests"]),
        count("failed infer requests", "", 0, q["mlserver_failed"], q["mlserver_failed"] == 0),
        count("attack answers misread (vs local model)", "", 0, q["misread"], q["misread"] == 0,
              f"  ({q['classes']} classes answered)"),
        "",
        f"{'referee, % (MLServer | local sklearn)':<34}{'accuracy':>16}{'fidelity':>16}{'transfer':>16}  within 1 pt",
    ]
    for name, scores, agree in [("target", [result["target"]], result["target_agree"])] + [
            (f"{r['cell']} ({r['queries']} queries)", [r[k] for k in SCORES], r["agree"]) for r in result["referee"]]:
        cells = "".join(f"{100 * a:>8.1f} | {100 * b:5.1f}" for a, b in scores)
        lines.append(f"  {name:<32}{cells:<48}  {yes[agree]}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="folder for MLServer's repository, the run and the logs "
                                 "(default runs/mlserver-attack-TIME)")
    p.add_argument("--methods", default="random,drmi", help="drmi run --methods (default random,drmi)")
    p.add_argument("--budgets", default="50,100", help="drmi run --budgets (default 50,100)")
    p.add_argument("--pool-size", type=int, default=2000, help="drmi run --pool-size (default 2000)")
    p.add_argument("--test-size", type=int, default=1000, help="drmi run --test-size (default 1000)")
    p.add_argument("--max-batch", type=int, default=64, help="drmi run --target-max-batch (default 64)")
    p.add_argument("--learn", choices=("answers", "pool", "auto"), help="drmi run --learn (default: its own)")
    p.add_argument("--substitute-workers", type=int, help="drmi run --substitute-workers (default: its own; "
                                                          "0: no Ray Train workers)")
    p.add_argument("--env", default=ENV, help=f"MLServer's venv (default {ENV})")
    args = p.parse_args(argv)

    start = time.perf_counter()
    if not os.path.exists(os.path.join(args.env, "bin", "mlserver")):
        raise SystemExit(f"no MLServer venv at {args.env}: run `bash benchmarks/mlserver_env.sh` first")
    out = os.path.abspath(args.out or os.path.join(ROOT, "runs", time.strftime("mlserver-attack-%Y%m%d-%H%M%S")))
    repository, run = os.path.join(out, "mlserver"), os.path.join(out, "run")
    if os.path.exists(run):
        raise SystemExit(f"{run} exists: pass a new --out (MLServer's counts start at zero; a resumed run's would not)")
    shutil.rmtree(repository, ignore_errors=True)

    import sklearn

    ask = [os.path.join(args.env, "bin", "python"), "-c", "import sklearn; print(sklearn.__version__)"]
    served = subprocess.run(ask, capture_output=True, text=True).stdout.strip()
    if served != sklearn.__version__:
        print(f"warning: scikit-learn {sklearn.__version__} here pickles the model, {served or '?'} in {args.env} "
              "serves it", flush=True)
    target, accuracy, seconds = train_digits()
    print(f"target: sklearn SVC, {100 * accuracy:.1f}% on the 1,000 held-out test digits, trained in {seconds:.1f} s",
          flush=True)
    ports = write_repository(repository, target)
    with MLServer(args.env, repository, ports) as server:
        inputs = server.metadata().get("inputs") or [{}]
        contract = f"{inputs[0].get('name')} {inputs[0].get('datatype')} {inputs[0].get('shape')}"
        print(f"mlserver {server.version()} ready at {server.url}; metadata: {contract}", flush=True)
        before, began = server.counts(), time.perf_counter()
        run_drmi(server.url, run, os.path.join(out, "drmi-run.log"), args)
        after, drmi_s = server.counts(), time.perf_counter() - began
        version = server.version()
    result = {"mlserver": version, "url": server.url, "contract": contract, "out": out, "drmi_run_s": drmi_s,
              **check_run(run, target, args.max_batch)}
    result["queries"].update(mlserver_requests=after["ok"] - before["ok"],
                             mlserver_failed=after["failed"] - before["failed"])
    result["wall_s"] = time.perf_counter() - start
    print()
    print(table(result))
    print(f"\nwall time {result['wall_s']:.0f} s (drmi run {drmi_s:.0f} s); folder {out}")
    return result


if __name__ == "__main__":
    main()
