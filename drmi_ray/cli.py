"""The ``drmi`` command: ``drmi run`` (the experiment), ``drmi reduce`` (pool URL -> selection) and
``drmi serve`` (the metered target on its own)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback


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
    from drmi_ray.config import API_KEY_ENV, EVAL_KEY_ENV

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


def run_parser(sub) -> None:
    from drmi_ray.models import AUGMENTS
    from drmi_ray.spread import LEARN_MODES

    p = sub.add_parser("run", help="the DRMI experiment: select, query, fit substitutes, attack, report")
    p.add_argument("--out", help="run folder (path or fsspec URL); default: a new folder under runs/")
    p.add_argument("--quick", action="store_true", help="small version: 600-image pool, budgets 50,200, LeNet-5 target and substitutes (about 2 minutes)")
    p.add_argument("--config", help="repeat a run from its config.json (flags given here override it)")
    p.add_argument("--protocol", choices=("bundled-mnist", "paper-mnist", "paper-cifar10"),
                   help="the paper's settings (default bundled-mnist); paper-* read torchvision data under --data-root")
    p.add_argument("--data-root", help="folder of torchvision MNIST / CIFAR-10 for --protocol paper-* (default ./data)")
    p.add_argument("--pool", dest="source", help="pool source: bundled-mnist (default), mnist:ROOT, cifar10:ROOT, or a URL")
    p.add_argument("--download", action="store_true", help="let torchvision download MNIST / CIFAR-10 into ROOT")
    p.add_argument("--pool-size", type=int, help="images in the attacker's pool (default 2000)")
    p.add_argument("--test-size", type=int, help="images in the test split (default 1000)")
    p.add_argument("--methods", type=str_list,
                   help="comma-separated methods, or 'all': drmi, random, cmal, cpb, trace, kcenter, jbda, "
                        "drmi-sqrt, drmi-joint, drmi-balanced, drmi-typical, drmi-cover, drmi-mix "
                        "(default drmi,random; all are label-free: no method reads the pool's labels)")
    p.add_argument("--budgets", type=int_list, help="comma-separated query budgets (default 50,100,200,400,600)")
    p.add_argument("--seeds", type=int, help="seeds per (method, budget) cell (default 1)")
    p.add_argument("--target", dest="checkpoint", help="a trained target checkpoint to attack instead of training one")
    p.add_argument("--substitute", dest="substitute_model", help="substitute architecture: lenet5, c3f2 (default), dnn5")
    p.add_argument("--bins", type=int, help="MI grey levels (default 256)")
    p.add_argument("--color", choices=("flatten", "luminance"), help="MI colour mode (default flatten)")
    p.add_argument("--rate-limit", type=float, help="target's answer rate in images/s (default unlimited)")
    p.add_argument("--burst", type=float, help="images the rate limiter lets through at once (default 1)")
    p.add_argument("--output", choices=("label", "probs", "top1", "rounded"), help="what the target answers (default label)")
    p.add_argument("--target-replicas", type=int, help="model replicas behind the target's HTTP API (default 1)")
    p.add_argument("--serve-port", type=int, help="the target's HTTP port on 127.0.0.1 when this run starts Ray Serve "
                                                  "(default: a free port; a taken one is refused)")
    p.add_argument("--no-prada", action="store_true", help="switch the target's PRADA detector off")
    p.add_argument("--substitute-workers", type=int, help="Ray Train workers per substitute fit (default 1; 0 = local mode)")
    p.add_argument("--learn", choices=LEARN_MODES,
                   help="what a substitute learns from: the target's answers alone, or the whole unlabeled pool with the answers "
                        "spread over the MI graph (the pool's own labels are never read); auto picks by the rule in "
                        "drmi_ray/spread.py (default answers: transfers best; auto, with --augment auto, extracts best)")
    p.add_argument("--augment", choices=AUGMENTS,
                   help="substitute training augmentation: digits (small affine moves), photos (crop and flip), "
                        "auto (by channels), none (default)")
    p.add_argument("--address", help="Ray cluster address (default: the cluster of `ray job submit`, else a local one)")
    endpoint_arguments(p)


def build_config(args):
    from drmi_ray.baselines import METHODS
    from drmi_ray.config import ExperimentConfig, apply_protocol, check_exists, quick

    if args.config:
        try:
            config = ExperimentConfig.load(args.config)
        except (OSError, ValueError, TypeError) as err:  # missing, not JSON, unknown or bad settings
            raise ValueError(f"--config {args.config}: {str(err).splitlines()[0] if str(err) else type(err).__name__}; "
                             "give a config.json written by drmi run") from err
    else:
        config = ExperimentConfig()
    if args.data_root is not None:
        if not (args.protocol or "").startswith("paper-"):
            raise ValueError("--data-root applies to --protocol paper-mnist or paper-cifar10 only; "
                             "give the protocol, or --pool mnist:ROOT")
        if not args.download:
            check_exists("--data-root", args.data_root, "the torchvision data (or pass --download)")
    if args.protocol:
        config = apply_protocol(config, args.protocol, args.data_root or "data")
    if args.methods == ("all",):
        args.methods = METHODS
    if args.quick:
        config = quick(config)
    r = dataclasses.replace
    pool = {k: v for k, v in (("source", args.source), ("download", args.download or None),
                              ("pool", args.pool_size), ("test", args.test_size)) if v is not None}
    sel = {k: v for k, v in (("methods", args.methods), ("budgets", args.budgets), ("seeds", args.seeds)) if v is not None}
    mi = {k: v for k, v in (("bins", args.bins), ("color", args.color)) if v is not None}
    target = {k: v for k, v in (("checkpoint", args.checkpoint), ("rate_limit", args.rate_limit),
                                ("burst", args.burst), ("output", args.output), ("replicas", args.target_replicas),
                                ("port", args.serve_port)) if v is not None}
    if args.no_prada:
        target["prada_delta"] = None
    config = r(config, pool=r(config.pool, **pool), selection=r(config.selection, **sel), mi=r(config.mi, **mi),
               target=r(config.target, **target))
    if args.substitute_model:
        try:
            config.substitute = r(config.substitute, model=args.substitute_model)
        except ValueError as err:
            raise ValueError(f"--substitute: {err}") from None
    if args.substitute_workers is not None:
        config.substitute_workers = args.substitute_workers
    if args.learn is not None:
        config.learn = args.learn
    if args.augment is not None:
        config.substitute = r(config.substitute, augment=args.augment)
    config.endpoint = endpoint_config(args, config.endpoint)
    return config


def reduce_parser(sub) -> None:
    from drmi_ray.config import ReduceConfig
    from drmi_ray.models import AUGMENTS
    from drmi_ray.spread import LEARN_MODES

    d = ReduceConfig()
    p = sub.add_parser("reduce", help="pool -> the K least redundant images (selection.json); optionally attack with them",
                       description="One pipeline behind `drmi reduce`, jobs/imagenet.py and jobs/cifar10.py "
                                   "(see drmi_ray/reduce.py and the README's selection.json section).")
    p.add_argument("--data", required=True,
                   help="the pool: an ImageFolder tree or Parquet shards (path or fsspec URL), bundled-mnist, "
                        "mnist:ROOT or cifar10:ROOT")
    p.add_argument("--budget", "-k", type=int, required=True, help="K, the number of images to select")
    p.add_argument("--out", help="run folder (path or fsspec URL); default: a new folder under runs/")
    p.add_argument("--size", type=int, help="decode image files to SIZE x SIZE (default: their own size, all equal)")
    p.add_argument("--rgb", action="store_true", help="decode image files as RGB (default grey)")
    p.add_argument("--pool-size", type=int, help="use a seeded random subset of this many pool images")
    p.add_argument("--download", action="store_true", help="let torchvision download mnist:/cifar10: data into ROOT")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels,
                   help=f"skip (and list) image files above this many pixels (default {d.max_pixels:,})")
    p.add_argument("--batch-files", type=int, default=d.batch_files, help=f"files per decode unit (default {d.batch_files})")
    p.add_argument("--partition", choices=("kmeans", "label", "none"), default=d.partition,
                   help="MI and selection per k-means cluster of the images (default; label-free), per class "
                        "using the pool's own labels (class folders / 'label' column: only if you want labels "
                        "used), or one global matrix")
    p.add_argument("--clusters", type=int, help="k-means clusters (default: one per 1,300 images)")
    p.add_argument("--bins", type=int, default=d.mi.bins, help=f"MI grey levels (default {d.mi.bins})")
    p.add_argument("--color", choices=("flatten", "luminance"), default=d.mi.color)
    p.add_argument("--tile-size", type=int, default=d.tile_size,
                   help=f"MI tile side (default {d.tile_size}: one tile per ImageNet class)")
    p.add_argument("--max-in-flight", type=int, default=d.max_in_flight,
                   help=f"MI tiles in flight per partition (default {d.max_in_flight})")
    p.add_argument("--gpus-per-tile", type=float, default=d.gpus_per_tile, help="GPUs each MI tile task asks for (default 0: CPU)")
    p.add_argument("--parallel-partitions", type=int, default=d.parallel_partitions,
                   help=f"partitions whose MI is computed at once (default {d.parallel_partitions})")
    p.add_argument("--dense-max", type=int, default=d.dense_max,
                   help=f"partitions up to this size select on a dense matrix; larger ones use Ray actors (default {d.dense_max})")
    p.add_argument("--num-actors", type=int, default=d.num_actors, help="optimizer actors for partitions above --dense-max")
    p.add_argument("--store-dtype", choices=("float64", "float32"), default=d.store_dtype,
                   help="MI tile store values (float32 halves the storage; default float64, exact)")
    p.add_argument("--seed", type=int, default=d.seed)
    a = p.add_argument_group("optional attack with the selection")
    a.add_argument("--target", help="a target checkpoint: query it with the selection, fit a substitute, attack")
    a.add_argument("--serve-port", type=int, default=d.serve_port,
                   help="the target's HTTP port on 127.0.0.1 when this run starts Ray Serve (default: a free port; "
                        "a taken one is refused)")
    a.add_argument("--test", help="the referee's labelled held-out ImageFolder/Parquet (default: the source's test "
                                  "split for mnist:/cifar10:, else unselected labelled pool images)")
    a.add_argument("--test-size", type=int, default=d.test_size, help=f"referee's held-out images (default {d.test_size})")
    a.add_argument("--substitute", default=d.substitute.model,
                   help="substitute architecture (resnet18, resnet152, inception_v3, or lenet5/c3f2/dnn5); random init")
    a.add_argument("--epochs", type=int, default=d.substitute.epochs)
    a.add_argument("--min-steps", type=int, default=d.substitute.min_steps)
    a.add_argument("--train-batch", type=int, default=d.substitute.batch_size)
    a.add_argument("--substitute-workers", type=int, default=d.substitute_workers,
                   help="Ray Train workers for the substitute (default 1; 0 = Train's local mode)")
    a.add_argument("--substitute-gpu", action="store_true", help="train the substitute on GPUs")
    a.add_argument("--learn", choices=LEARN_MODES, default=d.learn,
                   help="what a substitute learns from: the target's answers alone, or the whole unlabeled pool with the answers "
                        "spread over the MI graph of its partition (the pool's own labels are never read); auto picks by the rule in "
                        "drmi_ray/spread.py (default answers: transfers best; auto, with --augment auto, extracts best)")
    a.add_argument("--augment", choices=AUGMENTS, default=d.substitute.augment,
                   help="substitute training augmentation: digits, photos, auto (by channels) or none (default)")
    a.add_argument("--eps", type=float, default=d.attack.eps, help=f"PGD L-inf radius (default {d.attack.eps})")
    a.add_argument("--pgd-steps", type=int, default=d.attack.steps, help=f"PGD steps (default {d.attack.steps})")
    p.add_argument("--address", help="Ray address (default: the `ray job submit` cluster, else a local Ray)")
    endpoint_arguments(p)


def reduce_config(args):
    from drmi_ray.attack import AttackConfig
    from drmi_ray.config import (ATTACK_FLAGS, SUBSTITUTE_FLAGS, EndpointConfig, MIConfig, ReduceConfig,
                                 check_attack, check_train)
    from drmi_ray.models import TrainConfig

    # the stage dataclasses refuse bad values naming their fields, not the flags: check first
    train = {"model": args.substitute, "epochs": args.epochs, "min_steps": args.min_steps,
             "batch_size": args.train_batch, "augment": args.augment}
    attack = {"eps": args.eps, "steps": args.pgd_steps}
    check_train(train, SUBSTITUTE_FLAGS.get)
    check_attack(attack, ATTACK_FLAGS.get)
    return ReduceConfig(
        data=args.data, budget=args.budget, size=args.size, rgb=args.rgb, pool_size=args.pool_size,
        download=args.download, max_pixels=args.max_pixels, batch_files=args.batch_files, partition=args.partition,
        clusters=args.clusters, mi=MIConfig(bins=args.bins, color=args.color), tile_size=args.tile_size,
        max_in_flight=args.max_in_flight, gpus_per_tile=args.gpus_per_tile, store_dtype=args.store_dtype,
        parallel_partitions=args.parallel_partitions, dense_max=args.dense_max, num_actors=args.num_actors,
        seed=args.seed, target=args.target, serve_port=args.serve_port, test=args.test, test_size=args.test_size,
        substitute=TrainConfig(**train), attack=AttackConfig(**attack),
        substitute_workers=args.substitute_workers, substitute_gpu=args.substitute_gpu, learn=args.learn,
        endpoint=endpoint_config(args, EndpointConfig()))


def serve_parser(sub) -> None:
    from drmi_ray.service import OUTPUTS

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
    import os
    import shlex

    from drmi_ray.runtime import log
    from drmi_ray.service import serve_forever

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
    from ray.exceptions import ActorDiedError, RayError, RayTaskError

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
        from drmi_ray import report
        from drmi_ray.config import check_address, check_out
        from drmi_ray.runtime import log, setup_logging

        setup_logging()
        check_address("--address", args.address)
        if args.command == "run":
            from drmi_ray.experiment import check_config, run_experiment

            config = build_config(args)
            check_config(config)  # every setting, then the run folder, before Ray starts
            out = check_out(args.out or report.new_run_folder("mnist"))
            if args.address:
                from drmi_ray.runtime import init_ray

                init_ray(args.address)
            run_experiment(config, out)
            log.info(f"wrote {out}/report.md (results.json, results.csv, results.png)")
        elif args.command == "serve":
            serve_main(args)
        else:
            from drmi_ray import reduce

            config = reduce_config(args)
            reduce.check_config(config)
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
