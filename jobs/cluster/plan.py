"""Resource planning as pure functions: what each teacher replica and each training worker needs
(GPUs, GPU memory, CPUs, host memory), and a clear error before submission when the cluster
cannot hold it. The memory model is the one DeepSpeed's ZeRO paper uses for mixed-precision Adam:
per parameter 2 bytes of bf16 weights, 2 of gradients and 12 of fp32 optimizer state (master
weights, momentum, variance), partitioned over the data-parallel workers stage by stage; plus
activations for the micro-batch and a fixed allowance for the framework.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024 ** 3
FRAMEWORK_GIB = 1.5        # CUDA context, allocator slack, NCCL buffers per GPU
KV_MIN_GIB = 2.0           # the least KV cache worth running a serving engine with


@dataclass(frozen=True)
class GPUType:
    name: str
    memory_gib: float


@dataclass(frozen=True)
class Need:
    """What one replica or worker needs."""
    role: str
    gpus: int
    gpu_memory_gib: float   # per GPU
    cpus: int
    host_memory_gib: float
    notes: str = ""


class PlanError(ValueError):
    """The cluster cannot hold what the job asks for; the message says what and by how much."""


def param_count(config: dict) -> float:
    """Parameters of a decoder-only transformer from its Hugging Face config.json."""
    h, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    inter = config.get("intermediate_size", 4 * h)
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim", h // heads)
    attn = h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h
    mlp = 3 * h * inter  # gated MLP (gate, up, down)
    embed = vocab * h * (1 if config.get("tie_word_embeddings") else 2)
    return layers * (attn + mlp + 2 * h) + embed + h


def teacher_replica(params: float, tensor_parallel: int, gpu: GPUType, dtype_bytes: int = 2,
                    gpu_memory_utilization: float = 0.9) -> Need:
    """One vLLM teacher replica: its weights split over `tensor_parallel` GPUs, and room left for
    a KV cache within vLLM's memory budget (PlanError when there is none)."""
    weights = params * dtype_bytes / tensor_parallel / GIB
    budget = gpu.memory_gib * gpu_memory_utilization
    kv = budget - weights - FRAMEWORK_GIB
    if kv < KV_MIN_GIB:
        raise PlanError(f"teacher: {params / 1e9:.1f}B parameters need {weights:.1f} GiB per GPU at tensor parallelism "
                        f"{tensor_parallel}, leaving {kv:.1f} GiB of a {gpu.name}'s {budget:.0f} GiB budget for the KV "
                        f"cache (at least {KV_MIN_GIB:g} needed); raise tensor_parallel_size to "
                        f"{min_tensor_parallel(params, gpu, dtype_bytes, gpu_memory_utilization)} or use larger GPUs")
    return Need("teacher replica", tensor_parallel, weights + FRAMEWORK_GIB + kv, 2 * tensor_parallel,
                weights * tensor_parallel + 8, f"{kv:.1f} GiB KV cache per GPU")


def min_tensor_parallel(params: float, gpu: GPUType, dtype_bytes: int = 2, gpu_memory_utilization: float = 0.9) -> int:
    budget = gpu.memory_gib * gpu_memory_utilization - FRAMEWORK_GIB - KV_MIN_GIB
    tp = 1
    while params * dtype_bytes / tp / GIB > budget and tp < 64:
        tp *= 2
    return tp


def training_worker(params: float, method: str, zero_stage: int, workers: int, gpu: GPUType, *,
                    offload_optimizer: bool = False, offload_params: bool = False, lora_fraction: float = 0.01,
                    micro_batch_tokens: int = 8192, hidden: int = 4096, layers: int = 32,
                    gradient_checkpointing: bool = False) -> Need:
    """One data-parallel training worker (one GPU) under ZeRO `zero_stage` (PlanError when it does
    not fit). LoRA trains `lora_fraction` of the parameters; the frozen base is held in bf16."""
    n = max(1, workers)
    trainable = params * (lora_fraction if method == "lora" else 1.0)
    frozen = params if method == "lora" else 0.0
    weights, grads, optim = 2 * (trainable + frozen), 2 * trainable, 12 * trainable
    if zero_stage >= 1:
        optim /= n
    if zero_stage >= 2:
        grads /= n
    if zero_stage >= 3:
        weights /= n
    host = 16.0
    if offload_optimizer:
        host += optim / GIB
        optim = 0.0
    if offload_params:
        host += weights / GIB
        weights = 0.0
    # activations kept for backward: ~34 bytes per token per hidden unit per layer in bf16 (Korthikanti
    # et al.), about 2 with activation checkpointing (one layer's input per layer)
    per_token = (2 if gradient_checkpointing else 34) * hidden * layers
    activations = micro_batch_tokens * per_token
    total = (weights + grads + optim + activations) / GIB + FRAMEWORK_GIB
    if total > gpu.memory_gib:
        raise PlanError(f"training: {method} of {params / 1e9:.1f}B parameters with ZeRO-{zero_stage} on {n} workers "
                        f"needs {total:.1f} GiB per GPU (weights {weights / GIB:.1f}, gradients {grads / GIB:.1f}, "
                        f"optimizer {optim / GIB:.1f}, activations {activations / GIB:.1f}); a {gpu.name} has "
                        f"{gpu.memory_gib:g}. Use a higher ZeRO stage, more workers, offload, gradient checkpointing "
                        "or LoRA")
    return Need("training worker", 1, total, 4, host)


def check_cluster(needs: list[tuple[Need, int]], nodes: list[dict]) -> None:
    """PlanError unless the cluster's nodes ({"GPU": n, "CPU": n, "memory_gib": x} each) hold every
    (need, count): GPUs and CPUs in total, and each need's GPUs on one node."""
    gpus = sum(n.get("GPU", 0) for n in nodes)
    cpus = sum(n.get("CPU", 0) for n in nodes)
    want_gpus = sum(need.gpus * count for need, count in needs)
    want_cpus = sum(need.cpus * count for need, count in needs)
    if want_gpus > gpus:
        raise PlanError(f"the job needs {want_gpus} GPUs ({', '.join(f'{c} x {n.role} x {n.gpus}' for n, c in needs)}); "
                        f"the cluster has {gpus}")
    if want_cpus > cpus:
        raise PlanError(f"the job needs {want_cpus} CPUs; the cluster has {cpus}")
    biggest = max((n.get("GPU", 0) for n in nodes), default=0)
    for need, _ in needs:
        if need.gpus > biggest:
            raise PlanError(f"a {need.role} needs {need.gpus} GPUs on one node; the largest node has {biggest}")
