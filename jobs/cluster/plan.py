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


# --- a job against a cluster definition, before submission ----------------------------------------

# GPU memory of the accelerator types Ray names (ray.util.accelerators), in GiB as sold
ACCELERATOR_MEMORY_GIB = {"T4": 16, "V100": 16, "A10G": 24, "L4": 24, "L40S": 48, "A100-40G": 40, "A100": 40,
                          "A100-80G": 80, "H100": 80, "H200": 141, "B200": 180}


@dataclass(frozen=True)
class NodeType:
    """One kind of node a cluster can have, and how many of it at most."""
    name: str
    cpus: float
    gpus: int
    max_count: int
    gpu: GPUType | None = None   # None: no GPUs, or GPUs of a type the definition does not name


@dataclass(frozen=True)
class Workload:
    """What one stage runs on GPUs: the teacher's replicas (their minimum) or the training workers."""
    stage: str
    role: str                      # teacher | training
    count: int
    params: float | None = None    # None: the model's size is not known here (GPUs counted, memory not)
    tensor_parallel: int = 1
    accelerator_type: str | None = None
    method: str = "lora"
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    micro_batch_tokens: int = 8192
    hidden: int = 4096
    layers: int = 32
    gradient_checkpointing: bool = False


def _accelerator(resources: dict) -> GPUType | None:
    for key in resources:
        if str(key).startswith("accelerator_type:"):
            name = str(key).split(":", 1)[1]
            if name in ACCELERATOR_MEMORY_GIB:
                return GPUType(name, ACCELERATOR_MEMORY_GIB[name])
    return None


def _quantity(value) -> float:
    """A Kubernetes CPU quantity ("8", "500m") as CPUs."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def node_types(definition: dict) -> list[NodeType]:
    """The node types of a cluster definition at their largest: a Ray cluster launcher YAML
    (available_node_types, each max_workers times, the head once) or a KubeRay RayCluster (its head
    group once, each worker group maxReplicas times). A GPU type is read from an
    `accelerator_type:<name>` resource (launcher resources, or rayStartParams.resources in KubeRay)."""
    import json

    if "available_node_types" in definition:
        head = definition.get("head_node_type")
        out = []
        for name, t in definition["available_node_types"].items():
            res = t.get("resources") or {}
            count = max(1 if name == head else 0, int(t.get("max_workers", 0)))
            out.append(NodeType(name, float(res.get("CPU", 0)), int(res.get("GPU", 0)), count, _accelerator(res)))
        return out
    if definition.get("kind") == "RayCluster":
        spec = definition["spec"]
        groups = [("head", spec["headGroupSpec"], 1)] + [
            (g["groupName"], g, int(g.get("maxReplicas", g.get("replicas", 0)))) for g in spec.get("workerGroupSpecs", [])]
        out = []
        for name, g, count in groups:
            params = g.get("rayStartParams") or {}
            limits = ((g["template"]["spec"]["containers"][0].get("resources") or {}).get("limits") or {})
            cpus = float(params["num-cpus"]) if "num-cpus" in params else _quantity(limits.get("cpu", 0))
            gpus = int(params["num-gpus"]) if "num-gpus" in params else int(limits.get("nvidia.com/gpu", 0))
            custom = params.get("resources")
            extra = json.loads(json.loads(custom) if str(custom).startswith('"') else custom) if custom else {}
            out.append(NodeType(name, cpus, gpus, count, _accelerator(extra)))
        return out
    raise PlanError("the cluster definition is neither a Ray cluster launcher YAML (available_node_types) nor a "
                    "KubeRay RayCluster")


def _need(w: Workload, gpu: GPUType) -> Need:
    if w.role == "teacher":
        return teacher_replica(w.params, w.tensor_parallel, gpu)
    return training_worker(w.params, w.method, w.zero_stage, w.count, gpu, offload_optimizer=w.offload_optimizer,
                           offload_params=w.offload_params, micro_batch_tokens=w.micro_batch_tokens, hidden=w.hidden,
                           layers=w.layers, gradient_checkpointing=w.gradient_checkpointing)


def check_workloads(workloads: list[Workload], types: list[NodeType]) -> list[str]:
    """PlanError naming the first workload the cluster cannot hold even at its largest; otherwise a
    line per workload saying what it needs and where it fits. Stages run one after another, so
    each workload is checked against the whole cluster on its own."""
    lines = []
    for w in workloads:
        where = [t for t in types if t.gpus > 0 and (w.accelerator_type is None or (t.gpu and t.gpu.name == w.accelerator_type))]
        if not where:
            wanted = f" of type {w.accelerator_type}" if w.accelerator_type else ""
            raise PlanError(f"{w.stage}: the {w.role} runs on GPUs{wanted}, and no node type of the cluster has any")
        per_unit = w.tensor_parallel if w.role == "teacher" else 1
        if not any(t.gpus >= per_unit for t in where):
            raise PlanError(f"{w.stage}: a {w.role} replica needs {per_unit} GPUs on one node; the largest node has "
                            f"{max(t.gpus for t in where)}")
        where = [t for t in where if t.gpus >= per_unit]
        fitting, reasons = [], []
        for t in where:
            if w.params is None or t.gpu is None:
                need = Need(f"{w.role} {'replica' if w.role == 'teacher' else 'worker'}", per_unit, 0.0, 1, 0.0,
                            "memory not checked: " + ("the model's size is unknown here" if w.params is None
                                                      else f"node type {t.name} names no GPU type"))
            else:
                try:
                    need = _need(w, t.gpu)
                except PlanError as e:
                    reasons.append(f"on {t.name} ({t.gpu.name}): {e}")
                    continue
            fitting.append((t, need))
        if not fitting:
            raise PlanError(f"{w.stage}: " + "; ".join(reasons))
        nodes = [{"GPU": t.gpus, "CPU": t.cpus} for t, _ in fitting for _ in range(t.max_count)]
        need = fitting[0][1]
        try:
            check_cluster([(need, w.count)], nodes)
        except PlanError as e:
            raise PlanError(f"{w.stage}: {e} on the node types that can hold a {need.role} "
                            f"({', '.join(t.name for t, _ in fitting)})") from None
        lines.append(f"{w.stage}: {w.count} x {need.role}, {need.gpus} GPU{'s' * (need.gpus > 1)} each"
                     + (f", {need.gpu_memory_gib:.1f} GiB per GPU" if need.gpu_memory_gib else "")
                     + f" ({need.notes})" * bool(need.notes) + f" on {', '.join(t.name for t, _ in fitting)}")
    return lines
