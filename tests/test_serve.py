"""`drmi serve`, run as a user runs it (a subprocess, Ctrl-C to stop): it prints its base URL and
a curl hint, serves keys made through the operator endpoint, stops cleanly on SIGINT/SIGTERM
(exit 0), and a restart on the same folder resumes every key from the journal. Bad settings are
refused in one line before Ray starts.

Each start of Ray + Serve costs 10-20 s here: one test starts the target twice, the others none.
"""

import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import DrmiServe
from drmi_ray.cli import build_parser, main
from drmi_ray.client import TargetClient
from drmi_ray.models import predict
from drmi_ray.target import load_classifier

KEY = {"name": "class-a", "budget": 50, "rate_limit": None, "burst": 1.0, "prada_delta": None}


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/health/live", timeout=5):
            return True
    except (urllib.error.URLError, OSError):
        return False


@pytest.mark.heavy  # two starts of Ray + Serve (about 1.5 min); the default run starts it once in test_tritonclient.py
def test_serve_prints_its_url_answers_keys_stops_on_ctrl_c_and_resumes_every_key_on_restart(
        lenet5_checkpoint, digits, tmp_path):
    checkpoint, out = lenet5_checkpoint[0], tmp_path / "class"
    images = digits[0][3000:3012]
    expected = predict(load_classifier(checkpoint), images)
    served = DrmiServe(checkpoint, out)
    try:
        key_file = str(out / "target" / "operator.key")
        assert served.key_file == key_file and served.url.startswith("http://127.0.0.1:")
        assert oct(os.stat(key_file).st_mode & 0o777) == "0o600"
        hint = served.stdout[-1]
        assert hint.startswith(f"make a key: curl -X POST {served.url}/v2/operator/keys ")
        assert f"$(cat {key_file})" in hint
        operator = TargetClient(served.url, served.operator_key)
        made = operator.call("POST", "/v2/operator/keys", KEY)
        assert made["name"] == "class-a" and made["key"].startswith("drk.class-a.")
        client = TargetClient(served.url, made["key"], prefix="lesson-1")
        np.testing.assert_array_equal(client.query(images), expected)
        np.testing.assert_array_equal(client.query(images[:5]), expected[:5])
        assert operator.call("GET", "/v2/operator/keys/class-a")["used"] == 17
        first_url = served.url
        assert served.stop(signal.SIGINT) == 0, served.errors()  # within stop's timeout
    finally:
        served.kill()
    assert served.stdout[-1] == f"[drmi] target stopped; journal and operator key in {out / 'target'}"
    assert "Traceback" not in served.errors() and not answers(first_url)

    again = DrmiServe(checkpoint, out)  # the same folder: the same operator key, journal, keys
    try:
        operator = TargetClient(again.url, again.operator_key)
        assert again.url.rsplit("/", 1)[1] == first_url.rsplit("/", 1)[1]  # the same application name
        usage = operator.call("GET", "/v2/operator/keys/class-a")
        assert (usage["used"], usage["left"], usage["budget"]) == (17, 33, 50)
        assert operator.call("POST", "/v2/operator/keys", KEY)["key"] == made["key"]
        repeat = TargetClient(again.url, made["key"], prefix="lesson-1")  # the same request ids: stored answers
        np.testing.assert_array_equal(repeat.query(images), expected)
        assert operator.call("GET", "/v2/operator/keys/class-a")["used"] == 17
        assert again.stop(signal.SIGTERM) == 0, again.errors()
    finally:
        again.kill()
    assert "Traceback" not in again.errors()


def test_a_taken_port_is_refused_in_one_line_before_ray_starts(lenet5_checkpoint, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "drmi_ray.cli", "serve", "--target", lenet5_checkpoint[0],
                               "--out", str(tmp_path / "run"), "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"drmi serve: error: port {port} on 127.0.0.1 is taken"), done.stderr
    assert "--port" in err[0] and "--serve-port" not in err[0]
    assert not (tmp_path / "run").exists()  # refused before the folder, and before Ray (no other line)


def serve_options():
    for action in build_parser().subcommands["serve"]._actions:
        if action.option_strings and action.dest not in ("help", "debug"):
            yield next(o for o in action.option_strings if o.startswith("--"))


BAD = {"--target": ["not-a-checkpoint"], "--out": ["a-file", "a-file/run"], "--port": ["0", "65536", "-1"],
       "--host": ["no-such-host.invalid", "192.0.2.77"], "--output": ["not-a-choice"], "--replicas": ["0", "1000000"]}


def test_every_serve_option_has_a_bad_value_below():
    assert sorted(serve_options()) == sorted(BAD)


@pytest.mark.parametrize("option, bad", [(o, v) for o, values in BAD.items() for v in values])
def test_a_bad_serve_setting_is_one_line_naming_its_option_before_any_work(
        lenet5_checkpoint, tmp_path, capsys, monkeypatch, option, bad):
    def boom(*args, **kwargs):
        raise AssertionError("Ray started; the check should have come first")

    monkeypatch.setattr("ray.init", boom)
    (tmp_path / "not-a-checkpoint").write_text("not a checkpoint")
    (tmp_path / "a-file").write_text("not a folder")
    settings = {"--target": lenet5_checkpoint[0], "--out": str(tmp_path / "run"),
                option: bad if option not in ("--target", "--out") else str(tmp_path / bad)}
    try:
        code = main(["serve", *[x for pair in settings.items() for x in pair]])
    except SystemExit as exit:  # argparse's own refusals
        code = exit.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and option in err, err
    assert not (tmp_path / "run").exists()
