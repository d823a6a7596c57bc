"""The whole experiment on a small pool: real target, real MI, real Ray Train substitutes, real PGD."""

import json

import numpy as np
import pytest

from drmi_ray.cli import main
from drmi_ray.config import ExperimentConfig, PoolConfig, SelectionConfig
from drmi_ray.experiment import run_experiment
from drmi_ray.models import TrainConfig
from drmi_ray.service_journal import read_journal


def small_config(**selection) -> ExperimentConfig:
    """A few-minute run: LeNet-5 target and substitutes (as --quick; C3F2's fits and PGD take several
    times longer, and the pipeline, not the network, is what these tests check)."""
    config = ExperimentConfig(pool=PoolConfig(target_train=1500, pool=300, test=300),
                              selection=SelectionConfig(**{"budgets": (20, 60), **selection}),
                              substitute=TrainConfig(model="lenet5"))
    config.target.train = TrainConfig(model="lenet5", epochs=4)
    return config


def test_config_round_trips_through_json_and_an_unknown_key_is_refused():
    config = small_config(seeds=2)
    again = ExperimentConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(ValueError, match="unknown PoolConfig settings"):
        ExperimentConfig.from_dict({"pool": {"sizee": 3}})


@pytest.mark.parametrize("change, match", [
    ({"budgets": (20, 400)}, "larger than the attacker's pool"),
    ({"budgets": (0,)}, "at least 2"),
    ({"methods": ("drmi", "magic")}, "unknown method"),
])
def test_bad_configs_are_refused_before_any_work(change, match):
    with pytest.raises(ValueError, match=match):
        small_config(**change).check()


def test_full_pipeline_queries_each_methods_pick_once_and_reports_what_its_artifacts_recompute(
        tmp_path, ray_local, serve_port):
    """The whole run on 300 pool images, budgets 20 and 60; then every figure of results.json
    is checked against what the run folder holds: the target checkpoint, the MI tile store, each
    cell's saved queries and answers, and each substitute's weights (Ray Train checkpoint)."""
    import torch

    from drmi_ray.drmi import random_indices, seeded_shuffle
    from drmi_ray.pools import load_data
    from drmi_ray.tiles import TileStore
    from drmi_ray.models import build_model, predict
    from drmi_ray.optimize import select
    from drmi_ray.target import load_classifier

    out = tmp_path / "run"
    config = small_config()
    config.target.port = serve_port
    rows = run_experiment(config, str(out))
    cells = [(m, b) for b in (20, 60) for m in ("drmi", "random")]
    assert [(r["method"], r["budget"], r["seed"]) for r in rows] == [(m, b, 0) for m, b in cells]

    data = load_data(config.pool)
    target = load_classifier(str(out / "target.pt"))
    target_test = predict(target, data.test_images)
    target_correct = int((target_test == data.test_labels).sum())
    mi = TileStore(str(out / "mi")).to_dense()
    (run_folder,) = (out / "train").glob("*/checkpoint_final")
    journal = read_journal(str(out / "target" / "journal.jsonl"))
    for i, row in enumerate(rows):
        name = f"{row['method']}-{row['budget']}-{row['seed']}"
        # queried: the method's rule on this pool (drmi: the optimizer on the stored MI, in a
        # seeded shuffle; random: seeded draws), answered with the target's own labels
        with np.load(out / "acquired" / f"{name}.npz") as saved:
            images, answers = saved["images"], saved["labels"]
        if row["method"] == "drmi":
            picked = seeded_shuffle(select(mi, row["budget"], seed=0).indices, 0)
        else:
            picked = random_indices(len(data.pool), row["budget"], 0)
        np.testing.assert_array_equal(images, data.pool[picked])
        np.testing.assert_array_equal(answers, predict(target, images))
        # charged by the target's ledger, once, under the cell's key
        assert row["queries"] == row["budget"]
        assert sum(r["n"] for r in journal if r["type"] == "answer" and r["key"] == name) == row["budget"]
        # the referee's accuracy and fidelity are the saved substitute's, on the test split
        substitute = build_model(config.substitute.model)
        substitute.load_state_dict(torch.load(run_folder / f"model-{i}.pt", map_location="cpu", weights_only=True))
        pred = predict(substitute, data.test_images)
        assert row["accuracy"] == (pred == data.test_labels).mean() > 0.2  # well above chance (0.1)
        assert row["fidelity"] == (pred == target_test).mean() > 0.2
        # the transfer rate counts among the test images the target gets right: k / target_correct
        k = row["transfer_rate"] * target_correct
        assert abs(k - round(k)) < 1e-9 and 0 < round(k) < target_correct, (row["transfer_rate"], target_correct)
        # PRADA watched every key (delta 0.95) but cannot flag at these budgets: its first
        # Shapiro-Wilk test needs more than 100 distances, and a key of 60 queries gives at most 59
        # (tests/test_ledger.py: a key whose stream it flags reports the query count here)
        (key,) = [r for r in journal if r["type"] == "key" and r["name"] == name]
        assert key["prada_delta"] == 0.95 and row["prada_flagged_at"] is None
    saved = json.loads((out / "results.json").read_text())
    assert saved == rows
    report = (out / "report.md").read_text()
    assert "| 60 |" in report and "drmi" in report and "random" in report and "PRADA" in report
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "results.csv").read_text().startswith("method,budget,seed,queries")
    assert ExperimentConfig.load(str(out / "config.json")) == config
    # a rerun with another rate limit would change its keys: refused before any work
    config.target.rate_limit = 5.0
    with pytest.raises(ValueError, match="other settings"):
        run_experiment(config, str(out))


def test_cli_refuses_bad_budget_in_one_line(tmp_path, capsys):
    assert main(["run", "--quick", "--budgets", "50,5000", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "larger than the attacker's pool" in err
    assert not (tmp_path / "x").exists()


def test_drmi_reduce_on_a_folder_selects_what_select_picks_on_its_decoded_images(tmp_path, digits, ray_local):
    from PIL import Image

    from drmi_ray.mi import pairwise_mi
    from drmi_ray.optimize import select

    images, labels = digits
    for i in range(40):
        folder = tmp_path / "pool" / str(labels[i * 100])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i * 100]).save(folder / f"{i:02d}.png")
    out = tmp_path / "reduced"
    assert main(["reduce", "--data", str(tmp_path / "pool"), "--budget", "8", "--out", str(out), "--partition", "none"]) == 0
    result = json.loads((out / "selection.json").read_text())
    assert len(result["selected"]) == 8 and result["skipped"] == []
    # the same selection as select() on the MI of the decoded pool, in path order
    order = sorted(range(40), key=lambda i: f"{labels[i * 100]}/{i:02d}.png")
    expected = select(pairwise_mi(images[[i * 100 for i in order]]), 8, seed=0)
    assert result["indices"] == expected.indices.tolist()
    assert abs(result["objective"] - expected.objective) < 1e-9
    assert main(["reduce", "--data", str(tmp_path / "pool"), "--budget", "41", "--out", str(tmp_path / "x")]) == 2


def test_pool_mode_substitutes_never_read_the_pools_labels(tmp_path, ray_local, serve_port, monkeypatch):
    """The whole run learning from the pool (answers spread over the MI graph), twice: once on the
    bundled digits, once with the pool's own labels scrambled. The threat model gives the attacker
    no pool labels, so every figure and every substitute's weights must be identical."""
    import torch

    from drmi_ray import data, pools

    config = ExperimentConfig(pool=PoolConfig(target_train=1000, pool=200, test=200),
                              selection=SelectionConfig(methods=("random", "drmi-cover"), budgets=(20,)))
    config.target.train = TrainConfig(model="lenet5", epochs=3)
    config.target.port = serve_port
    config.substitute = TrainConfig(model="lenet5", epochs=1, min_steps=40, augment="auto")
    config.learn = "pool"
    images, labels = data.bundled_mnist()
    pool_rows = data.split_indices(len(images), target_train=1000, pool=200, test=200, seed=0).pool
    scrambled = labels.copy()
    scrambled[pool_rows] = np.random.default_rng(1).permutation(labels[pool_rows]) + 100  # not even digits
    runs = {}
    for name, pool_labels in (("real", labels), ("scrambled", scrambled)):
        monkeypatch.setattr(pools, "bundled_mnist", lambda pool_labels=pool_labels: (images, pool_labels))
        assert (pools.load_pool("bundled-mnist").labels[pool_rows] == pool_labels[pool_rows]).all()  # the scramble took
        runs[name] = run_experiment(config, str(tmp_path / name))
    assert runs["real"] == runs["scrambled"]
    assert [r["learn"] for r in runs["real"]] == ["pool", "pool"]
    for i in range(2):
        (real,) = (tmp_path / "real" / "train").glob(f"*/checkpoint_final/model-{i}.pt")
        (other,) = (tmp_path / "scrambled" / "train").glob(f"*/checkpoint_final/model-{i}.pt")
        a, b = (torch.load(p, weights_only=True) for p in (real, other))
        assert all(torch.equal(a[k], b[k]) for k in a)
