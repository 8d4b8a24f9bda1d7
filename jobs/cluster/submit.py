"""Running cotd's stages as Ray jobs on a cluster, through Ray's Jobs API (`JobSubmissionClient`).

    cotd submit generate --config configs/generate/gsm8k-qwen7b.yaml --address http://head:8265 --follow
    cotd submit run --config configs/pipelines/quickstart.yaml --address http://head:8265
    cotd jobs list | cotd jobs logs ID | cotd jobs stop ID        (--address, or RAY_ADDRESS)

The job's working directory is this repository (Ray uploads it, leaving out .venv, runs and the
caches), so the config file and every path in it are relative to the repository. The entrypoint
is the stage's `python -m jobs.<stage>` module with the same arguments `cotd` takes. `--image`
runs the job in a container image instead (cotd's infra/docker/Dockerfile), `--pip` installs the
pinned requirements on the cluster's nodes. With `--follow` the job's logs stream here and the
job's final status is the exit code (0 only for SUCCEEDED).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from jobs.common.errors import CotdError
from jobs.common.raycluster import REPO_ROOT

MODULES = {"generate": "jobs.generate", "curate": "jobs.curate", "train": "jobs.train", "eval": "jobs.evaluate",
           "run": "jobs.pipeline", "experiment": "jobs.experiment"}
EXCLUDES = [".venv", "runs", ".git", "**/__pycache__", ".pytest_cache", ".whl", ".benchdata"]


def entrypoint(stage: str, config: str, overrides: list[str]) -> str:
    """The job's command line: the stage's module, its config (relative to the repository) and overrides."""
    if stage not in MODULES:
        raise CotdError(f"submit: unknown stage {stage!r} (one of {', '.join(MODULES)})")
    path = Path(config)
    resolved = (path if path.is_absolute() else Path.cwd() / path).resolve()
    if not resolved.is_file():
        raise CotdError(f"--config: {config} does not exist")
    try:
        relative = resolved.relative_to(REPO_ROOT)
    except ValueError:
        raise CotdError(f"--config: {config} is outside the repository ({REPO_ROOT}), which is the job's working "
                        "directory; put it under configs/") from None
    for item in overrides:
        if "=" not in item:
            raise CotdError(f"override {item!r}: expected key=value")
    return " ".join(["python", "-m", MODULES[stage], "--config", shlex.quote(str(relative)), *map(shlex.quote, overrides)])


def runtime_env(image: str | None, pip: bool) -> dict[str, Any]:
    """The job's runtime environment: the repository as its working directory; a container image
    or the project's pinned requirements when asked."""
    env: dict[str, Any] = {"working_dir": str(REPO_ROOT), "excludes": EXCLUDES,
                           "env_vars": {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}}
    if image:
        env["image_uri"] = image
    if pip:
        env["pip"] = requirements()
    return env


def model_shape(model: str) -> dict[str, Any] | None:
    """The model's config.json (parameters, hidden size, layers) without downloading weights: a
    local folder's, a pulled packaged model's, or the hub's config file alone; None where none can
    be read (offline), and the plan then counts GPUs without checking their memory."""
    import json

    from jobs.common.models import PACKAGED, hub_file, is_pulled, packaged_dir

    path = Path(model).expanduser()
    if model in PACKAGED and is_pulled(model):
        path = packaged_dir(model)
    config = path / "config.json"
    if not config.is_file() and model.count("/") == 1 and not path.exists():
        config = hub_file(model, "config.json")
    try:
        return json.loads(config.read_text()) if config is not None and config.is_file() else None
    except ValueError:
        return None


def workloads(stage: str, config: str, overrides: list[str]) -> list:
    """What the job runs on GPUs, stage by stage (the teacher's replicas in generation, the workers
    in training), from its config as the job will load it."""
    from jobs.cluster.plan import Workload, param_count
    from jobs.common.config import load_config

    def shape(model):
        cfg = model_shape(model)
        if cfg is None:
            return {"params": None}
        try:
            return {"params": param_count(cfg), "hidden": cfg["hidden_size"], "layers": cfg["num_hidden_layers"]}
        except KeyError:
            return {"params": None}

    def teacher(cfg):
        t = cfg.teacher
        if t.backend != "vllm" or not t.use_gpu:
            return []
        s = shape(t.model)
        return [Workload("generate", "teacher", t.concurrency[0], s["params"], t.tensor_parallel_size, t.accelerator_type)]

    def training(cfg):
        if not cfg.scaling.use_gpu:
            return []
        s = shape(cfg.model)
        return [Workload("train", "training", cfg.scaling.num_workers, s["params"], 1, cfg.scaling.accelerator_type,
                         cfg.method, cfg.zero.stage, cfg.zero.offload_optimizer, cfg.zero.offload_params,
                         cfg.micro_batch_size * cfg.max_seq_len, s.get("hidden", 4096), s.get("layers", 32),
                         cfg.gradient_checkpointing)]

    if stage == "generate":
        from jobs.generate.config import GenerateConfig

        return teacher(load_config(GenerateConfig, config, overrides))
    if stage == "train":
        from jobs.train.config import TrainConfig

        return training(load_config(TrainConfig, config, overrides))
    if stage == "run":
        from jobs.pipeline.config import PipelineConfig
        from jobs.pipeline.main import pipeline_stages

        stages = pipeline_stages(load_config(PipelineConfig, config, overrides))
        return teacher(stages.generate) + training(stages.train)
    return []


def preflight(stage: str, config: str, overrides: list[str], cluster_file: str) -> list[str]:
    """The job planned against a cluster definition at its largest (`--cluster`): a CotdError
    naming what does not fit, before anything is submitted; otherwise what each stage needs."""
    import yaml

    from jobs.cluster.plan import PlanError, check_workloads, node_types
    from jobs.common.config import ConfigError

    path = Path(cluster_file)
    if not path.is_file():
        raise CotdError(f"--cluster: {cluster_file} does not exist")
    try:
        definition = yaml.safe_load(path.read_text())
        types = node_types(definition if isinstance(definition, dict) else {})
        return check_workloads(workloads(stage, config, overrides), types)
    except (PlanError, yaml.YAMLError) as e:
        raise CotdError(f"--cluster {cluster_file}: {e}") from None
    except ConfigError as e:
        raise CotdError(str(e)) from None


def requirements() -> list[str]:
    """The project's dependencies as pyproject.toml pins them (the GPU extra: clusters run vLLM's GPU build)."""
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"]) + list(project["optional-dependencies"]["gpu"])


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise CotdError("--address: give the cluster's dashboard address (http://head:8265) or set RAY_ADDRESS")
    try:
        return JobSubmissionClient(address)
    except (OSError, RuntimeError, ValueError) as e:
        raise CotdError(f"--address {address}: no Ray job server answers there ({e})") from None


def submit_job(c, wait_s: float = 60, **kw) -> str:
    """`submit_job`, retried while a freshly started head node has no job agent yet."""
    import time

    deadline = time.time() + wait_s
    while True:
        try:
            return c.submit_job(**kw)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise CotdError(f"submit: the cluster refused the job: {e}") from None
            time.sleep(2)


def follow(c, job_id: str, out=sys.stdout) -> int:
    """Stream the job's logs until it ends; its exit code: 0 for SUCCEEDED, 1 otherwise."""
    from ray.job_submission import JobStatus

    async def tail() -> None:
        async for lines in c.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())
    status = c.get_job_status(job_id)
    print(f"job {job_id}: {status.value}", file=out, flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


def main(argv: list[str]) -> int:
    """`cotd submit ...` and `cotd jobs ...`."""
    command, rest = argv[0], argv[1:]
    if command == "submit":
        ap = argparse.ArgumentParser(prog="cotd submit", description="run a stage or the pipeline as a Ray job")
        ap.add_argument("stage", choices=sorted(MODULES))
        ap.add_argument("--config", "-c", required=True)
        ap.add_argument("--address")
        ap.add_argument("--follow", action="store_true", help="stream the logs; the job's status is the exit code")
        ap.add_argument("--num-cpus", type=float, default=1, help="CPUs for the entrypoint (the driver)")
        ap.add_argument("--num-gpus", type=float, default=0, help="GPUs for the entrypoint")
        ap.add_argument("--image", help="run the job in this container image (infra/docker/Dockerfile)")
        ap.add_argument("--pip", action="store_true", help="install pyproject.toml's pinned requirements on the nodes")
        ap.add_argument("--id", help="the job's submission id (default: Ray's)")
        ap.add_argument("--cluster", help="a cluster definition (cluster/aws/cotd.yaml, cluster/k8s/raycluster.yaml): "
                                          "refuse the job before submission when it cannot fit even at the cluster's largest")
        ap.add_argument("overrides", nargs="*", metavar="key=value")
        args = ap.parse_intermixed_args(rest)
        ep = entrypoint(args.stage, args.config, args.overrides)
        if args.cluster:
            for line in preflight(args.stage, args.config, args.overrides, args.cluster):
                print(f"plan: {line}", flush=True)
        c = client(args.address)
        job_id = submit_job(c, entrypoint=ep, runtime_env=runtime_env(args.image, args.pip), submission_id=args.id,
                            entrypoint_num_cpus=args.num_cpus, entrypoint_num_gpus=args.num_gpus,
                            metadata={"cotd_stage": args.stage, "cotd_config": args.config})
        print(f"submitted {job_id}: {ep}", flush=True)
        return follow(c, job_id) if args.follow else 0
    ap = argparse.ArgumentParser(prog="cotd jobs", description="the cluster's Ray jobs")
    ap.add_argument("action", choices=["list", "logs", "stop", "status"])
    ap.add_argument("job_id", nargs="?")
    ap.add_argument("--address")
    ap.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    args = ap.parse_args(rest)
    c = client(args.address)
    if args.action == "list":
        for job in sorted(c.list_jobs(), key=lambda j: j.start_time or 0):
            stage = (job.metadata or {}).get("cotd_stage", "-")
            print(f"{job.submission_id or job.job_id:<28}{job.status.value:<11}{stage:<12}{job.entrypoint}")
        return 0
    if not args.job_id:
        raise CotdError(f"cotd jobs {args.action}: give the job id (cotd jobs list shows them)")
    if args.action == "logs":
        if args.follow:
            return follow(c, args.job_id)
        print(c.get_job_logs(args.job_id), end="")
        return 0
    if args.action == "status":
        print(c.get_job_status(args.job_id).value)
        return 0
    stopped = c.stop_job(args.job_id)
    print(f"{args.job_id}: {'stop requested' if stopped else 'not running'}")
    return 0
