"""A model as cotd runs it: which model (a packaged name, a local folder, a hub id), on which
backend (vLLM replicas inside Ray, or an OpenAI-compatible server), and the engine settings that
follow from the machine (dtype, CPU thread binding). Batch jobs (jobs.common.batch) and the
serving application (serve/) both build their engines from `ModelConfig` through `engine_kwargs`.
"""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from jobs.common.config import doc
from jobs.common.errors import CotdError


# vLLM's CPU worker takes this share of the node's RAM for everything it holds, not for the KV cache alone
MEMORY_SHARE_DOC = ("GPU: fraction of GPU memory; CPU: fraction of the node's RAM the engine's worker may hold, "
                    "weights and runtime included (the KV cache gets the rest; float32 weights on CPUs without "
                    "bf16 take twice bf16's)")

@dataclass(frozen=True)
class ModelConfig:
    model: str = doc("packaged model name (`cotd models list`), local Hugging Face folder, or hub id")
    backend: Literal["vllm", "openai"] = doc("vllm: replicas inside Ray; openai: an OpenAI-compatible HTTP server", "vllm")
    # vLLM replicas
    concurrency: tuple[int, int] = doc(
        "replicas (min, max); Ray Data autoscales between them, with as many actors finishing (parsing, grading) results", (1, 1))
    tensor_parallel_size: int = doc("GPUs (or CPU bundles) per replica, for models too big for one device", 1)
    use_gpu: bool = doc("run replicas on GPUs (false: vLLM on CPU)", False)
    accelerator_type: str | None = doc("Ray accelerator type to schedule on, e.g. H100 (GPU only)", None)
    cpus_per_replica: int = doc("CPUs reserved per CPU replica", 1)
    replica_resources: dict[str, float] = doc(
        "custom Ray resources each replica reserves beside its CPUs or GPUs, e.g. {teacher_node: 1} to keep "
        "replicas on the nodes started with that resource (`ray start --resources`)", {})
    dtype: str = doc(
        "weights and activations dtype; auto: bfloat16 on GPUs and on CPUs with native bf16 arithmetic "
        "(AVX512-BF16 or AMX), float32 on other CPUs, where vLLM's bf16 runs about 10x slower", "auto")
    max_model_len: int = doc("context length of the engine (prompt + output)", 2048)
    gpu_memory_utilization: float = doc(MEMORY_SHARE_DOC, 0.4)
    batch_size: int = doc("rows per batch sent to a replica", 64)
    max_concurrent_batches: int = doc("batches in flight per replica (batch_size x this = requests the engine sees)", 4)
    seeded: Literal["auto", "always", "never"] = doc(
        "pass each row's seed to the engine; auto: on GPU only (seeded sampling crashes vLLM's CPU engine "
        "when prompts are chunked). Unseeded rows still differ: each is sampled independently", "auto")
    cpu_binding: str = doc(
        "CPU replicas: the cores the engine's compute threads run on. auto: every core of the replica's NUMA node, "
        "the engine's scheduler process sharing one, on machines of up to 4 cores (where a core kept for the "
        "scheduler is a large share of the machine), vLLM's own binding on larger ones; vllm: "
        "vLLM's own binding (one core kept for the scheduler); or a CPU list as vLLM reads it (\"0-7\", \"0-7|8-15\" "
        "with tensor parallelism)", "auto")
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
        if self.cpu_binding not in ("auto", "vllm") and not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*(\|\d+(-\d+)?(,\d+(-\d+)?)*)*", self.cpu_binding):
            raise ValueError(f"cpu_binding must be auto, vllm or a CPU list such as 0-7 or 0-3|4-7, got {self.cpu_binding!r}")
        for name in ("tensor_parallel_size", "cpus_per_replica", "max_model_len", "batch_size", "max_concurrent_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        for name, amount in self.replica_resources.items():
            if name in ("CPU", "GPU", "memory"):
                raise ValueError(f"replica_resources: {name} is set by cpus_per_replica, use_gpu and "
                                 "tensor_parallel_size, not here")
            if not isinstance(amount, (int, float)) or amount <= 0:
                raise ValueError(f"replica_resources.{name} must be a number > 0, got {amount!r}")

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


def model_path(llm: ModelConfig, log) -> str | None:
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


@functools.cache
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this machine's CPU computes in bf16 natively (read once per process). Without it vLLM's CPU kernels convert
    every bf16 operand, about ten times slower than float32 on an AVX2 machine (docs/benchmarks.md).
    Other architectures than x86 are taken at their word."""
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


def engine_dtype(llm: ModelConfig) -> str:
    """The dtype the engine runs in: `llm.dtype`, with auto resolved for this machine's replicas.
    On a CPU cluster of another CPU type than the machine that builds the job, set it explicitly."""
    if llm.dtype != "auto":
        return llm.dtype
    return "bfloat16" if bf16_by_default(llm.use_gpu) else "float32"


# Up to this many physical cores, cpu_binding auto lets the engine's scheduler process share the
# compute threads' cores instead of keeping one for itself (measured on 2 cores in
# docs/benchmarks.md). The scheduler mostly waits on the compute worker; with many cores the
# straggling thread that shares its core would hold back every parallel region, where one core
# fewer costs little.
SHARE_SCHEDULER_CORES = 4


def physical_cores() -> int:
    """Physical cores this process may run on (SMT siblings counted once)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            cores.add(("?", str(cpu)))
    return len(cores) or 1


def cpu_binding_env(llm: ModelConfig) -> dict[str, str]:
    """vLLM's CPU thread-binding settings for `llm.cpu_binding`, as environment variables of the
    engine's process (none on GPUs). `auto` is decided for this machine's core count, like
    `engine_dtype`: on a CPU cluster of other machines, set it explicitly."""
    if llm.use_gpu or llm.cpu_binding == "vllm":
        return {}
    if llm.cpu_binding == "auto":
        return {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"} if physical_cores() <= SHARE_SCHEDULER_CORES else {}
    return {"VLLM_CPU_OMP_THREADS_BIND": llm.cpu_binding}


# What vLLM raises where an engine was started and its core did not come up; the reason is in the
# engine's own log above it (on a CPU, most often a memory share too small for the weights)
ENGINE_START_FAILED = "Engine core initialization failed"
# what vLLM 0.32's CPU worker held besides the KV cache, above the weights, measured in float32 on
# 2-core machines: 1.0 GiB for SmolLM2-135M, 2.3 GiB for Qwen2.5-0.5B (docs/benchmarks.md); the
# share the error suggests budgets the upper end, rounded up
CPU_RUNTIME_GIB = (1.0, 2.5)


def engine_start_error(what: str, key: str, model: str, path: str | None, dtype: str, share: float,
                       ram_bytes: int | None = None) -> CotdError:
    """The error for a vLLM engine on a CPU that did not start: it names `key` (the memory share's
    config key), what the share gives, what the weights need, and the share to try."""
    ram = ram_gib(ram_bytes)
    weights = weights_gib(path, dtype)
    need = (f"the weights ({weights:.1f} GiB in {dtype}) and vLLM's runtime (another "
            f"{CPU_RUNTIME_GIB[0]:g}-{CPU_RUNTIME_GIB[1]:g} GiB measured) before any KV cache" if weights is not None
            else "the weights and vLLM's runtime before any KV cache")
    suggest = "" if weights is None else (
        f" Try {key}={min(0.95, math.ceil((weights + CPU_RUNTIME_GIB[1] + 0.5) / ram * 20) / 20):.2f}.")
    return CotdError(f"{what}: the vLLM engine of {model} did not start (vLLM's own reason is in the log above). On a "
                     f"CPU the usual reason is its memory share: {key}={share:g} gives the engine {share * ram:.1f} GiB "
                     f"of this machine's {ram:.1f} GiB, which must hold {need}; vLLM then says 'less than requested "
                     f"memory for kv' and to reduce other processes' memory, but the share is what to raise.{suggest}")


def _model_config(path: str | None) -> dict[str, Any] | None:
    config = Path(path or "") / "config.json"
    if not path or not config.is_file():
        return None
    import json

    return json.loads(config.read_text())


def _dtype_bytes(dtype: str) -> int:
    return {"float32": 4, "float": 4}.get(dtype, 2)


def ram_gib(ram_bytes: int | None = None) -> float:
    """`ram_bytes` (default: this machine's physical memory) in GiB."""
    return (ram_bytes or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / (1 << 30)


def weights_gib(path: str | None, dtype: str) -> float | None:
    """The weights' size in `dtype`, from a local model folder's config.json (None: no folder)."""
    from jobs.cluster.plan import param_count

    config = _model_config(path)
    return None if config is None else param_count(config) * _dtype_bytes(dtype) / (1 << 30)


def kv_gib_per_sequence(path: str | None, dtype: str, max_model_len: int) -> float | None:
    """The KV cache one sequence of `max_model_len` tokens takes (keys and values of every layer)."""
    config = _model_config(path)
    if config is None:
        return None
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    per_token = config["num_hidden_layers"] * config.get("num_key_value_heads", heads) * head_dim * 2 * _dtype_bytes(dtype)
    return per_token * max_model_len / (1 << 30)


def auto_memory_share(path: str | None, dtype: str, max_model_len: int, gpus: float = 0.0,
                      ram_bytes: int | None = None, sequences: int = 8) -> tuple[float, str]:
    """`gpu_memory_utilization: auto` for a served model, and how it was sized. On a GPU: vLLM's
    0.9 of the share of the GPU the replica holds. On a CPU: the weights, the upper end of vLLM's
    measured runtime (CPU_RUNTIME_GIB) and a KV cache for `sequences` sequences of max_model_len,
    as a share of this machine's RAM rounded up to 0.05 (0.2 when the weights' size is unknown)."""
    if gpus > 0:
        return round(0.9 * min(gpus, 1.0), 2), f"0.9 of the {min(gpus, 1.0):g} GPU the replica holds"
    ram = ram_gib(ram_bytes)
    weights, kv = weights_gib(path, dtype), kv_gib_per_sequence(path, dtype, max_model_len)
    if weights is None or kv is None:
        return 0.2, "the weights' size is unknown"
    need = weights + CPU_RUNTIME_GIB[1] + sequences * kv
    share = min(0.9, max(0.05, math.ceil(need / ram * 20 - 1e-9) / 20))
    return share, (f"{need:.1f} GiB of this machine's {ram:.1f} GiB: weights {weights:.1f} GiB in {dtype}, runtime "
                   f"{CPU_RUNTIME_GIB[1]:g} GiB, KV cache for {sequences} sequences of {max_model_len} tokens "
                   f"{sequences * kv:.1f} GiB")


def engine_kwargs(llm: ModelConfig) -> dict[str, Any]:
    """vLLM engine arguments for `llm` on this machine, whatever runs it; `llm.engine_kwargs` win."""
    kw: dict[str, Any] = {"dtype": engine_dtype(llm), "max_model_len": llm.max_model_len,
                          "gpu_memory_utilization": llm.gpu_memory_utilization,
                          "tensor_parallel_size": llm.tensor_parallel_size}
    if not llm.use_gpu:
        kw["enforce_eager"] = True  # no CUDA graphs on CPU
    kw.update(llm.engine_kwargs)
    return kw
