"""The `drmi` command's door: every setting and the run folder are checked before any work, and
every error that reaches the CLI is one line on stderr (exit 2), or a traceback with --debug.

No test here starts Ray or trains anything: the work itself is monkeypatched where it is reached.
"""

import argparse
import dataclasses
import os
import time

import pytest
import ray.exceptions

import drmi_ray.experiment  # noqa: F401 - imported here so timings below measure the command only
import drmi_ray.reduce
from drmi_ray.cli import main


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.strip().splitlines()) == 1, err
    return err


def reduce_args(out, *extra):
    return ["reduce", "--data", "bundled-mnist", "--budget", "5", "--out", str(out), *map(str, extra)]


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the CLI gets as far as starting the work."""
    def boom(*args, **kwargs):
        raise AssertionError("the command started work; the check should have come first")

    monkeypatch.setattr(drmi_ray.experiment, "run_experiment", boom)
    monkeypatch.setattr(drmi_ray.reduce, "run_reduce", boom)
    monkeypatch.setattr("ray.init", boom)


def test_bad_rate_limit_is_refused_before_any_work(tmp_path, capsys, no_work):
    out = tmp_path / "run"
    start = time.perf_counter()
    assert main(["run", "--rate-limit", "-1", "--out", str(out)]) == 2
    assert time.perf_counter() - start < 3
    err = one_line(capsys)
    assert "--rate-limit" in err and "leave the flag out" in err
    assert not out.exists() or not os.listdir(out)  # no run files


@pytest.mark.parametrize("flags, option", [
    (["--seeds", "0"], "--seeds"),
    (["--bins", "1"], "--bins"),
    (["--bins", "300"], "--bins"),
    (["--pool-size", "0"], "--pool-size"),
    (["--test-size", "0"], "--test-size"),
    (["--substitute-workers", "-1"], "--substitute-workers"),
    (["--pool-size", "4900"], "--pool-size"),  # with target and test splits, more than the 5,000 digits
    (["--target", "missing.pt"], "--target"),
    (["--pool", "mnist:/no/such/root"], "--pool"),
])
def test_run_settings_are_checked_up_front(tmp_path, capsys, no_work, flags, option):
    assert main(["run", *flags, "--out", str(tmp_path / "run")]) == 2
    assert option in one_line(capsys)
    assert not (tmp_path / "run").exists()


def drmi(argv) -> int:
    """``main``'s exit code, argparse's own refusals (SystemExit) included."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


def long_name(action) -> str:
    return next(o for o in action.option_strings if o.startswith("--"))


def cli_options():
    from drmi_ray.cli import build_parser

    for command, parser in build_parser().subcommands.items():
        for action in parser._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                yield command, action


def bad_values(action, tmp_path) -> list[list[str]]:
    """Argument lists that give ``action``'s option a bad value: from its kind (a flag, a choice,
    a number), or, for options that name a thing, from SPECIFIC below."""
    from drmi_ray.cli import int_list, str_list

    option = long_name(action)
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("not a checkpoint")
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    missing = str(tmp_path / "missing")
    specific = {
        "--out": [str(a_file)], "--config": [missing + ".json"], "--pool": [missing], "--data": [missing],
        "--test": [missing], "--target": [str(not_a_checkpoint)], "--substitute": ["no-such-net"],
        "--address": ["nowhere"], "--host": ["no-such-host.invalid"],  # drmi serve; tests/test_serve.py walks it fully
        "--target-url": ["ftp://host/x"], "--api-key": ["k"], "--eval-api-key": ["k"], "--target-model": ["m"],
        "--target-input": ["images"], "--target-datatype": ["FP32"], "--target-output": ["label"],
    }
    if option == "--data-root":  # only read by the paper protocols
        return [["--protocol", "paper-mnist", option, missing]]
    if option in specific:
        return [[option, v] for v in specific[option]]
    if action.nargs == 0:  # a flag takes no value
        return [[f"{option}=1"]]
    if action.choices:
        return [[option, "not-a-choice"]]
    generic = {int: ["-1", "1000000000000"], float: ["-1", "nan", "1e300"], int_list: ["0", "1000000000000"],
               str_list: ["no-such-method"]}
    if action.type in generic:
        return [[option, v] for v in generic[action.type]]
    pytest.fail(f"no bad value for {option}: add one to bad_values in tests/test_cli.py")


@pytest.mark.parametrize("command, action", list(cli_options()),
                         ids=[f"{c} {long_name(a)}" for c, a in cli_options()])
def test_every_option_refuses_a_bad_value_in_one_line_within_5_s(tmp_path, capsys, no_work, command, action):
    """Walks every option of `drmi run` and `drmi reduce` (an option added later is walked too):
    a bad value exits non-zero with one line on stderr naming the option, fast, before any work."""
    option = long_name(action)
    base = ["run", "--out", str(tmp_path / "run")] if command == "run" else reduce_args(tmp_path / "run")
    for bad in bad_values(action, tmp_path):
        start = time.perf_counter()
        code = drmi([*base, *bad])
        seconds = time.perf_counter() - start
        err = capsys.readouterr().err.strip()
        assert code not in (0, None), (bad, err)
        assert len(err.splitlines()) == 1 and option in err, (bad, err)
        assert seconds < 5, (bad, seconds)
        assert not (tmp_path / "run").exists()


def test_settings_refuse_bools_and_values_that_would_fail_late_naming_the_setting():
    """A stage refuses its own bad field when it is made (naming the field); --config's file names
    where it is; the runs' check() refuses what needs several fields."""
    from drmi_ray.config import (ExperimentConfig, ReduceConfig, ReducePoolConfig, ReduceSelectionConfig,
                                 SelectionConfig, TargetConfig)

    with pytest.raises(ValueError, match="--budgets"):
        ExperimentConfig(selection=SelectionConfig(budgets=(True, 50))).check()
    with pytest.raises(ValueError, match="^rate_limit must be a number > 0"):
        TargetConfig(rate_limit=True)
    with pytest.raises(ValueError, match=r"^prada_delta.*--no-prada"):
        TargetConfig(prada_delta=1.5)
    with pytest.raises(ValueError, match="^target.decimals must be"):
        ExperimentConfig.from_dict({"target": {"decimals": -1}})
    with pytest.raises(ValueError, match="^target.train.epochs must be a positive integer"):
        ExperimentConfig.from_dict({"target": {"train": {"epochs": 0}}})
    with pytest.raises(ValueError, match="^budget must be a positive integer"):
        ReduceSelectionConfig(budget=True)
    with pytest.raises(ValueError, match="--budget 50 is larger than --pool-size 10"):
        ReduceConfig(pool=ReducePoolConfig(pool=10), selection=ReduceSelectionConfig(budget=50)).check()


def test_a_config_file_that_gives_some_settings_keeps_the_runs_own_defaults_for_the_rest():
    from drmi_ray.config import ExperimentConfig, ReduceConfig

    reduce_config = ReduceConfig.from_dict({"substitute": {"epochs": 3}, "target": {"checkpoint": None}})
    assert reduce_config.substitute == dataclasses.replace(ReduceConfig().substitute, epochs=3)  # still ResNet18
    assert reduce_config.substitute.model == "resnet18" and reduce_config.target.prada_delta is None
    run_config = ExperimentConfig.from_dict({"target": {"train": {"model": "lenet5"}}})
    assert run_config.target.train.epochs == ExperimentConfig().target.train.epochs == 12


@pytest.mark.parametrize("flag", ["--budget", "--tile-size", "--max-pixels"])
def test_reduce_numbers_are_checked_up_front(tmp_path, capsys, no_work, flag):
    args = reduce_args(tmp_path / "r")
    args += [flag, "0"]  # the last --budget wins
    assert main(args) == 2
    err = one_line(capsys)
    assert flag in err and "positive integer" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", ["run", "reduce"])
def test_out_that_is_a_file_or_under_a_file_is_refused_in_one_line(tmp_path, capsys, no_work, command):
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a folder")
    args = ["run", "--out", str(a_file)] if command == "run" else reduce_args(a_file)
    assert main(args) == 2
    err = one_line(capsys)
    assert "--out" in err and "is a file" in err
    # a folder under a file cannot be created either
    args = ["run", "--out", str(a_file / "run")] if command == "run" else reduce_args(a_file / "run")
    assert main(args) == 2
    assert "cannot be created or written" in one_line(capsys)


def test_unwritable_out_is_refused_in_one_line(tmp_path, capsys, no_work):
    """A folder inside a regular file can be created by no one, root included (CI runs as root)."""
    plain = tmp_path / "plain-file"
    plain.write_text("not a folder")
    assert main(reduce_args(plain / "run")) == 2
    assert "cannot be created or written (Not a directory)" in one_line(capsys)


def test_check_out_creates_the_folder_empty_and_drops_the_trailing_slash(tmp_path):
    from drmi_ray.checks import check_out

    out = check_out(f"{tmp_path}/new/run/")
    assert out == f"{tmp_path}/new/run" and os.listdir(out) == []
    assert check_out(f"file://{tmp_path}/new/run").startswith("file://")


def task_error():
    cause = ValueError("tile (3, 4) of /runs/x/mi: magic bytes not found; delete it and rerun")
    return ray.exceptions.RayTaskError("compute_tile", "Traceback ...\nValueError: ...", cause).as_instanceof_cause()


def actor_init_error():
    tb = "Traceback (most recent call last):\n  File \"target.py\", line 1\nValueError: rate_limit must be > 0"
    return ray.exceptions.ActorDiedError(ray.exceptions.RayTaskError("TargetService.__init__", tb, ValueError("x")))


@pytest.mark.parametrize("error, expect", [
    (PermissionError(13, "Permission denied", "/runs/x/mi/tiles"), "Permission denied: '/runs/x/mi/tiles'; check the path"),
    (NotADirectoryError(20, "Not a directory", "/runs/x"), "NotADirectoryError"),
    (RuntimeError("Dataset not found.\nYou can use download=True"), "RuntimeError: Dataset not found."),
    (task_error(), "magic bytes not found; delete it and rerun"),
    (actor_init_error(), "ActorDiedError: ValueError: rate_limit must be > 0"),
    (ray.exceptions.GetTimeoutError("Get timed out: some object(s) not ready."), "Ray: GetTimeoutError"),
])
def test_errors_from_inside_the_command_are_one_line(tmp_path, capsys, monkeypatch, error, expect):
    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(drmi_ray.reduce, "run_reduce", fails)
    assert main(reduce_args(tmp_path / "r")) == 2
    err = one_line(capsys)
    assert err.startswith("drmi reduce: error: ") and expect in err
    assert "Traceback" not in err
    # --debug, before or after the subcommand: the full traceback instead
    for args in (["--debug", *reduce_args(tmp_path / "r")], [*reduce_args(tmp_path / "r"), "--debug"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "fails" in err


def test_an_error_inside_drmi_run_is_one_line_too(tmp_path, capsys, monkeypatch):
    def fails(config, out, address=None):
        raise task_error()

    monkeypatch.setattr(drmi_ray.experiment, "run_experiment", fails)
    assert main(["run", "--quick", "--out", str(tmp_path / "run")]) == 2
    assert "magic bytes not found" in one_line(capsys)


def test_interrupt_says_how_to_resume(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(drmi_ray.reduce, "run_reduce", interrupted)
    assert main(reduce_args(tmp_path / "r")) == 130
    err = one_line(capsys)
    assert "interrupted" in err and "same --out" in err


def test_reduce_config_file_repeats_a_run_and_flags_override_it(tmp_path, capsys, no_work):
    import json

    from drmi_ray.cli import build_parser, reduce_config
    from drmi_ray.config import MIConfig, ReduceConfig, ReduceSelectionConfig

    ran = ReduceConfig(selection=ReduceSelectionConfig(budget=7, partition="none"), mi=MIConfig(tile_size=500),
                       learn="auto")
    ran.substitute = dataclasses.replace(ran.substitute, model="lenet5", epochs=3)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(ran.to_dict()))  # as run_reduce writes it
    again = reduce_config(build_parser().parse_args(["reduce", "--config", str(path)]))
    assert again == ran
    changed = reduce_config(build_parser().parse_args(["reduce", "--config", str(path), "--seed", "3", "--epochs", "5"]))
    assert (changed.selection.seed, changed.substitute.epochs, changed.substitute.model, changed.mi.tile_size) == \
        (3, 5, "lenet5", 500)
    assert main(["reduce", "--out", str(tmp_path / "run")]) == 2  # neither --config nor --data and --budget
    assert "--data and --budget" in one_line(capsys)


def test_every_flag_default_is_the_dataclass_default():
    """The CLI adds no defaults of its own: a command line with no flags gives the dataclass's settings."""
    from drmi_ray.cli import build_config, build_parser, reduce_config
    from drmi_ray.config import ExperimentConfig, ReduceConfig

    assert build_config(build_parser().parse_args(["run"])) == ExperimentConfig()
    args = build_parser().parse_args(["reduce", "--data", "bundled-mnist", "--budget", "100"])
    assert reduce_config(args) == ReduceConfig()


def test_a_setting_declared_in_its_stage_gets_its_flag_default_help_and_check_with_nothing_else():
    """What adding a setting takes: one field in one stage dataclass. The parser, the flag's
    value, its refusal in one line and the config.json round trip come from the declaration."""
    from drmi_ray.cli import Parser, add_flags, apply_flags
    from drmi_ray.config import MIConfig, ReduceConfig
    from drmi_ray.settings import Checked, setting

    @dataclasses.dataclass
    class WiderMI(MIConfig, Checked):
        smoothing: int = setting(3, flag="--smoothing", help="new: smoothing window", least=0, most=9)

    @dataclasses.dataclass
    class WiderReduce(ReduceConfig):
        mi: WiderMI = setting(factory=WiderMI, help="mutual information")

    parser = Parser(prog="drmi reduce")
    parser.add_argument("--no-prada", action="store_true")
    add_flags(parser, WiderReduce())
    assert "new: smoothing window (default 3)" in " ".join(parser.format_help().split())
    config = apply_flags(WiderReduce(), parser.parse_args(["--smoothing", "5", "--bins", "16"]))
    assert (config.mi.smoothing, config.mi.bins) == (5, 16)
    with pytest.raises(ValueError, match="^--smoothing: smoothing must be an integer in 0..9, got 12$"):
        apply_flags(WiderReduce(), parser.parse_args(["--smoothing", "12"]))
    assert WiderReduce.from_dict(config.to_dict()) == config
