"""The ``drmi`` command: ``drmi run`` (the experiment) and ``drmi reduce`` (pool URL -> selection)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 50,100,200, got {text!r}") from None


def str_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def run_parser(sub) -> None:
    p = sub.add_parser("run", help="the DRMI experiment: select, query, fit substitutes, attack, report")
    p.add_argument("--out", help="run folder (path or fsspec URL); default: a new folder under runs/")
    p.add_argument("--quick", action="store_true", help="small version: 600-image pool, budgets 50,200 (a few minutes)")
    p.add_argument("--config", help="repeat a run from its config.json (flags given here override it)")
    p.add_argument("--protocol", choices=("bundled-mnist", "paper-mnist", "paper-cifar10"),
                   help="the paper's settings (default bundled-mnist); paper-* read torchvision data under --data-root")
    p.add_argument("--data-root", default="data", help="folder of torchvision MNIST / CIFAR-10 (default ./data)")
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
    p.add_argument("--output", choices=("label", "probs", "top1", "rounded"), help="what the target answers (default label)")
    p.add_argument("--no-prada", action="store_true", help="switch the target's PRADA detector off")
    p.add_argument("--substitute-workers", type=int, help="Ray Train workers per substitute fit (default 1; 0 = local mode)")
    p.add_argument("--address", help="Ray cluster address (default: the cluster of `ray job submit`, else a local one)")


def build_config(args):
    from drmi_ray.config import ExperimentConfig, quick

    from drmi_ray.baselines import METHODS
    from drmi_ray.config import apply_protocol

    config = ExperimentConfig.load(args.config) if args.config else ExperimentConfig()
    if args.protocol:
        config = apply_protocol(config, args.protocol, args.data_root)
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
                                ("output", args.output)) if v is not None}
    if args.no_prada:
        target["prada_delta"] = None
    config = r(config, pool=r(config.pool, **pool), selection=r(config.selection, **sel), mi=r(config.mi, **mi),
               target=r(config.target, **target))
    if args.substitute_model:
        config.substitute = r(config.substitute, model=args.substitute_model)
    if args.substitute_workers is not None:
        config.substitute_workers = args.substitute_workers
    return config


def reduce_parser(sub) -> None:
    p = sub.add_parser("reduce", help="pool URL -> the K least redundant images (selection.json)")
    p.add_argument("pool", help="bundled-mnist, mnist:ROOT, cifar10:ROOT, an ImageFolder tree or Parquet shards URL")
    p.add_argument("--budget", "-k", type=int, required=True, help="how many images to select (K)")
    p.add_argument("--out", help="output folder (path or fsspec URL); default: a new folder under runs/")
    p.add_argument("--size", type=int, help="resize image files to SIZE x SIZE before MI")
    p.add_argument("--rgb", action="store_true", help="decode image files as RGB (default: greyscale)")
    p.add_argument("--bins", type=int, default=256)
    p.add_argument("--color", choices=("flatten", "luminance"), default="flatten")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable image files (listed in selection.json)")
    p.add_argument("--address", help="Ray cluster address")


def reduce(args) -> str:
    import ray

    from drmi_ray import report
    from drmi_ray.data import load_pool
    from drmi_ray.matrix import compute_mi_matrix
    from drmi_ray.optimize import select

    out = (args.out or report.new_run_folder("reduce")).rstrip("/")
    pool = load_pool(args.pool, size=args.size, mode="RGB" if args.rgb else "L",
                     on_error="skip" if args.skip_bad else "raise")
    if not 2 <= args.budget <= len(pool):
        raise ValueError(f"budget {args.budget} must be between 2 and the pool size ({len(pool)} images); change --budget")
    if args.address:
        ray.init(address=args.address)
    elif not ray.is_initialized():
        ray.init()
    store = compute_mi_matrix(pool.images, f"{out}/mi", bins=args.bins, color=args.color)
    selection = select(store.to_dense(), args.budget, seed=args.seed)
    result = {
        "pool": args.pool, "budget": args.budget, "objective": selection.objective,
        "indices": selection.indices.tolist(),
        "selected": [pool.paths[i] for i in selection.indices] if pool.paths else [],
        "skipped": pool.skipped,
    }
    report.write_text(f"{out}/selection.json", json.dumps(result, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="drmi", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser(sub)
    reduce_parser(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            import ray

            from drmi_ray import report
            from drmi_ray.experiment import run_experiment

            config = build_config(args)
            out = (args.out or report.new_run_folder("mnist")).rstrip("/")
            if args.address:
                ray.init(address=args.address)
            run_experiment(config, out)
            print(f"[drmi] wrote {out}/report.md (results.json, results.csv, results.png)")
        else:
            out = reduce(args)
            print(f"[drmi] wrote {out}/selection.json")
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"drmi {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
