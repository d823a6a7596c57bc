"""The whole experiment on a small pool: real target, real MI, real Ray Train substitutes, real PGD."""

import json

import pytest

from drmi_ray.cli import main
from drmi_ray.config import ExperimentConfig, PoolConfig, SelectionConfig
from drmi_ray.experiment import check_config, run_experiment
from drmi_ray.ledger import read_journal


def small_config(**selection) -> ExperimentConfig:
    config = ExperimentConfig(pool=PoolConfig(target_train=1500, pool=300, test=300),
                              selection=SelectionConfig(**{"budgets": (20, 60), **selection}))
    config.target.train.epochs = 4
    return config


def test_config_round_trips_through_json():
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
        check_config(small_config(**change))


def test_full_pipeline_small_pool(tmp_path, ray_local, serve_port):
    out = tmp_path / "run"
    config = small_config()
    config.target.port = serve_port
    rows = run_experiment(config, str(out))
    assert {(r["method"], r["budget"]) for r in rows} == {(m, b) for m in ("drmi", "random") for b in (20, 60)}
    for row in rows:
        assert row["queries"] == row["budget"]  # charged by the target's ledger, not counted by us
        assert 0.2 < row["accuracy"] <= 1 and 0.2 < row["fidelity"] <= 1  # learned well above chance (0.1)
        assert 0 <= row["transfer_rate"] <= 1
        assert row["prada_flagged_at"] is None or 100 < row["prada_flagged_at"] <= row["budget"]
    saved = json.loads((out / "results.json").read_text())
    assert saved == rows
    report = (out / "report.md").read_text()
    assert "| 60 |" in report and "drmi" in report and "random" in report and "PRADA" in report
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "results.csv").read_text().startswith("method,budget,seed,queries")
    assert ExperimentConfig.load(str(out / "config.json")) == config
    # every paid query is in the run's target journal, under its cell's key
    journal = read_journal(str(out / "target" / "journal.jsonl"))
    for row in rows:
        name = f"{row['method']}-{row['budget']}-{row['seed']}"
        assert sum(r["n"] for r in journal if r["type"] == "answer" and r["key"] == name) == row["budget"]
    # a rerun with another rate limit would change its keys: refused before any work
    config.target.rate_limit = 5.0
    with pytest.raises(ValueError, match="other settings"):
        run_experiment(config, str(out))


def test_cli_refuses_bad_budget_in_one_line(tmp_path, capsys):
    assert main(["run", "--quick", "--budgets", "50,5000", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "larger than the attacker's pool" in err
    assert not (tmp_path / "x").exists()


def test_drmi_reduce_on_an_image_folder(tmp_path, digits, ray_local):
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
