"""A small end-to-end attack on a real MLServer: benchmarks/mlserver_attack.py with one method,
budget 20, a 200-image pool and a 200-image test split, one image per request (so MLServer's
request counter is its image count), the substitute fitted without Ray Train workers (about 3
minutes on two busy cores). Opt in with ``-m mlserver``; needs MLServer's own venv
(``bash benchmarks/mlserver_env.sh``)."""

import importlib.util
import os

import pytest

pytestmark = pytest.mark.mlserver

BENCHMARK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                         "mlserver_attack.py")


def load_benchmark():
    spec = importlib.util.spec_from_file_location("mlserver_attack", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_attack_on_mlserver_is_counted_and_read_right(tmp_path):
    bench = load_benchmark()
    if not os.path.exists(os.path.join(bench.ENV, "bin", "mlserver")):
        pytest.skip(f"no MLServer venv at {bench.ENV} (DRMI_MLSERVER_ENV): run `bash benchmarks/mlserver_env.sh`")
    result = bench.main(["--out", str(tmp_path / "attack"), "--methods", "random", "--budgets", "20",
                         "--pool-size", "200", "--test-size", "200", "--max-batch", "1", "--learn", "answers",
                         "--substitute-workers", "0"])
    q = result["queries"]
    assert q["attack"] == 20
    assert q["eval"] == q["expected_eval"]  # the test split and each substitute's adversarial examples
    assert q["mlserver_requests"] == q["attack"] + q["eval"] == q["expected_requests"]  # one image a request
    assert q["mlserver_failed"] == 0
    assert q["misread"] == 0 and q["classes"] > 1  # every answer is the model's own label, not one class
    assert result["target_agree"] and all(r["agree"] for r in result["referee"]), result["referee"]
