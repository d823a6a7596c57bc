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
from drmi_ray.config import API_KEY_ENV, CHOICES, EVAL_KEY_ENV, ExperimentConfig, ReduceConfig, apply_protocol, quick
from drmi_ray.runtime import log, setup_logging
from drmi_ray.service import serve_forever
from drmi_ray.service_protocol import OUTPUTS


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


def endpoint_arguments(p) -> None:
    """``--target-url`` and its options, the same for ``run`` and ``reduce``."""
    e = p.add_argument_group("attack an outside endpoint (any Open Inference Protocol v2 server) instead of --target")
    e.add_argument("--target-url", help="the endpoint's base URL (the part before /v2/...): the run's queries are spent "
                                        "there, and the referee scores black-box (see the README)")
    e.add_argument("--api-key", help=f"the API key the attack's queries are charged to (default ${API_KEY_ENV})")
    e.add_argument("--eval-api-key", help=f"the key the referee's queries are charged to: the test images and the "
                                          f"adversarial examples (default ${EVAL_KEY_ENV}, else --api-key)")
    e.add_argument("--eval-budget", type=int, help="refuse to start when the referee could need more queries than this")
    e.add_argument("--target-model", help="the model's name at the endpoint (default target)")
    e.add_argument("--target-input", help="the input's name (default: from the model's metadata)")
    e.add_argument("--target-datatype", help="the input's datatype, e.g. UINT8 or FP32 (FP32: pixels scaled to 0..1; "
                                             "default: from the metadata)")
    e.add_argument("--target-shape", type=int_list, help="one image's shape at the input, e.g. 784 or 1,28,28 "
                                                         "(default: from the metadata)")
    e.add_argument("--target-output", help="the output to ask for: labels or probability rows (default: the model's "
                                           "only output)")
    e.add_argument("--target-max-batch", type=int, help="images per request (default 64)")


ENDPOINT_FLAGS = {"url": "target_url", "api_key": "api_key", "eval_api_key": "eval_api_key",
                  "eval_budget": "eval_budget", "model": "target_model", "input_name": "target_input",
                  "datatype": "target_datatype", "shape": "target_shape", "output": "target_output",
                  "max_batch": "target_max_batch"}  # EndpointConfig field -> argparse dest


def endpoint_config(args, endpoint):
    """``endpoint`` (an EndpointConfig) with the ``--target-url`` options given; one of them
    without an endpoint URL is refused (it would be ignored)."""
    given = {field: getattr(args, dest) for field, dest in ENDPOINT_FLAGS.items() if getattr(args, dest) is not None}
    endpoint = dataclasses.replace(endpoint, **given)
    if endpoint.url is None and given:
        flag = "--" + ENDPOINT_FLAGS[next(iter(given))].replace("_", "-")
        raise ValueError(f"{flag} applies to an outside endpoint only: give --target-url too, or leave {flag} out")
    return endpoint


# ``drmi run``'s and ``drmi reduce``'s flags: (flag, the setting's path in the run's config, help).
# Type, default and choices come from the settings themselves (config.py, CHOICES); a flag left
# out keeps the setting of --config's file, else the dataclass default.
RUN_FLAGS = [
    ("--protocol", "pool.protocol", "the paper's settings; paper-* read torchvision data under --data-root"),
    ("--pool", "pool.source", "pool source: bundled-mnist, mnist:ROOT, cifar10:ROOT, or a URL"),
    ("--download", "pool.download", "let torchvision download MNIST / CIFAR-10 into ROOT"),
    ("--pool-size", "pool.pool", "images in the attacker's pool"),
    ("--test-size", "pool.test", "images in the test split"),
    ("--methods", "selection.methods", f"comma-separated methods, or 'all': {', '.join(METHODS)} (all are "
                                       "label-free: no method reads the pool's labels)"),
    ("--budgets", "selection.budgets", "comma-separated query budgets"),
    ("--seeds", "selection.seeds", "seeds per (method, budget) cell"),
    ("--target", "target.checkpoint", "a trained target checkpoint to attack instead of training one"),
    ("--substitute", "substitute.model", "substitute architecture"),
    ("--bins", "mi.bins", "MI grey levels"),
    ("--color", "mi.color", "MI colour mode"),
    ("--rate-limit", "target.rate_limit", "target's answer rate in images/s (default unlimited)"),
    ("--burst", "target.burst", "images the rate limiter lets through at once"),
    ("--output", "target.output", "what the target answers"),
    ("--target-replicas", "target.replicas", "model replicas behind the target's HTTP API"),
    ("--serve-port", "target.port", "the target's HTTP port on 127.0.0.1 when this run starts Ray Serve "
                                    "(default: a free port; a taken one is refused)"),
    ("--substitute-workers", "substitute_workers", "Ray Train workers per substitute fit (0 = local mode)"),
    ("--learn", "learn", "what a substitute learns from: the target's answers alone, or the whole unlabeled pool "
                         "with the answers spread over the MI graph (the pool's own labels are never read); auto "
                         "picks by the rule in drmi_ray/spread.py (C3F2 substitutes gain nothing from the pool; "
                         "LeNet-5 ones gain accuracy and transfer: see the README)"),
    ("--augment", "substitute.augment", "substitute training augmentation: digits (small affine moves), photos "
                                        "(crop and flip), auto (by channels), none"),
]
REDUCE_FLAGS = [
    ("--data", "data", "the pool: an ImageFolder tree or Parquet shards (path or fsspec URL), bundled-mnist, "
                       "mnist:ROOT or cifar10:ROOT (required unless --config gives it)"),
    ("--budget -k", "budget", "K, the number of images to select (required unless --config gives it)"),
    ("--size", "size", "decode image files to SIZE x SIZE (default: their own size, all equal)"),
    ("--rgb", "rgb", "decode image files as RGB (default grey)"),
    ("--pool-size", "pool_size", "use a seeded random subset of this many pool images"),
    ("--download", "download", "let torchvision download mnist:/cifar10: data into ROOT"),
    ("--max-pixels", "max_pixels", "skip (and list) image files above this many pixels"),
    ("--batch-files", "batch_files", "files per decode unit"),
    ("--partition", "partition", "MI and selection per k-means cluster of the images (label-free), per class "
                                 "using the pool's own labels (class folders / 'label' column: only if you want "
                                 "labels used), or one global matrix"),
    ("--clusters", "clusters", "k-means clusters (default: one per 1,300 images)"),
    ("--bins", "mi.bins", "MI grey levels"),
    ("--color", "mi.color", "MI colour mode"),
    ("--tile-size", "tile_size", "MI tile side"),
    ("--max-in-flight", "max_in_flight", "MI tiles in flight per partition"),
    ("--gpus-per-tile", "gpus_per_tile", "GPUs each MI tile task asks for (0: CPU)"),
    ("--parallel-partitions", "parallel_partitions", "partitions whose MI is computed at once"),
    ("--dense-max", "dense_max", "partitions up to this size select on a dense matrix; larger ones use Ray actors"),
    ("--num-actors", "num_actors", "optimizer actors for partitions above --dense-max"),
    ("--store-dtype", "store_dtype", "MI tile store values (float32 halves the storage; float64 is exact)"),
    ("--seed", "seed", "seed of the subset, k-means and the search"),
]
REDUCE_ATTACK_FLAGS = [  # drmi reduce's optional attack with the selection
    ("--target", "target", "a target checkpoint: query it with the selection, fit a substitute, attack"),
    ("--serve-port", "serve_port", "the target's HTTP port on 127.0.0.1 when this run starts Ray Serve "
                                   "(default: a free port; a taken one is refused)"),
    ("--test", "test", "the referee's labelled held-out ImageFolder/Parquet (default: the source's test split for "
                       "mnist:/cifar10:, else unselected labelled pool images)"),
    ("--test-size", "test_size", "referee's held-out images"),
    ("--substitute", "substitute.model", "substitute architecture (random init)"),
    ("--epochs", "substitute.epochs", "substitute training epochs"),
    ("--min-steps", "substitute.min_steps", "substitute optimizer steps at least"),
    ("--train-batch", "substitute.batch_size", "substitute training batch"),
    ("--substitute-workers", "substitute_workers", "Ray Train workers for the substitute (0 = Train's local mode)"),
    ("--substitute-gpu", "substitute_gpu", "train the substitute on GPUs"),
    ("--learn", "learn", "what a substitute learns from: the target's answers alone, or the whole unlabeled pool "
                         "with the answers spread over the MI graph of its partition (the pool's own labels are "
                         "never read); auto picks by the rule in drmi_ray/spread.py"),
    ("--augment", "substitute.augment", "substitute training augmentation: digits, photos, auto (by channels) or none"),
    ("--eps", "attack.eps", "PGD L-inf radius"),
    ("--pgd-steps", "attack.steps", "PGD steps"),
]
KINDS = {"int": int, "float": float, "str": str, "tuple[int, ...]": int_list, "tuple[str, ...]": str_list}


def setting(config, path: str):
    """``(dataclasses.Field, value)`` of the setting at ``path`` ("pool.source") in ``config``."""
    *parents, name = path.split(".")
    for part in parents:
        config = getattr(config, part)
    return next(f for f in dataclasses.fields(config) if f.name == name), getattr(config, name)


def add_flags(p, flags, defaults) -> None:
    """One option per flag of ``flags``, its type, choices and default from ``defaults`` (a config)."""
    for flag, path, text in flags:
        names = flag.split()  # the flag and its short aliases
        f, value = setting(defaults, path)
        kind = str(f.type).split(" | ")[0]
        if kind == "bool":
            p.add_argument(*names, dest=path, action="store_true", default=None, help=text)
            continue
        if value is not None and "(default" not in text:
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            text += f" (default {shown:,})" if isinstance(value, int) and value >= 10_000 else f" (default {shown})"
        metavar = None if path in CHOICES else names[0].lstrip("-").upper().replace("-", "_")
        p.add_argument(*names, dest=path, choices=CHOICES.get(path), metavar=metavar, type=KINDS[kind], default=None,
                       help=text)


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


def apply_flags(config, args, flags):
    """``config`` with every flag of ``flags`` the user gave; a value its dataclass refuses is one
    line naming the flag."""
    for flag, path, _ in flags:
        value = getattr(args, path)
        if value is None:
            continue
        try:
            config = with_settings(config, {path: value})
        except ValueError as err:
            raise ValueError(f"{flag.split()[0]}: {err}") from None
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
                                                        "target and substitutes (about 2 minutes)")
    p.add_argument("--config", help="repeat a run from its config.json (flags given here override it)")
    p.add_argument("--data-root", help="folder of torchvision MNIST / CIFAR-10 for --protocol paper-* (default ./data)")
    add_flags(p, RUN_FLAGS, ExperimentConfig())
    p.add_argument("--no-prada", action="store_true", help="switch the target's PRADA detector off")
    p.add_argument("--address", help="Ray cluster address (default: the cluster of `ray job submit`, else a local one)")
    endpoint_arguments(p)


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
        config = apply_protocol(config, protocol, args.data_root or "data")
    if getattr(args, "selection.methods") == ("all",):
        setattr(args, "selection.methods", METHODS)
    if args.quick:
        config = quick(config)
    config = apply_flags(config, args, [f for f in RUN_FLAGS if f[0] != "--protocol"])
    if args.no_prada:
        config.target = dataclasses.replace(config.target, prada_delta=None)
    config.endpoint = endpoint_config(args, config.endpoint)
    return config


def reduce_parser(sub) -> None:
    p = sub.add_parser("reduce", help="pool -> the K least redundant images (selection.json); optionally attack with them",
                       description="One pipeline behind `drmi reduce`, jobs/imagenet.py and jobs/cifar10.py "
                                   "(see drmi_ray/reduce.py and the README's selection.json section).")
    p.add_argument("--out", help="run folder (path or fsspec URL); default: a new folder under runs/")
    p.add_argument("--config", help="repeat a run from its config.json (flags given here override it)")
    add_flags(p, REDUCE_FLAGS, ReduceConfig())
    add_flags(p.add_argument_group("optional attack with the selection"), REDUCE_ATTACK_FLAGS, ReduceConfig())
    p.add_argument("--address", help="Ray address (default: the `ray job submit` cluster, else a local Ray)")
    endpoint_arguments(p)


def reduce_config(args):
    config = load_settings(ReduceConfig, args)
    if not args.config:
        missing = [flag for flag, path in (("--data", "data"), ("--budget", "budget")) if getattr(args, path) is None]
        if missing:
            raise ValueError(f"drmi reduce needs {' and '.join(missing)} (or --config RUN/config.json)")
    config = apply_flags(config, args, REDUCE_FLAGS + REDUCE_ATTACK_FLAGS)
    config.endpoint = endpoint_config(args, config.endpoint)
    return config


def serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="the metered target on its own (keys, budgets, journal) until Ctrl-C",
                       description="Serve a target checkpoint over HTTP (Open Inference Protocol v2, API keys, "
                                   "budgets) on a local Ray until Ctrl-C or SIGTERM; serving the same --out again "
                                   "resumes every key's budget (see drmi_ray/service.py).")
    p.add_argument("--target", required=True, help="the target checkpoint (.pt written by drmi run or target.train_target)")
    p.add_argument("--out", required=True, help="local folder for the journal and the operator key (FOLDER/target/)")
    p.add_argument("--port", type=int, help="HTTP port (default: a free port; a taken one is refused)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: every interface)")
    p.add_argument("--output", choices=OUTPUTS, default="label", help="what the target answers (default label)")
    p.add_argument("--replicas", type=int, default=1, help="model replicas behind the HTTP API (default 1)")
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
