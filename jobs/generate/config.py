"""Configuration of the generate stage (`cotd generate`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from jobs.common.config import doc, to_dict
from jobs.common.raycluster import RayConfig
from jobs.formats.cot import check_granularity
from jobs.tasks.sources import Source


@dataclass(frozen=True)
class TeacherConfig:
    model: str = doc("packaged model name (`cotd models list`), local Hugging Face folder, or hub id")
    backend: Literal["vllm", "openai"] = doc("vllm: replicas inside Ray; openai: an OpenAI-compatible HTTP server", "vllm")
    # vLLM replicas
    concurrency: tuple[int, int] = doc("teacher replicas (min, max); Ray Data autoscales between them", (1, 1))
    tensor_parallel_size: int = doc("GPUs (or CPU bundles) per replica, for teachers too big for one device", 1)
    use_gpu: bool = doc("run replicas on GPUs (false: vLLM on CPU)", False)
    accelerator_type: str | None = doc("Ray accelerator type to schedule on, e.g. H100 (GPU only)", None)
    cpus_per_replica: int = doc("CPUs reserved per CPU replica", 1)
    dtype: str = doc("weights and activations dtype", "bfloat16")
    max_model_len: int = doc("context length of the engine (prompt + chain)", 2048)
    gpu_memory_utilization: float = doc("GPU: fraction of GPU memory; CPU: fraction of RAM for the KV cache", 0.4)
    batch_size: int = doc("rows per batch sent to a replica", 64)
    max_concurrent_batches: int = doc("batches in flight per replica (batch_size x this = requests the engine sees)", 4)
    seeded: Literal["auto", "always", "never"] = doc(
        "pass each chain's seed to the engine; auto: on GPU only (seeded sampling crashes vLLM's CPU engine "
        "when prompts are chunked). Unseeded chains still differ: each is sampled independently", "auto")
    engine_kwargs: dict[str, Any] = doc("extra vLLM engine arguments (they win over the ones above)", {})
    # OpenAI-compatible HTTP teacher
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
    max_tokens: int = doc("longest chain, in tokens", 512)
    extra: dict[str, Any] = doc("further vLLM SamplingParams / OpenAI request fields, e.g. {ignore_eos: true}", {})

    def check(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass(frozen=True)
class PromptConfig:
    format: Literal["pre", "post", "adaptive"] = doc("pre: rationale then answer; post: answer then rationale; adaptive: post for easy problems", "pre")
    granularity: int | str = doc("coarse (at most 3 steps), fine (one operation per step) or a number of steps", "coarse")
    few_shot: int = doc("exemplars per prompt, drawn deterministically, never the problem itself", 2)
    exemplars: str | None = doc("JSONL pool of worked exemplars (null: the built-in pool)", None)
    system: str | None = doc("text placed before the format instruction in the system message", None)

    def check(self) -> None:
        check_granularity(self.granularity)
        if self.few_shot < 0:
            raise ValueError(f"few_shot must be >= 0, got {self.few_shot}")


@dataclass(frozen=True)
class GenerateConfig:
    out_dir: str = doc("run directory; chains go to <out_dir>/chains, the manifest next to them")
    teacher: TeacherConfig = doc("the teacher model and how it runs")
    sources: list[Source] = doc("where problems come from (reasoning_gym, jsonl, parquet, hf)")
    paths_per_problem: int = doc("reasoning chains sampled per problem", 4)
    seed: int = doc("seed for exemplar choice and per-chain seeds", 0)
    sampling: SamplingConfig = doc("sampling parameters", SamplingConfig())
    prompt: PromptConfig = doc("prompt format", PromptConfig())
    write_rows: int = doc("rows per Parquet part file (smaller: finer-grained resume)", 64)
    overwrite: bool = doc("delete chains already in out_dir instead of resuming", False)
    ray: RayConfig = doc("where to run", RayConfig())

    def check(self) -> None:
        if self.paths_per_problem < 1:
            raise ValueError(f"paths_per_problem must be >= 1, got {self.paths_per_problem}")
        if not self.sources:
            raise ValueError("sources must list at least one problem source")
        if self.write_rows < 1:
            raise ValueError(f"write_rows must be >= 1, got {self.write_rows}")
        if self.paths_per_problem > 1 and self.sampling.temperature == 0:
            raise ValueError("paths_per_problem > 1 with sampling.temperature 0 would give identical paths")

    def fingerprint(self) -> dict[str, Any]:
        """What makes chains comparable: a resumed run must match it."""
        return {"teacher": self.teacher.model, "served_model": self.teacher.served_model,
                "sampling": to_dict(self.sampling), "prompt": to_dict(self.prompt), "seed": self.seed}
