"""The ``drmi`` command: ``drmi run`` (the experiment), ``drmi reduce`` (pool URL -> selection) and
``drmi serve`` (the metered target on its own)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import traceback

from ray.exceptions import ActorDiedError, RayError, RayTaskError

from drmi_ray import experiment, reduce, report
from drmi_ray.acquisition import METHODS
from drmi_ray.checks import check_address, check_exists, check_out
from drmi_ray.config import ExperimentConfig, ReduceConfig, TargetConfig
from drmi_ray.runtime import log, setup_logging
from drmi_ray.service import serve_forever
from drmi_ray.service_protocol import OUTPUTS
from drmi_ray.settings import choices_of, kind_of


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 50,100,200, got {text!r}") from None


def str_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


class Parser(argparse.ArgumentParser):
    """argparse whose errors (a bad int, an unknown choice, a missing option) are one line too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


KINDS = {"int": int, "float": float, "str": str, "tuple[int, ...]": int_list, "tuple[str, ...]": str_list}


def flagged(config, path: str = "", title: str | None = None):
    """``(group title, setting path, field, default)`` of each setting of ``config`` that declares a
    flag (``settings.setting``), walking its stages; a stage declared with ``flag=False`` has none."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            if f.metadata.get("flag") is not False:
                yield from flagged(value, f"{path}{f.name}.", f.metadata.get("help") or title)
        elif f.metadata.get("flag"):
            yield title, path + f.name, f, value


def add_flags(p, defaults) -> None:
    """One option per flagged setting of ``defaults`` (a run's config), grouped by stage: its type,
    default, choices and help from the setting's declaration. A flag left out is None in ``args``
    (the setting keeps --config's value, else its default)."""
    groups = {None: p}
    for title, path, f, value in flagged(defaults):
        group = groups.setdefault(title, p.add_argument_group(title))
        names, text, choices = f.metadata["flag"].split(), f.metadata["help"], choices_of(f)
        kind = kind_of(f)[0]
        if kind == "bool":
            group.add_argument(*names, dest=path, action="store_true", default=None, help=text)
            continue
        if value is not None and "(default" not in text:
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            text += f" (default {shown:,})" if isinstance(value, int) and value >= 10_000 else f" (default {shown})"
        metavar = None if choices else names[0].lstrip("-").upper().replace("-", "_")
        group.add_argument(*names, dest=path, choices=None if choices is None else list(choices), metavar=metavar,
                           type=KINDS[kind], default=None, help=text)


def with_settings(config, values: dict):
    """``config`` with the settings ``{path: value}`` replaced (nested dataclasses too)."""
    here, below = {}, {}
    for path, value in values.items():
        head, _, rest = path.partition(".")
        if rest:
            below.setdefault(head, {})[rest] = value
        else:
            here[head] = value
    here.update({head: with_settings(getattr(config, head), inner) for head, inner in below.items()})
    return dataclasses.replace(config, **here)


def apply_flags(config, args, skip=()):
    """``config`` with every flagged setting the user gave (but those in ``skip``); a value its
    stage refuses is one line naming the flag."""
    for _, path, f, _ in list(flagged(config)):
        value = getattr(args, path)
        if value is None or path in skip:
            continue
        try:
            config = with_settings(config, {path: value})
        except ValueError as err:
            raise ValueError(f"{f.metadata['flag'].split()[0]}: {err}") from None
    if args.no_prada:
        config = with_settings(config, {"target.prada_delta": None})
    return config


def load_settings(kind, args):
    """The settings of ``--config FILE`` (a run folder's config.json), or the defaults."""
    if not args.config:
        return kind()
    try:
        return kind.load(args.config)
    except (OSError, ValueError, TypeError) as err:  # missing, not JSON, unknown or bad settings
        raise ValueError(f"--config {args.config}: {str(err).splitlines()[0] if str(err) else type(err).__name__}; "
                         f"give a config.json written by drmi {args.command}") from err


def run_parser(sub) -> None:
    p = sub.add_parser("run", help="the DRMI experiment: select, query, fit substitutes, attack, report")
    p.add_argument("--out", help="run folder (path or fsspec URL); default: a new folder under runs/")
    p.add_argument("--quick", action="store_true", help="small version: 600-image pool, budgets 50,200, LeNet-5 "
                                                        "target and substitutes (2-3 minutes on 2 cores)")
    p.add_argument("--config", help="repeat a run from its config.json (flags given here override it)")
    p.add_argument("--data-root", help="folder of torchvision MNIST / CIFAR-10 for --protocol paper-* (default ./data)")
    p.add_argument("--address", help="Ray cluster address (default: the cluster of `ray job submit`, else a local one)")
    p.add_argument("--no-prada", action="store_true", help="switch the target's PRADA detector off")
    add_flags(p, ExperimentConfig())


def build_config(args):
    config = load_settings(ExperimentConfig, args)
    protocol = getattr(args, "pool.protocol")
    if args.data_root is not None:
        if not (protocol or "").startswith("paper-"):
            raise ValueError("--data-root applies to --protocol paper-mnist or paper-cifar10 only; "
                             "give the protocol, or --pool mnist:ROOT")
        if not getattr(args, "pool.download"):
            check_exists("--data-root", args.data_root, "the torchvision data (or pass --download)")
    if protocol:
        config = experiment.apply_protocol(config, protocol, args.data_root or "data")
    if getattr(args, "selection.methods") == ("all",):
        setattr(args, "selection.methods", METHODS)
    if args.quick:
        config = experiment.quick(config)
    return apply_flags(config, args, skip=("pool.protocol",))


def reduce_parser(sub) -> None:
    p = sub.add_parser("reduce", help="pool -> the K least redundant images (selection.json); optionally attack with them",
                       description="One pipeline behind `drmi reduce`, jobs/imagenet.py and jobs/cifar10.py "
                                   "(see drmi_ray/reduce.py and the README's selection.json section).")
    p.add_argument("--out", help="run folder (path or fsspec URL); default: a new folder under runs/")
    p.add_argument("--config", help="repeat a run from its config.json (flags given here override it)")
    p.add_argument("--address", help="Ray address (default: the `ray job submit` cluster, else a local Ray)")
    p.add_argument("--no-prada", action="store_true", help="switch the target's PRADA detector off")
    add_flags(p, ReduceConfig())


def reduce_config(args):
    config = load_settings(ReduceConfig, args)
    if not args.config:
        needed = (("--data", "pool.source"), ("--budget", "selection.budget"))
        missing = [flag for flag, path in needed if getattr(args, path) is None]
        if missing:
            raise ValueError(f"drmi reduce needs {' and '.join(missing)} (or --config RUN/config.json)")
    return apply_flags(config, args)


def serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="the metered target on its own (keys, budgets, journal) until Ctrl-C",
                       description="Serve a target checkpoint over HTTP (Open Inference Protocol v2, API keys, "
                                   "budgets) on a local Ray until Ctrl-C or SIGTERM; serving the same --out again "
                                   "resumes every key's budget (see drmi_ray/service.py).")
    p.add_argument("--target", required=True, help="the target checkpoint (.pt written by drmi run or target.train_target)")
    p.add_argument("--out", required=True, help="local folder for the journal and the operator key (FOLDER/target/)")
    served = TargetConfig()  # the same defaults as the target drmi run serves
    p.add_argument("--port", type=int, help="HTTP port (default: a free port; a taken one is refused)")
    p.add_argument("--host", default=served.host,
                   help=f"address to listen on (default {served.host}; 0.0.0.0: every interface)")
    p.add_argument("--output", choices=OUTPUTS, default=served.output, help=f"what the target answers (default {served.output})")
    p.add_argument("--replicas", type=int, default=served.replicas,
                   help=f"model replicas behind the HTTP API (default {served.replicas})")
    p.set_defaults(address=None)  # always a local Ray of its own


def serve_main(args) -> None:
    """``drmi serve``: print the base URL and how to make a key, then serve until Ctrl-C."""
    key_file = os.path.join(args.out.rstrip("/"), "target", "operator.key")

    def ready(service):
        print(f'target: {service.url}  (model "{service.model}"; operator key in {key_file})')
        print(f"make a key: curl -X POST {service.url}/v2/operator/keys -H \"Authorization: Bearer "
              f"$(cat {shlex.quote(key_file)})\" -d '{{\"name\": \"alice\", \"budget\": 1000}}'")
        print("Ctrl-C stops it; serving the same --out again resumes every key's budget", flush=True)

    serve_forever(args.target, args.out, ready=ready, host=args.host, port=args.port, output=args.output,
                  replicas=args.replicas)
    log.info(f"target stopped; journal and operator key in {os.path.dirname(key_file)}")


def one_line(err: BaseException) -> str:
    """An error as one line with what to do: Ray errors show their underlying cause, OS and
    runtime errors say where to look; our own ValueErrors already carry the fix."""
    while isinstance(err, RayTaskError) and err.cause is not None and err.cause is not err:
        err = err.cause  # a task/actor raised: its own exception, not Ray's wrapper
    lines = [x.strip() for x in str(err).splitlines() if x.strip()]
    if isinstance(err, ActorDiedError) and err.actor_init_failed and lines:
        text = lines[-1]  # the creation task's traceback ends with "SomeError: message"
    else:
        text = lines[0] if lines else ""
    name = type(err).__name__
    if isinstance(err, (ValueError, TypeError)) and not isinstance(err, RayError):
        return text or name
    if isinstance(err, RayError):  # before OSError: GetTimeoutError is a TimeoutError
        return f"Ray: {name}: {text}; check the cluster (ray status) or rerun with --debug for the traceback"
    if isinstance(err, FileNotFoundError):
        return f"{text or name}; check the path or URL"
    if isinstance(err, OSError):
        return f"{name}: {text}; check the path, its permissions and free space"
    return f"{name}: {text}; rerun with --debug for the traceback"


def build_parser() -> Parser:
    """The ``drmi`` parser; ``.subcommands`` maps each command's name to its own parser."""
    parser = Parser(prog="drmi", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser(sub)
    reduce_parser(sub)
    serve_parser(sub)
    for p in sub.choices.values():  # `drmi run --debug ...` too; SUPPRESS keeps `drmi --debug run` working
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback")
    parser.subcommands = sub.choices
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        setup_logging()
        check_address("--address", args.address)
        if args.command == "run":
            config = build_config(args)
            config.check()  # every setting, then the run folder, before Ray starts
            out = check_out(args.out or report.new_run_folder("mnist"))
            experiment.run_experiment(config, out, address=args.address)
            log.info(f"wrote {out}/report.md (results.json, results.csv, results.png)")
        elif args.command == "serve":
            serve_main(args)
        else:
            config = reduce_config(args)
            config.check()
            out = check_out(args.out or report.new_run_folder("reduce"))
            reduce.run_reduce(config, out, address=args.address)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print(f"drmi {args.command}: interrupted; rerun the same command with the same --out to resume",
              file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the door: every error becomes one line (or --debug's traceback)
        if args.debug:
            traceback.print_exc()
        else:
            print(f"drmi {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
