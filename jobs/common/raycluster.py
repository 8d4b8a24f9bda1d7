"""Connecting to Ray: a local cluster sized for the pipeline, or an existing one."""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from jobs.common.config import doc
from jobs.common.progress import emit

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[2]
# Ray Data's pipelines hold one actor or task per stage at once; with fewer logical CPUs than
# stages a 2-core machine deadlocks, so a local cluster advertises at least this many.
MIN_LOCAL_CPUS = 8
# Ray Train's placement-group cleaner asks the state API every second whether the run's
# controller still lives, and warns each time the API does not answer. The state API is served by
# the dashboard, which a local cluster does without (it costs a small machine CPU), so every
# training run would print that warning once a second; on a local cluster it is silenced. Ray
# Data's vLLM stage logs each finished batch at INFO, one line per 16 rows, which cotd's progress
# lines already count; it keeps its warnings.
LOCAL_QUIET_LOGGERS = {"ray.train.v2._internal.execution.controller.placement_group_cleaner": "ERROR",
                       "ray.llm._internal.batch.stages.vllm_engine_stage": "WARNING"}
# Ray settings of a local cluster, as environment variables (a user's own values win); an existing
# cluster keeps its own. Both are measured in docs/benchmarks.md:
# - Ray starts workers at nice 15, below its own daemons and the driver; on a small machine that
#   starves the teacher engine. Here they run at normal priority, as a plain vLLM process would.
# - By default Ray starts one idle Python worker per logical CPU when the driver connects and keeps
#   that many idle: 8 processes importing Ray at once on a 2-core machine, then each idle worker
#   costs about 1% of a core for as long as the cluster lives, time taken from the teacher engine.
#   Here workers start on demand and at most LOCAL_IDLE_WORKERS stay idle.
LOCAL_IDLE_WORKERS = 2
LOCAL_RAY_ENV = {"RAY_worker_niceness": "0", "RAY_USAGE_STATS_ENABLED": "0",
                 "RAY_prestart_worker_first_driver": "0", "RAY_enable_worker_prestart": "0",
                 "RAY_num_workers_soft_limit": str(LOCAL_IDLE_WORKERS)}


@dataclass(frozen=True)
class RayConfig:
    address: str | None = doc("Ray cluster to join (ray://head:10001, auto); null: RAY_ADDRESS or a new local cluster", None)
    num_cpus: int | None = doc("logical CPUs of a new local cluster (default: max(8, cores))", None)
    progress_bars: bool | None = doc("Ray Data's own progress bars (default: only on a terminal)", None)

    def check(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"num_cpus must be >= 1, got {self.num_cpus}")


def quiet_local_workers() -> None:
    """Ray worker setup hook of a local cluster (see LOCAL_QUIET_LOGGERS)."""
    import logging

    for name, level in LOCAL_QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def init_ray_while(cfg: RayConfig, work: Callable[[], T], log=emit) -> T:
    """Start or join Ray (`init_ray`) while `work` runs in a thread; returns what `work` returned
    and raises what it raised. Starting Ray mostly waits on its daemons, so work that imports
    or reads files (loading a tokenizer) costs no time beside it."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cotd-while-ray-starts") as pool:
        pending = pool.submit(work)
        init_ray(cfg, log=log)  # on an error, leaving the block waits for `work`, then raises it
        return pending.result()


def init_ray(cfg: RayConfig, log=emit) -> str:
    """Start or join Ray once per process; returns a one-line description."""
    import ray

    if ray.is_initialized():
        return "Ray (already initialized)"
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    # vLLM logs every engine step at INFO; our progress lines say what matters
    env_vars = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    if address:
        # a driver started by the Jobs API (`cotd submit`) already runs in its job's runtime env,
        # which carries these variables; Ray refuses a second one that names the same keys
        from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

        runtime_env = {} if RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ else {"env_vars": env_vars}
        if address.startswith("ray://"):
            # Ray Client from outside the cluster: ship the repository as the working_dir. A job
            # submitted with `ray job submit --working-dir .` already has it.
            runtime_env["working_dir"] = str(REPO_ROOT)
            runtime_env["excludes"] = [".venv", "runs", ".git", "**/__pycache__", ".pytest_cache"]
        ray.init(address=address, runtime_env=runtime_env or None, log_to_driver=True)
        where = f"Ray cluster at {address}"
    else:
        for name, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(name, value)
        cpus = cfg.num_cpus or max(MIN_LOCAL_CPUS, os.cpu_count() or 1)
        # address "local": a new cluster of its own even where another Ray runs on this machine
        # (`ray start`, a test's cluster), which a bare ray.init() would try to join
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {**env_vars, "PYTHONPATH": str(REPO_ROOT)},
                              "worker_process_setup_hook": "jobs.common.raycluster.quiet_local_workers"})
        where = f"local Ray ({cpus} logical CPUs on {os.cpu_count()} cores)"
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress_bars if cfg.progress_bars is not None else sys.stderr.isatty()
    # cotd reports its own progress and summary; Ray Data's per-node metrics, object-location
    # lookups and automatic stats logging only cost CPU here
    ctx.enable_per_node_metrics = False
    ctx.enable_get_object_locations_for_metrics = False
    ctx.enable_auto_log_stats = False
    # rows may carry Python objects Arrow has no type for (a vLLM request's output kind, see
    # jobs.common.offline.FinalOnly); Ray Data pickles those columns, and says so unless told to
    ctx.enable_fallback_to_arrow_object_ext_type = True
    log(f"connected: {where}")
    return where
