"""Running a model over a dataset of prompts on Ray Data: the teacher in generation, the judge in
curation, the models under evaluation. How the ray.data.llm processor is built, how its outputs are
read, and how results stream into a run directory's part files.

Input rows carry `prompt` (chat-templated text, for vLLM), `prompt_messages` (JSON, for an HTTP
server, which applies its own template) and `seed`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

from jobs.common.engine import (ENGINE_START_FAILED, ModelConfig, SamplingConfig, cpu_binding_env, engine_dtype,
                               engine_start_error, sampling_params)
from jobs.common.offline import FinalOnly, offline_engine_kwargs


def row_sampling(sampling: SamplingConfig, row: dict[str, Any], seeded: bool) -> dict[str, Any]:
    """A row's sampling parameters: the config's, the row's own `temperature` where it carries one
    (an evaluation's greedy and sampled answers share a run), its seed when seeds go to the engine."""
    params = sampling_params(sampling, row["seed"] if seeded else None)
    if row.get("temperature") is not None:
        params["temperature"] = float(row["temperature"])
    return params


class VLLMRequest:
    """preprocess for the vLLM processor: the engine's prompt and sampling parameters, and the
    LoRA adapter a row names (`model`), which ray.data.llm loads beside the base model."""

    def __init__(self, sampling: SamplingConfig, seeded: bool):
        self.sampling, self.seeded = sampling, seeded

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        request = {"prompt": row["prompt"],
                   "sampling_params": {**row_sampling(self.sampling, row, self.seeded), "output_kind": FinalOnly()}}
        if row.get("model"):
            request["model"] = row["model"]
        return request


class HTTPRequest:
    """preprocess for the HTTP processor: an OpenAI chat-completions payload."""

    def __init__(self, sampling: SamplingConfig, model: str, seeded: bool):
        self.sampling, self.model, self.seeded = sampling, model, seeded

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        payload = {"model": self.model, "messages": json.loads(row["prompt_messages"]),
                   **row_sampling(self.sampling, row, self.seeded)}
        return {"payload": payload}


def stage_concurrency(llm: ModelConfig) -> tuple[int, int]:
    """Workers (min, max) of the light stages around the model (building requests, finishing
    results): one per model replica or HTTP worker, as each costs a small fraction of a request."""
    return tuple(llm.concurrency) if llm.backend == "vllm" else (1, llm.http_concurrency)


class Reach(NamedTuple):
    replicas: int      # how many of concurrency's replicas the batches keep busy
    batches: int       # the tasks: batches of batch_size rows
    threshold: float   # waiting batches per replica (x max_concurrent_batches) that add one


def reachable_replicas(rows: int, llm: ModelConfig, threshold: float | None = None, factor: float | None = None) -> Reach:
    """How many of `concurrency`'s replicas Ray Data's actor autoscaler can reach for `rows`
    requests. A task is a batch of `batch_size` rows; the autoscaler adds a replica while the tasks
    in flight per replica reach `threshold` (Ray Data's actor_pool_util_upscaling_threshold, 1.75)
    x max_concurrent_batches, and a replica takes at most `factor` (2) x max_concurrent_batches
    tasks. With fewer waiting batches than that, the extra replicas never start."""
    lo, hi = llm.concurrency
    if threshold is None or factor is None:
        from ray.data import DataContext
        from ray.data.context import DEFAULT_ACTOR_MAX_TASKS_IN_FLIGHT_TO_MAX_CONCURRENCY_FACTOR

        ctx = DataContext.get_current()
        threshold = ctx.autoscaling_config.actor_pool_util_upscaling_threshold if threshold is None else threshold
        factor = DEFAULT_ACTOR_MAX_TASKS_IN_FLIGHT_TO_MAX_CONCURRENCY_FACTOR if factor is None else factor
    tasks = -(-rows // llm.batch_size)
    if factor < threshold:
        return Reach(lo, tasks, threshold)
    size = lo
    while size < hi and tasks >= threshold * llm.max_concurrent_batches * size:
        size += 1
    return Reach(size, tasks, threshold)


def request_stage(llm: ModelConfig) -> dict[str, Any]:
    """Ray Data map arguments of the processor's request-building stage: as many tasks at once as
    `stage_concurrency` allows."""
    from ray.data import TaskPoolStrategy

    return {"compute": TaskPoolStrategy(size=stage_concurrency(llm)[1])}


def replica_placement(llm: ModelConfig) -> dict[str, Any] | None:
    """The placement group of one vLLM replica: a bundle per tensor-parallel rank, with the
    replica's CPUs (on CPU) and custom resources; None on GPU without custom resources (Ray Data's
    default GPU bundles)."""
    if not llm.use_gpu:
        return {"bundles": [{"CPU": llm.cpus_per_replica, **llm.replica_resources}] * llm.tensor_parallel_size}
    if llm.replica_resources:
        return {"bundles": [{"GPU": 1, "CPU": 1, **llm.replica_resources}] * llm.tensor_parallel_size}
    return None


def build_llm(llm: ModelConfig, sampling: SamplingConfig, model_path: str | None):
    """The ray.data.llm processor for a configured model."""
    from ray.data.llm import HttpRequestProcessorConfig, build_processor, vLLMEngineProcessorConfig

    if llm.backend == "openai":
        key = os.environ.get(llm.api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        proc_cfg = HttpRequestProcessorConfig(
            url=llm.base_url.rstrip("/") + "/chat/completions", headers=headers, qps=llm.qps,
            max_retries=llm.max_retries, concurrency=llm.http_concurrency, batch_size=llm.batch_size)
        return build_processor(proc_cfg, preprocess=HTTPRequest(sampling, llm.served_model or llm.model, llm.seeds_to_engine()),
                               preprocess_map_kwargs=request_stage(llm))
    proc_cfg = vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs=offline_engine_kwargs(llm),
        concurrency=tuple(llm.concurrency),
        batch_size=llm.batch_size,
        max_concurrent_batches=llm.max_concurrent_batches,
        accelerator_type=llm.accelerator_type,
        placement_group_config=replica_placement(llm),
        should_continue_on_error=True,
        runtime_env={"env_vars": cpu_binding_env(llm)} if cpu_binding_env(llm) else None,
        log_engine_metrics=llm.engine_metrics,
        # Prompts arrive already templated (we store them), and vLLM returns text: the
        # chat-template, tokenize and detokenize stages would only add CPU actors.
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
    )
    return build_processor(proc_cfg, preprocess=VLLMRequest(sampling, llm.seeds_to_engine()),
                           preprocess_map_kwargs=request_stage(llm))


@dataclass(frozen=True)
class EngineOutput:
    """One request's result, from either processor."""
    text: str | None          # None: the request failed
    prompt_tokens: int
    output_tokens: int
    seconds: float            # the engine's time for the request (0 for HTTP models)
    finish_reason: str        # stop | length | error
    error: str
    mean_logprob: float | None = None  # mean log-probability of the output tokens, where asked for


def _failed(error: str) -> EngineOutput:
    return EngineOutput(None, 0, 0, 0.0, "error", error)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def engine_output(row: dict[str, Any], max_tokens: int) -> EngineOutput:
    err = row.get("__inference_error__") or ""
    if "http_response" in row and row["http_response"] is not None:
        resp = row["http_response"]
        # Arrow unifies response structs across a batch, so an absent field comes back as None
        if resp.get("error") or not resp.get("choices"):
            return _failed(f"model server: {json.dumps(resp.get('error') or resp, default=str)[:500]}")
        choice, usage = resp["choices"][0], resp.get("usage") or {}
        content = (choice.get("logprobs") or {}).get("content") or []
        return EngineOutput(choice["message"].get("content") or "", int(usage.get("prompt_tokens") or 0),
                            int(usage.get("completion_tokens") or 0), 0.0, choice.get("finish_reason") or "", "",
                            _mean([float(t["logprob"]) for t in content if t and t.get("logprob") is not None]))
    if err:
        return _failed(str(err)[:2000])
    out_tokens = int(row.get("num_generated_tokens") or 0)
    seconds = float(row.get("time_taken_llm") or 0.0)
    return EngineOutput(row.get("generated_text") or "", int(row.get("num_input_tokens") or 0), out_tokens,
                        max(seconds, 0.0), "length" if out_tokens >= max_tokens else "stop", "",
                        _token_logprobs(row.get("logprobs"), row.get("generated_tokens")))


def _token_logprobs(logprobs, tokens) -> float | None:
    """The mean log-probability of the generated tokens, from vLLM's per-position dicts (token id
    -> {logprob, ...}; Arrow may hand them back as lists of (key, value) pairs)."""
    if logprobs is None or tokens is None:
        return None
    values = []
    for position, token in zip(logprobs, tokens):
        entries = dict(position) if not isinstance(position, dict) else position
        hit = entries.get(int(token), entries.get(str(int(token))))
        if hit is not None:
            values.append(float(hit["logprob"] if isinstance(hit, dict) else hit))
    return _mean(values)


class FinishBatch:
    """map_batches actor: a function from engine-output rows to result rows, Arrow in and out.

    An actor, started with the pipeline and kept for its whole run, rather than a task: on a
    small machine the engine returns its batches together at the end, and tasks would then
    wait on new worker processes and on every worker's first import of the verifiers. `warm`
    does that importing while the engine starts."""

    def __init__(self, finish: Callable[[list[dict[str, Any]]], list[dict[str, Any]]], schema,
                 warm: Callable[[], None] | None = None):
        self.finish, self.schema = finish, schema
        if warm is not None:
            warm()

    def __call__(self, batch):
        import pyarrow as pa

        return pa.Table.from_pylist(self.finish(batch.to_pylist()), schema=self.schema)


def run_llm(rows: list[dict[str, Any]], *, llm: ModelConfig, sampling: SamplingConfig, model_path: str | None,
            finish: Callable[[list[dict[str, Any]]], list[dict[str, Any]]], schema, folder: Path, ray_cfg,
            label: str, write_rows: int, counts: Callable[[Any], dict[str, int]], log,
            warm: Callable[[], None] | None = None, memory_key: str = "gpu_memory_utilization") -> dict[str, Any]:
    """Stream `rows` through the model on Ray Data; each result batch is finished (`finish`) on the
    workers and written by the driver as one atomic part file into `folder`, so an interrupted run
    keeps every batch it completed. `counts(batch)` feeds the progress line; `warm` loads what
    `finish` needs, once per finishing actor, while the model starts. `memory_key` names the model's
    memory share in the user's config, for the error when its engine does not start."""
    import ray

    from jobs.common.progress import Progress
    from jobs.common.raycluster import init_ray
    from jobs.common.runs import PartWriter

    init_ray(ray_cfg, log=log)
    if llm.backend == "vllm":
        log(f"{label}: engine dtype {engine_dtype(llm)}{' (dtype auto, for this machine)' if llm.dtype == 'auto' else ''}")
        lo, hi = llm.concurrency
        if hi > lo:
            reach = reachable_replicas(len(rows), llm)
            log(f"{label}: {lo} to {hi} replicas, as the queue of work asks; {reach.batches} batches of "
                f"{llm.batch_size} rows keep up to {reach.replicas} busy"
                + ("" if reach.replicas == hi else f" (Ray Data adds a replica while about {reach.threshold:g} x "
                   "max_concurrent_batches batches wait on each: for more, lower batch_size or max_concurrent_batches)"))
    blocks = max(1, min(len(rows) // llm.batch_size, 200))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = build_llm(llm, sampling, model_path)(ds)
    lo, hi = stage_concurrency(llm)
    # results are finished and written as the engine returns each batch: progress moves, and an
    # interrupted run keeps every batch it completed
    ds = ds.map_batches(FinishBatch, fn_constructor_args=(finish, schema, warm),
                        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
                        batch_format="pyarrow", batch_size=min(write_rows, llm.batch_size))

    writer = PartWriter(folder, schema)
    with Progress(len(rows), label, log=log) as progress:
        try:
            for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for start in range(0, block.num_rows, write_rows):
                    batch = block.slice(start, write_rows)
                    writer.write(batch)
                    progress.update(batch.num_rows, **counts(batch))
        except KeyboardInterrupt:
            log(f"\ninterrupted: {progress.rows} rows of this run are saved in {folder}; "
                "run the same command again to do the rest")
            raise
        except Exception as e:
            # an engine on a CPU that did not start: most often its memory share (vLLM's reason is logged)
            if llm.backend == "vllm" and not llm.use_gpu and ENGINE_START_FAILED in str(e):
                raise engine_start_error(label, memory_key, llm.model, model_path, engine_dtype(llm),
                                         llm.gpu_memory_utilization) from None
            raise
    return {"rows": progress.rows, "output_tokens": progress.tokens, "seconds": round(progress.elapsed(), 2)}
