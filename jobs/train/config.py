"""Configuration of the train stage (`cotd train`). The DeepSpeed config is derived from it
(`deepspeed_config`), never kept as a second file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from jobs.common.config import doc, to_dict
from jobs.common.raycluster import RayConfig


@dataclass(frozen=True)
class LoraConfig:
    r: int = doc("LoRA rank", 16)
    alpha: int = doc("LoRA alpha (the update is scaled by alpha / r)", 32)
    dropout: float = doc("dropout on the LoRA input", 0.05)
    target_modules: list[str] = doc("module names (or name suffixes) that get adapters", ["q_proj", "k_proj", "v_proj", "o_proj"])

    def check(self) -> None:
        if self.r < 1 or self.alpha < 1:
            raise ValueError(f"r and alpha must be >= 1, got r={self.r}, alpha={self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")


@dataclass(frozen=True)
class ZeroConfig:
    stage: int = doc("DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)", 2)
    offload_optimizer: bool = doc("keep optimizer states in CPU memory (stages 1-3)", False)
    offload_params: bool = doc("keep parameters in CPU memory (stage 3 only)", False)

    def check(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"stage must be 0, 1, 2 or 3, got {self.stage}")
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("offload_optimizer needs ZeRO stage 1, 2 or 3 (stage is 0)")
        if self.offload_params and self.stage != 3:
            raise ValueError(f"offload_params needs ZeRO stage 3 (stage is {self.stage})")


@dataclass(frozen=True)
class WorkersConfig:
    num_workers: int = doc("Ray Train workers (one per GPU on GPU clusters)", 2)
    use_gpu: bool = doc("train on GPUs (NCCL); false: CPU workers (gloo)", False)
    cpus_per_worker: int = doc("CPUs reserved per worker", 1)
    accelerator_type: str | None = doc("Ray accelerator type to schedule on, e.g. H100 (GPU only)", None)
    worker_resources: dict[str, float] = doc("custom Ray resources each worker reserves, to place workers on the "
                                             "nodes that offer them (a node group's resource, say)", {})
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = doc(
        "how Ray places the workers' bundles: PACK fills the nodes that have room first, SPREAD one per node "
        "where it can", "PACK")

    def check(self) -> None:
        if self.num_workers < 1 or self.cpus_per_worker < 1:
            raise ValueError(f"num_workers and cpus_per_worker must be >= 1, got {self.num_workers}, {self.cpus_per_worker}")
        if self.accelerator_type and not self.use_gpu:
            raise ValueError("accelerator_type is set but use_gpu is false")
        bad = {k: v for k, v in self.worker_resources.items() if k in ("CPU", "GPU", "memory") or not v > 0}
        if bad:
            raise ValueError(f"worker_resources holds custom resources with amounts > 0 (CPU and GPU have keys of "
                             f"their own), got {bad}")


@dataclass(frozen=True)
class TrainConfig:
    data: str = doc("curate's out_dir (reads its train/ and val/ folders)")
    out_dir: str = doc("training run directory: checkpoints/, adapter/, merged/, metrics.jsonl, MODEL_CARD.md, manifest.json")
    model: str = doc("the student: packaged model name, local Hugging Face folder, or hub id")
    method: Literal["lora", "full"] = doc("lora: train adapters (PEFT); full: train every weight", "lora")
    lora: LoraConfig = doc("LoRA settings (method: lora)", LoraConfig())
    zero: ZeroConfig = doc("DeepSpeed ZeRO settings", ZeroConfig())
    precision: Literal["auto", "bf16", "fp32"] = doc(
        "bf16 mixed precision (where the device supports it), fp32, or auto: bf16 on GPUs and on CPUs with native "
        "bf16 arithmetic (AVX512-BF16 or AMX), fp32 on other CPUs; decided on the workers (on CPUs, bf16 only if "
        "every worker's CPU has it), and a resumed run keeps its checkpoint's precision", "auto")
    max_seq_len: int = doc("longest training sequence in tokens; longer examples are cut (and counted)", 1024)
    packing: bool = doc("pack several examples into each sequence (no attention across examples)", True)
    micro_batch_size: int = doc("sequences per worker per forward pass", 4)
    grad_accum: int = doc("micro-batches per optimizer step", 1)
    lr: float = doc("peak learning rate", 2e-4)
    weight_decay: float = doc("AdamW weight decay", 0.0)
    warmup_steps: int = doc("linear warmup steps", 10)
    schedule: Literal["cosine", "linear", "constant"] = doc("decay after warmup", "cosine")
    max_grad_norm: float = doc("gradient clipping norm (0: off)", 1.0)
    epochs: int = doc("passes over the training set", 1)
    max_steps: int | None = doc("stop after this many optimizer steps (null: epochs decide)", None)
    gradient_checkpointing: bool = doc("recompute activations in backward to save memory", False)
    compile: bool = doc("compile each decoder layer with torch.compile: fewer, fused kernels (pays off on GPUs, "
                        "where eager PyTorch leaves the GPU waiting on kernel launches); the first steps compile", False)
    loss_chunk_tokens: int = doc(
        "compute the loss from the output head this many label tokens at a time, never holding a micro-batch's "
        "logits (float32 logits of a 150k vocabulary take ~2.3 GiB per 4096 tokens); 0: from the model's logits", 0)
    weights: dict[str, float] = doc("loss weight per example kind (mixed objectives)", {"rationale": 1.0, "self_eval": 0.5, "general": 1.0})
    eval_every: int = doc("validation loss every N optimizer steps (0: only at the end)", 20)
    val_accuracy_samples: int = doc(
        "at each validation also answer accuracy: the student answers this many validation problems (greedy, "
        "its own prompt) and each answer is checked as the teacher's were; 0: off", 0)
    val_accuracy_max_tokens: int = doc("longest answer in the accuracy check, in tokens", 512)
    save_every: int = doc("checkpoint every N optimizer steps (0: only at the end)", 20)
    keep_checkpoints: int = doc("checkpoints Ray Train keeps", 2)
    max_failures: int = doc("worker failures survived by restarting from the latest checkpoint", 2)
    seed: int = doc("seed of data order and initialization", 0)
    overwrite: bool = doc("delete the checkpoints in out_dir and train from the start instead of resuming", False)
    scaling: WorkersConfig = doc("workers and devices", WorkersConfig())
    ray: RayConfig = doc("where to run", RayConfig())

    def check(self) -> None:
        for name in ("max_seq_len", "micro_batch_size", "grad_accum", "epochs", "val_accuracy_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or null, got {self.max_steps}")
        for name in ("warmup_steps", "eval_every", "save_every", "max_failures", "loss_chunk_tokens",
                     "val_accuracy_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        bad = {k: v for k, v in self.weights.items() if k not in ("rationale", "self_eval", "general") or v < 0}
        if bad:
            raise ValueError(f"weights: kinds are rationale, self_eval, general with weights >= 0; got {bad}")
        if self.compile and self.zero.stage == 3:
            raise ValueError("compile with zero.stage 3: ZeRO-3 gathers each layer's weights through module hooks, "
                             "and cotd has not verified torch.compile across them; use stage 0-2 or compile: false")
        if self.loss_chunk_tokens and self.zero.stage == 3:
            raise ValueError("loss_chunk_tokens with zero.stage 3: the chunked loss reads the output head's weight "
                             "outside its module, where ZeRO-3 has not gathered it; use stage 0-2 or loss_chunk_tokens: 0")
        if self.zero.offload_params and self.method == "lora":
            raise ValueError("zero.offload_params with method lora: the frozen base weights gain nothing "
                             "from ZeRO-3 parameter offload here; use method: full or turn it off")

    # settings a resumed run may change: where and how often it reports, not what it trains
    RESUMABLE = ("data", "out_dir", "ray", "overwrite", "max_failures", "keep_checkpoints", "save_every", "eval_every",
                 "val_accuracy_samples", "val_accuracy_max_tokens")

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint was trained under: resuming it under anything else is refused."""
        return {k: v for k, v in to_dict(self).items() if k not in self.RESUMABLE}

    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.scaling.num_workers


FIRST_ITERATION = 1  # the scheduler iteration of the first training step (see deepspeed_config)


def deepspeed_config(cfg: TrainConfig, total_steps: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config for this run, derived from `cfg` alone."""
    zero: dict[str, Any] = {"stage": cfg.zero.stage}
    if cfg.zero.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.zero.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    if cfg.zero.stage == 3:
        # gather full weights into the checkpoint so the export needs no ZeRO-3 reassembly
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    # Step k (1-based) of training runs at the scheduler's iteration k: the loop moves the scheduler
    # to iteration 1 before the first step (FIRST_ITERATION), because at iteration 0 DeepSpeed's
    # warmup gives lr 0 and the first update would be lost. So warmup lr is k/warmup of the peak,
    # and the end of the decay sits one step past the last step (its lr is small, not 0): iteration
    # total+1 for the linear decay, total+2 for the cosine one (which counts its first step as 1).
    # DeepSpeed needs >= 1 warmup step; warmup_steps: 0 becomes one that already starts at the peak.
    warmup = max(1, min(cfg.warmup_steps, total_steps))
    start = 1.0 if cfg.warmup_steps == 0 else 0.0
    if cfg.schedule == "constant":
        scheduler = {"type": "WarmupLR", "params": {"warmup_min_lr": start * cfg.lr, "warmup_max_lr": cfg.lr,
                                                    "warmup_num_steps": warmup, "warmup_type": "linear"}}
    elif cfg.schedule == "cosine":
        scheduler = {"type": "WarmupCosineLR", "params": {
            "total_num_steps": total_steps + 2, "warmup_num_steps": warmup, "warmup_type": "linear",
            "warmup_min_ratio": start, "cos_min_ratio": 0.0}}
    else:  # linear warmup, then linear decay towards 0
        scheduler = {"type": "WarmupDecayLR", "params": {
            "total_num_steps": total_steps + 1, "warmup_min_lr": start * cfg.lr, "warmup_max_lr": cfg.lr,
            "warmup_num_steps": warmup, "warmup_type": "linear"}}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.global_batch(),
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        # torch's AdamW (no compiled DeepSpeed ops needed), fused: one pass over each flat fp32 state
        # buffer instead of one per arithmetic operation (docs/benchmarks.md)
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": cfg.weight_decay, "torch_adam": True,
                                                  "fused": True}},
        "scheduler": scheduler,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
