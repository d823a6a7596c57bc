"""Attacking an outside endpoint by URL (``--target-url``): the run spends its queries there, and
the referee, holding no weights, scores black-box through the endpoint on its own key."""

import numpy as np
import pytest

from drmi_ray.cli import main
from drmi_ray.config import API_KEY_ENV, EndpointConfig, ExperimentConfig, PoolConfig, SelectionConfig
from drmi_ray.experiment import run_experiment
from drmi_ray.models import TrainConfig


def endpoint_config(**endpoint) -> ExperimentConfig:
    config = ExperimentConfig(pool=PoolConfig(target_train=1000, pool=200, test=200),
                              selection=SelectionConfig(methods=("random",), budgets=(20,)))
    config.substitute = TrainConfig(model="lenet5", epochs=1, min_steps=40, augment="auto")
    config.endpoint = EndpointConfig(**{"url": "http://127.0.0.1:9/app", "api_key": "k", **endpoint})
    return config


def test_a_run_against_an_endpoint_is_charged_there_and_scores_as_a_referee_holding_the_weights(
        tmp_path, ray_local, serve_port, lenet5_checkpoint):
    """The endpoint is our own metered service over the session's LeNet-5 (any Open Inference
    Protocol server would do; tests/test_client.py drives other answer forms): its ledger counts
    every image each key was charged for, and the referee that holds the checkpoint must get the
    very figures the black-box referee measured through the endpoint."""
    import torch

    from drmi_ray.attack import transfer
    from drmi_ray.pools import load_data
    from drmi_ray.models import build_model, predict
    from drmi_ray.service import start_target, stop_target
    from drmi_ray.substitute import evaluate
    from drmi_ray.target import load_classifier

    checkpoint = lenet5_checkpoint[0]
    service = start_target(checkpoint, str(tmp_path / "endpoint" / "journal.jsonl"), port=serve_port)
    try:
        attack_key = service.create_key("attacker", budget=20)
        eval_key = service.create_key("referee", budget=400)
        config = endpoint_config(url=service.url, api_key=attack_key, eval_api_key=eval_key)
        out = tmp_path / "run"
        (row,) = run_experiment(config, str(out))
        attacker, referee = service.usage("attacker"), service.usage("referee")
    finally:
        stop_target(service)

    assert not (out / "target.pt").exists()  # nothing trained: the endpoint is the target
    assert row["queries"] == attacker["used"] == 20
    data = load_data(config.pool)
    target = load_classifier(checkpoint)
    target_test = predict(target, data.test_images)
    right = int((target_test == data.test_labels).sum())
    # the referee paid for the test split once and for one adversarial example per image the target got right
    assert referee["used"] == len(data.test_images) + right
    report = (out / "report.md").read_text()
    assert f"cost {referee['used']} evaluation queries" in report
    assert f"accuracy {100 * right / len(data.test_images):.1f}% on the test split" in report
    (weights,) = (out / "train").glob("*/checkpoint_final/model-0.pt")
    substitute = build_model("lenet5")
    substitute.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    holder = evaluate(substitute, data.test_images, data.test_labels, target_test)
    holder["transfer_rate"] = transfer(substitute, target, data.test_images, data.test_labels,
                                       config.attack)["transfer_rate"]
    assert (row["accuracy"], row["fidelity"], row["transfer_rate"]) == (
        holder["accuracy"], holder["fidelity"], holder["transfer_rate"])
    assert 0 < row["transfer_rate"] < 1 and row["accuracy"] > 0.2
    assert attack_key not in (out / "config.json").read_text() and eval_key not in (out / "config.json").read_text()


@pytest.mark.parametrize("change, match", [
    ({"url": "ftp://host/x"}, "--target-url must be an http"),
    ({"api_key": None}, f"--api-key KEY or set {API_KEY_ENV}"),
    ({"eval_budget": 399}, "the referee may need 400 queries"),
    ({"shape": (0, 28)}, "--target-shape must list"),
    ({"max_batch": 0}, "^max_batch must be a positive integer"),  # EndpointConfig refuses it when made
])
def test_bad_endpoint_settings_are_refused_in_one_line_before_any_work(change, match, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=match) as err:
        endpoint_config(**change).check()
    assert len(str(err.value).splitlines()) == 1


def test_the_cli_refuses_a_checkpoint_and_an_endpoint_together_and_reads_the_key_from_the_environment(
        tmp_path, capsys, monkeypatch, lenet5_checkpoint):
    from drmi_ray.cli import build_config, build_parser

    args = ["run", "--quick", "--target-url", "http://127.0.0.1:9/x", "--out", str(tmp_path / "x")]
    assert main([*args, "--api-key", "k", "--target", lenet5_checkpoint[0]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--target and --target-url: give one" in err
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    config = build_config(build_parser().parse_args([*args, "--target-shape", "1,28,28", "--target-datatype", "FP32"]))
    assert config.endpoint.keys() == ("from-env", "from-env")
    assert config.endpoint.shape == (1, 28, 28) and config.endpoint.datatype == "FP32"
    assert config.to_dict()["endpoint"]["api_key"] is None
    np.testing.assert_equal(ExperimentConfig.from_dict(config.to_dict()).endpoint.shape, (1, 28, 28))


@pytest.mark.parametrize("model, inputs, words", [
    ("other", None, "no model"),  # the stand-in serves "digits"; 404 for any other name
    ("digits", [{"name": "x", "datatype": "FP32", "shape": [-1, 100]}], "shape"),
    ("digits", [{"name": "x", "datatype": "BYTES", "shape": [-1, 784]}], "datatype"),
])
def test_drmi_run_refuses_a_missing_model_or_a_contract_it_cannot_meet_in_one_line_with_nothing_asked(
        model, inputs, words, tmp_path, capsys):
    """A protocol server written for the tests (tests/oip_server.py): the run reads the model's
    metadata before any work and stops in one line; no infer request reaches the server."""
    from oip_server import OIPServer

    with OIPServer(model="digits", inputs=inputs) as server:
        code = main(["run", "--quick", "--learn", "answers", "--methods", "random", "--target-url", server.url,
                     "--api-key", "k", "--target-model", model, "--out", str(tmp_path / "run")])
        infers = [r for r in server.requests if r["path"].endswith("/infer")]
    err = capsys.readouterr().err.strip()
    assert code in (1, 2) and len(err.splitlines()) == 1 and words in err.lower(), err
    assert infers == [] and not (tmp_path / "run" / "acquired").exists()
