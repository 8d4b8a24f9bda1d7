"""Running a model over a dataset of prompts on Ray Data: the teacher in generation, the judge in
curation. One definition of how a model is configured (`LLMConfig`, `SamplingConfig`), how the
ray.data.llm processor is built, how its outputs are read, and how results stream into a run
directory's part files.

Input rows carry `prompt` (chat-templated text, for vLLM), `prompt_messages` (JSON, for an HTTP
server, which applies its own template) and `seed`.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from jobs.common.config import doc


@dataclass(frozen=True)
class LLMConfig:
    model: str = doc("packaged model name (`cotd models list`), local Hugging Face folder, or hub id")
    backend: Literal["vllm", "openai"] = doc("vllm: replicas inside Ray; openai: an OpenAI-compatible HTTP server", "vllm")
    # vLLM replicas
    concurrency: tuple[int, int] = doc(
        "replicas (min, max); Ray Data autoscales between them, with as many actors finishing (parsing, grading) results", (1, 1))
    tensor_parallel_size: int = doc("GPUs (or CPU bundles) per replica, for models too big for one device", 1)
    use_gpu: bool = doc("run replicas on GPUs (false: vLLM on CPU)", False)
    accelerator_type: str | None = doc("Ray accelerator type to schedule on, e.g. H100 (GPU only)", None)
    cpus_per_replica: int = doc("CPUs reserved per CPU replica", 1)
    dtype: str = doc(
        "weights and activations dtype; auto: bfloat16 on GPUs and on CPUs with native bf16 arithmetic "
        "(AVX512-BF16 or AMX), float32 on other CPUs, where vLLM's bf16 runs about 10x slower", "auto")
    max_model_len: int = doc("context length of the engine (prompt + output)", 2048)
    gpu_memory_utilization: float = doc("GPU: fraction of GPU memory; CPU: fraction of RAM for the KV cache", 0.4)
    batch_size: int = doc("rows per batch sent to a replica", 64)
    max_concurrent_batches: int = doc("batches in flight per replica (batch_size x this = requests the engine sees)", 4)
    seeded: Literal["auto", "always", "never"] = doc(
        "pass each row's seed to the engine; auto: on GPU only (seeded sampling crashes vLLM's CPU engine "
        "when prompts are chunked). Unseeded rows still differ: each is sampled independently", "auto")
    engine_metrics: bool = doc(
        "export vLLM engine metrics (TTFT, TPOT, KV-cache use) to Ray's Prometheus endpoint; costs the "
        "engine CPU at every step, as an offline vLLM run does without them", False)
    engine_kwargs: dict[str, Any] = doc("extra vLLM engine arguments (they win over the ones above)", {})
    # OpenAI-compatible HTTP server
    base_url: str | None = doc("openai backend: server base URL, e.g. http://host:8000/v1", None)
    served_model: str | None = doc("openai backend: model name in requests (default: `model`)", None)
    api_key_env: str = doc("openai backend: environment variable holding the API key (unset: no key)", "OPENAI_API_KEY")
    qps: int | None = doc("openai backend: request rate limit per worker (null: none)", None)
    max_retries: int = doc("openai backend: retries per request on connection errors and 429/5xx", 3)
    http_concurrency: int = doc("openai backend: concurrent request workers", 1)

    def check(self) -> None:
        lo, hi = self.concurrency
        if not 1 <= lo <= hi:
            raise ValueError(f"concurrency must be (min, max) with 1 <= min <= max, got {list(self.concurrency)}")
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs base_url (for example http://localhost:8000/v1)")
        if self.accelerator_type and not self.use_gpu:
            raise ValueError("accelerator_type is set but use_gpu is false")
        for name in ("tensor_parallel_size", "cpus_per_replica", "max_model_len", "batch_size", "max_concurrent_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")

    def seeds_to_engine(self) -> bool:
        return self.seeded == "always" or (self.seeded == "auto" and (self.use_gpu or self.backend == "openai"))


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = doc("sampling temperature (> 0 so that paths differ)", 0.8)
    top_p: float = doc("nucleus sampling mass", 0.95)
    max_tokens: int = doc("longest output, in tokens", 512)
    extra: dict[str, Any] = doc("further vLLM SamplingParams / OpenAI request fields, e.g. {ignore_eos: true}", {})

    def check(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


def model_path(llm: LLMConfig, log) -> str | None:
    """The model's local folder (vLLM backend), fetched and converted if need be; an HTTP server
    needs none."""
    if llm.backend == "openai":
        return None
    from jobs.common.models import resolve

    return resolve(llm.model, log=log)


def load_tokenizer(path: str | None) -> Any:
    """The tokenizer of a local model folder (None: none). Most of its cost is importing
    transformers, a few seconds, so callers run it while Ray starts (`init_ray_while`)."""
    if path is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def sampling_params(s: SamplingConfig, seed: int | None) -> dict[str, Any]:
    params: dict[str, Any] = {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens, **s.extra}
    if seed is not None:
        params["seed"] = seed
    return params


def _final_only():
    from vllm.sampling_params import RequestOutputKind

    return RequestOutputKind.FINAL_ONLY


class FinalOnly:
    """vLLM's `RequestOutputKind.FINAL_ONLY`, made where it is unpickled: in the engine's process,
    which has vLLM, and not in the preprocess worker, which then need not import it.

    ray.data.llm awaits only a request's final output, but leaves `output_kind` at vLLM's default
    (cumulative): the engine's front end then builds and delivers a full output of every request
    at every step. Asking for the final output only, as an offline `vllm.LLM` does, saves that."""

    def __reduce__(self):
        return _final_only, ()


class VLLMRequest:
    """preprocess for the vLLM processor: the engine's prompt and sampling parameters."""

    def __init__(self, sampling: SamplingConfig, seeded: bool):
        self.sampling, self.seeded = sampling, seeded

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        params = sampling_params(self.sampling, row["seed"] if self.seeded else None)
        return {"prompt": row["prompt"], "sampling_params": {**params, "output_kind": FinalOnly()}}


class HTTPRequest:
    """preprocess for the HTTP processor: an OpenAI chat-completions payload."""

    def __init__(self, sampling: SamplingConfig, model: str, seeded: bool):
        self.sampling, self.model, self.seeded = sampling, model, seeded

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        payload = {"model": self.model, "messages": json.loads(row["prompt_messages"]),
                   **sampling_params(self.sampling, row["seed"] if self.seeded else None)}
        return {"payload": payload}


@functools.cache
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this machine's CPU computes in bf16 natively (read once per process). Without it vLLM's CPU kernels convert
    every bf16 operand: on a 2-core AVX2 machine SmolLM2-135M generated 4.9 tok/s in bf16 and
    53 tok/s in float32 (docs/benchmarks.md). Other architectures than x86 are taken at their word."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return True  # no /proc (not Linux): vLLM's own default, bf16
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_by_default(use_gpu: bool) -> bool:
    """What `auto` means for the teacher's dtype and the student's training precision: bf16 on
    GPUs, and on CPUs with native bf16 arithmetic, read on the machine that calls it (the job's
    driver for the teacher, each training worker for the student)."""
    return use_gpu or cpu_has_native_bf16()


def engine_dtype(llm: LLMConfig) -> str:
    """The dtype the engine runs in: `llm.dtype`, with auto resolved for this machine's replicas.
    On a CPU cluster of another CPU type than the machine that builds the job, set it explicitly."""
    if llm.dtype != "auto":
        return llm.dtype
    return "bfloat16" if bf16_by_default(llm.use_gpu) else "float32"


def engine_kwargs(llm: LLMConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {"dtype": engine_dtype(llm), "max_model_len": llm.max_model_len,
                          "gpu_memory_utilization": llm.gpu_memory_utilization,
                          "tensor_parallel_size": llm.tensor_parallel_size}
    if not llm.use_gpu:
        kw["enforce_eager"] = True  # no CUDA graphs on CPU
    # ray.data.llm builds its engine without vLLM's offline usage context, so vLLM would size its
    # batches for an interactive server (128 sequences, 2048 tokens per step); throughput mode
    # doubles those, which on CPU is exactly what an offline `vllm.LLM` uses.
    kw["performance_mode"] = "throughput"
    # and with per-step engine statistics on, which an offline `vllm.LLM` turns off: building
    # them costs the engine core and the front end CPU at every step (see `engine_metrics`)
    kw["disable_log_stats"] = not llm.engine_metrics
    kw.update(llm.engine_kwargs)
    return kw


def stage_concurrency(llm: LLMConfig) -> tuple[int, int]:
    """Workers (min, max) of the light stages around the model (building requests, finishing
    results): one per model replica or HTTP worker, as each costs a small fraction of a request."""
    return tuple(llm.concurrency) if llm.backend == "vllm" else (1, llm.http_concurrency)


def request_stage(llm: LLMConfig) -> dict[str, Any]:
    """Ray Data map arguments of the processor's request-building stage: as many tasks at once as
    `stage_concurrency` allows."""
    from ray.data import TaskPoolStrategy

    return {"compute": TaskPoolStrategy(size=stage_concurrency(llm)[1])}


def build_llm(llm: LLMConfig, sampling: SamplingConfig, model_path: str | None):
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
    placement = None
    if not llm.use_gpu:
        placement = {"bundles": [{"CPU": llm.cpus_per_replica}] * llm.tensor_parallel_size}
    proc_cfg = vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs=engine_kwargs(llm),
        concurrency=tuple(llm.concurrency),
        batch_size=llm.batch_size,
        max_concurrent_batches=llm.max_concurrent_batches,
        accelerator_type=llm.accelerator_type,
        placement_group_config=placement,
        should_continue_on_error=True,
        log_engine_metrics=llm.engine_metrics,
        # Prompts arrive already templated (we store them), and vLLM returns text: the
        # chat-template, tokenize and detokenize stages would only add CPU actors.
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
    )
    return build_processor(proc_cfg, preprocess=VLLMRequest(sampling, llm.seeds_to_engine()),
                           preprocess_map_kwargs=request_stage(llm))


def engine_output(row: dict[str, Any], max_tokens: int) -> tuple[str | None, int, int, float, str, str]:
    """(text, prompt_tokens, output_tokens, seconds, finish_reason, error) from either processor."""
    err = row.get("__inference_error__") or ""
    if "http_response" in row and row["http_response"] is not None:
        resp = row["http_response"]
        # Arrow unifies response structs across a batch, so an absent field comes back as None
        if resp.get("error") or not resp.get("choices"):
            return None, 0, 0, 0.0, "error", f"model server: {json.dumps(resp.get('error') or resp, default=str)[:500]}"
        choice, usage = resp["choices"][0], resp.get("usage") or {}
        return (choice["message"].get("content") or "", int(usage.get("prompt_tokens") or 0),
                int(usage.get("completion_tokens") or 0), 0.0, choice.get("finish_reason") or "", "")
    if err:
        return None, 0, 0, 0.0, "error", str(err)[:2000]
    out_tokens = int(row.get("num_generated_tokens") or 0)
    seconds = float(row.get("time_taken_llm") or 0.0)
    return (row.get("generated_text") or "", int(row.get("num_input_tokens") or 0), out_tokens,
            max(seconds, 0.0), "length" if out_tokens >= max_tokens else "stop", "")


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


def run_llm(rows: list[dict[str, Any]], *, llm: LLMConfig, sampling: SamplingConfig, model_path: str | None,
            finish: Callable[[list[dict[str, Any]]], list[dict[str, Any]]], schema, folder: Path, ray_cfg,
            label: str, write_rows: int, counts: Callable[[Any], dict[str, int]], log,
            warm: Callable[[], None] | None = None) -> dict[str, Any]:
    """Stream `rows` through the model on Ray Data; each result batch is finished (`finish`) on the
    workers and written by the driver as one atomic part file into `folder`, so an interrupted run
    keeps every batch it completed. `counts(batch)` feeds the progress line; `warm` loads what
    `finish` needs, once per finishing actor, while the model starts."""
    import ray

    from jobs.common.progress import Progress
    from jobs.common.raycluster import init_ray
    from jobs.common.runs import PartWriter

    init_ray(ray_cfg, log=log)
    if llm.backend == "vllm":
        log(f"{label}: engine dtype {engine_dtype(llm)}{' (dtype auto, for this machine)' if llm.dtype == 'auto' else ''}")
    blocks = max(1, min(len(rows) // llm.batch_size, 200))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = build_llm(llm, sampling, model_path)(ds)
    lo, hi = stage_concurrency(llm)
    ds = ds.map_batches(FinishBatch, fn_constructor_args=(finish, schema, warm),
                        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
                        batch_format="pyarrow", batch_size=write_rows)

    writer = PartWriter(folder, schema)
    progress = Progress(len(rows), label, log=log)
    try:
        for batch in ds.iter_batches(batch_size=write_rows, batch_format="pyarrow"):
            writer.write(batch)
            progress.update(batch.num_rows, **counts(batch))
    except KeyboardInterrupt:
        log(f"\ninterrupted: {progress.rows} rows of this run are saved in {folder}; "
            "run the same command again to do the rest")
        raise
    return {"rows": progress.rows, "output_tokens": progress.tokens, "seconds": round(progress.elapsed(), 2)}
