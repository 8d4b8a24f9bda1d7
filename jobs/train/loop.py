"""The training function each Ray Train worker runs: the student (PEFT LoRA or full) under a
DeepSpeed engine on Ray's process group, fed from its Ray Data shard, with validation, metrics,
checkpoints that all ranks write and Ray Train merges, and resume from the latest one.

Loss normalization makes the update independent of how a global batch is cut: each micro-batch's
weighted token loss is divided by the weighted label tokens of the whole optimizer step (all
micro-batches, all workers), then scaled back by what DeepSpeed divides out (gradient accumulation
steps, data-parallel averaging). So micro-batch 1 x accumulation 4 equals 4 x 1, and packed equals
padded.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

STATE_FILE = "cotd_state.json"
EXPORT_DIR = "export"
TAG = "ds"


def build_model(cfg, model_path: str, dtype):
    """The student as it trains: the base model, with LoRA adapters (PEFT) or all weights trainable."""
    from transformers import AutoModelForCausalLM

    from jobs.train.attention import register

    # packed micro-batches need attention that keeps their examples apart (attention.py)
    attention = register() if cfg.packing else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=attention)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if cfg.method == "lora":
            model.enable_input_require_grads()
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                                 target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM"))
    if cfg.compile:
        # in place, layer by layer: the module tree and its state dict keys stay as they are
        # (checkpoints, export and resume are unchanged); packed rows vary in length, so the
        # graphs take the token count as a symbol rather than recompiling per length
        layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
        if not layers:
            raise ValueError(f"compile: found no decoder layers in {type(model).__name__}")
        for layer in layers:
            layer.compile(dynamic=True)
    return model


UNUSED_CPU_OPS = ("deepspeed_shm_comm",)


def skip_unused_cpu_ops() -> None:
    """Keep DeepSpeed from compiling ops cotd's training never calls. When its comm starts on CPU it
    builds its shared-memory all-reduce (a C++ op: about 40 s on 2 cores, once per machine, again
    whenever the build tools change, and a build killed midway left a lock later runs waited on
    forever). Only DeepSpeed's tensor-parallel inference all-reduce uses that op; training's
    all-reduce is the process group's (gloo on CPU). DeepSpeed reads which ops this machine can
    build from one dict, kept once probed; an op marked there as incompatible is not built. Call
    before DeepSpeed's comm starts (deepspeed.initialize or init_distributed), on CPU."""
    import deepspeed.ops

    for name in UNUSED_CPU_OPS:
        deepspeed.ops.__compatible_ops__[name] = False


def build_engine(cfg, model_path: str, ds_config: dict[str, Any]):
    """The student (build_model, in the config's precision) under a DeepSpeed engine on `ds_config`
    (deepspeed_config's), its scheduler moved to the first step's iteration: (model, engine,
    scheduler). The scheduler starts before iteration 0 (lr 0); see deepspeed_config. A resumed
    run's load_checkpoint restores its own position."""
    import deepspeed
    import torch

    from jobs.train.config import FIRST_ITERATION

    model = build_model(cfg, model_path, torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32)
    if not torch.cuda.is_available():
        skip_unused_cpu_ops()
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config,
        dist_init_required=False)
    scheduler.step(FIRST_ITERATION)
    return model, engine, scheduler


def _sequences(batch: dict[str, Any]) -> list[dict[str, list]]:
    from jobs.train.data import SEQ_FIELDS

    n = len(batch["input_ids"])
    return [{k: [x.item() if hasattr(x, "item") else x for x in batch[k][i]] for k in SEQ_FIELDS} for i in range(n)]


def _windows(shard, cfg, epoch: int, skip: int):
    """Lists of `grad_accum` micro-batches (each a list of sequences) for one epoch, the first
    `skip` windows left out (resume)."""
    window: list = []
    done = 0
    for batch in shard.iter_batches(batch_size=cfg.micro_batch_size, batch_format="numpy", drop_last=True,
                                    local_shuffle_buffer_size=None if cfg.packing else 256,
                                    local_shuffle_seed=cfg.seed + epoch):
        window.append(_sequences(batch))
        if len(window) == cfg.grad_accum:
            if done >= skip:
                yield window
            done += 1
            window = []


def optimizer_step(engine, batches: list[dict[str, Any]], local_weight: float, world: int, grad_accum: int,
                   device, loss_chunk: int = 0) -> tuple[Any, float]:
    """One optimizer step of the DeepSpeed `engine` over this worker's micro-batches (collated and
    on `device`; their label weight is `local_weight`): (this worker's weighted loss sum, as a
    tensor that has not been waited for, and the label weight of the step over all workers).
    `loss_chunk`: see jobs.train.loss.loss_sum."""
    from jobs.train.loss import loss_sum as batch_loss_sum

    total_weight, = _all_reduce([local_weight], device)
    scale = world * grad_accum / max(total_weight, 1e-9)
    loss_sum = 0.0
    for b in batches:
        part = batch_loss_sum(engine, b, loss_chunk)
        loss_sum = loss_sum + part.detach()
        engine.backward(part * scale)
        engine.step()
    return loss_sum, total_weight


def _saved_state(ckpt) -> dict[str, Any]:
    """The checkpoint's cotd state, read alone (the DeepSpeed state is loaded later)."""
    with ckpt.filesystem.open_input_stream(f"{ckpt.path}/{STATE_FILE}") as f:
        return json.loads(f.read())


def trains_in_bf16(cfg, saved: dict[str, Any] | None, device) -> bool:
    """Whether the run trains in bf16, decided on the workers, since the machine that builds the
    job may have another CPU than theirs, or no GPU: `precision`, where auto is bf16 on GPUs and,
    on CPUs, bf16 only if every worker's CPU has native bf16 arithmetic (without it DeepSpeed's
    bf16 converts every operand and is slower than fp32; with it bf16 is faster, docs/benchmarks.md). A resumed auto run keeps the precision its checkpoint
    was saved in (its optimizer state is kept in that form), wherever it restarts."""
    from jobs.common.engine import bf16_by_default

    if cfg.precision != "auto":
        return cfg.precision == "bf16"
    if saved and saved.get("precision"):
        return saved["precision"] == "bf16"
    if cfg.scaling.use_gpu:
        return bf16_by_default(True)
    lacking, = _all_reduce([0.0 if bf16_by_default(False) else 1.0], device)
    return lacking == 0


def _all_reduce(values: list[float], device) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@dataclass
class RunState:
    """What a run carries from step to step; a checkpoint saves it (STATE_FILE) beside DeepSpeed's."""
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one METRIC_FIELDS record per step
    resumes: list[int] = field(default_factory=list)             # the steps the run was resumed at
    precision: str = "fp32"

    @classmethod
    def resumed(cls, saved: dict[str, Any]) -> "RunState":
        return cls(step=saved["step"], history=saved["history"], resumes=saved["resumes"] + [saved["step"]],
                   precision=saved["precision"])


class Worker:
    """One Ray Train worker's run: `setup`, then `train_step` per optimizer step, `validate` and
    `save` when they are due (`run`)."""

    def __init__(self, config: dict[str, Any]):
        self.cfg, self.model_path = config["cfg"], config["model_path"]
        self.total_steps, self.steps_per_epoch = config["total_steps"], config["steps_per_epoch"]
        self.pad_id, self.has_val = config["pad_id"], config["has_val"]
        self.sample = config.get("accuracy_sample") or []

    # --- set-up: device, precision, the engine (restored from a checkpoint), data shards ---------
    def setup(self) -> None:
        import ray.train
        import torch

        from jobs.train.config import deepspeed_config
        from jobs.train.data import collate, collate_packed
        from jobs.train.flops import StepFlops, peak_flops

        cfg = self.cfg
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
        if cfg.scaling.use_gpu:
            torch.cuda.set_device(self.device)
        ckpt = ray.train.get_checkpoint()
        saved = _saved_state(ckpt) if ckpt else None
        bf16 = trains_in_bf16(cfg, saved, self.device)
        torch.manual_seed(cfg.seed)
        self.collate = collate_packed if cfg.packing else partial(collate, pad_id=self.pad_id)
        self.model, self.engine, self.scheduler = build_engine(cfg, self.model_path,
                                                               deepspeed_config(cfg, self.total_steps, bf16))
        self.state = RunState(precision="bf16" if bf16 else "fp32")
        if ckpt:
            with ckpt.as_directory() as d:
                self.engine.load_checkpoint(d, tag=TAG, load_module_strict=cfg.method != "lora")
            self.state = RunState.resumed(saved)
        self.step_flops = StepFlops(self.model)
        self.peak = peak_flops(torch.cuda.get_device_name(self.device)) if cfg.scaling.use_gpu else None
        self.train_shard = ray.train.get_dataset_shard("train")
        self.val_shard = ray.train.get_dataset_shard("val") if self.has_val else None
        if self.sample:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.engine.train()

    def on_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}

    # --- one optimizer step over a window of grad_accum micro-batches ---------------------------
    def train_step(self, window: list[list[dict[str, list]]], epoch: int, t0: float) -> dict[str, Any]:
        from jobs.train.flops import example_lengths

        cfg = self.cfg
        cpu_batches = [self.collate(mb) for mb in window]
        local_weight = sum(float(b["weights"][:, 1:].sum()) for b in cpu_batches)
        local_tokens = sum(int((b["labels"] != -100).sum()) for b in cpu_batches)
        seq_tokens = sum(len(s["input_ids"]) for mb in window for s in mb)  # real tokens, no padding
        flops = self.step_flops((n for mb in window for s in mb for n in example_lengths(s["position_ids"])), local_tokens)
        loss_sum, total_weight = optimizer_step(self.engine, [self.on_device(b) for b in cpu_batches], local_weight,
                                                self.world, cfg.grad_accum, self.device, cfg.loss_chunk_tokens)
        self.state.step += 1
        loss_sum, tokens, seq_tokens_all, flops_all = _all_reduce([float(loss_sum), local_tokens, seq_tokens, flops],
                                                                  self.device)
        seconds = time.perf_counter() - t0
        grad_norm = self.engine.get_global_grad_norm()
        metrics = {"step": self.state.step, "epoch": epoch, "loss": loss_sum / max(total_weight, 1e-9),
                   "grad_norm": float(grad_norm) if grad_norm is not None else None,
                   "lr": self.scheduler.get_last_lr()[0] if self.scheduler else cfg.lr,
                   "tokens": int(seq_tokens_all), "tokens_per_s": seq_tokens_all / seconds,
                   "label_tokens": int(tokens), "time": time.time()}
        if self.peak:
            metrics["mfu"] = flops_all / seconds / (self.peak * self.world)
        return metrics

    # --- validation: loss on the val split, answer accuracy on the sample -----------------------
    def validate(self) -> dict[str, Any]:
        out: dict[str, Any] = {"val_loss": self.val_loss()}
        if self.sample:
            out["val_accuracy"] = self.accuracy()
        return out

    def val_loss(self) -> float | None:
        import torch

        from jobs.train.loss import loss_sum as batch_loss_sum

        if self.val_shard is None:
            return None
        self.engine.eval()
        loss_sum = weight = 0.0
        with torch.no_grad():
            for batch in self.val_shard.iter_batches(batch_size=self.cfg.micro_batch_size, batch_format="numpy"):
                b = self.on_device(self.collate(_sequences(batch)))
                loss_sum += batch_loss_sum(self.engine, b, self.cfg.loss_chunk_tokens).item()
                weight += b["weights"][:, 1:].sum().item()
        self.engine.train()
        loss_sum, weight = _all_reduce([loss_sum, weight], self.device)
        return loss_sum / weight if weight else None

    def accuracy(self) -> float:
        from jobs.train.accuracy import answer_accuracy

        self.engine.eval()
        correct, answered = answer_accuracy(self.engine.module, self.sample, self.rank, self.world, self.tokenizer,
                                            self.cfg.val_accuracy_max_tokens, self.device,
                                            synced=self.cfg.zero.stage == 3)
        self.engine.train()
        correct, answered = _all_reduce([correct, answered], self.device)
        return correct / answered

    # --- save: every rank's DeepSpeed state, the run state, the export at the end ----------------
    def save(self, metrics: dict[str, Any], final: bool) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as d:
            self.engine.save_checkpoint(d, tag=TAG, exclude_frozen_parameters=self.cfg.method == "lora")
            if final:
                _export(self.engine, self.model, self.cfg, Path(d) / EXPORT_DIR, self.rank)
            if self.rank == 0:
                (Path(d) / STATE_FILE).write_text(json.dumps(asdict(self.state)))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=f"step-{self.state.step:06d}{'-final' if final else ''}")

    # --- the run ----------------------------------------------------------------------------------
    def run(self) -> None:
        import ray.train

        from jobs.common.progress import Progress

        cfg, state = self.cfg, self.state
        if state.step >= self.total_steps:  # restored from the last checkpoint of a finished run: export again
            self.save(state.history[-1], final=True)
            return
        # rank 0 reports progress: a line every few seconds, which Ray shows on the driver
        progress = Progress(self.total_steps, "train", unit="steps", done=state.step) if self.rank == 0 else None
        with progress or contextlib.nullcontext():
            for epoch in range(state.step // self.steps_per_epoch, cfg.epochs):
                skip = state.step - epoch * self.steps_per_epoch
                t0 = time.perf_counter()  # a step's time includes waiting for its data, not evaluation or saving
                for window in _windows(self.train_shard, cfg, epoch, skip):
                    metrics = self.train_step(window, epoch, t0)
                    last = state.step >= self.total_steps
                    if (cfg.eval_every and state.step % cfg.eval_every == 0) or last:
                        metrics.update(self.validate())
                    state.history.append(metrics)
                    if progress:
                        progress.update(1, tokens=metrics["tokens"], note=f"loss {metrics['loss']:.4f}" + (
                            f", val loss {metrics['val_loss']:.4f}" if metrics.get("val_loss") is not None else ""))
                    if last or (cfg.save_every and state.step % cfg.save_every == 0):
                        self.save(metrics, final=last)
                    else:
                        ray.train.report(metrics)
                    if last:
                        return
                    t0 = time.perf_counter()
        raise RuntimeError(f"the data ran out at step {state.step} of {self.total_steps}")


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's training function: one worker's whole run."""
    worker = Worker(config)
    worker.setup()
    worker.run()


def _export(engine, model, cfg, folder: Path, rank: int) -> None:
    """The trained weights in Hugging Face form: the PEFT adapter (LoRA) or the full model. Under
    ZeRO-3 the weights are partitioned, so every rank takes part in gathering them."""
    state = None
    if cfg.zero.stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    if rank != 0:
        return
    folder.mkdir(parents=True, exist_ok=True)
    if state is not None and cfg.method == "lora":
        from peft import get_peft_model_state_dict

        # the consolidated dict names keys like the PEFT model; keep the adapter's own
        state = {k: v for k, v in state.items() if "lora_" in k}
        model.save_pretrained(folder, state_dict=get_peft_model_state_dict(model, state_dict=state))
    elif state is not None:
        model.save_pretrained(folder, state_dict=state)
    else:
        model.save_pretrained(folder)
