"""Train the student on curated examples: Ray Train workers, DeepSpeed ZeRO, LoRA or full.

Run as:
    python -m jobs.train --config configs/train/quickstart.yaml data=runs/quickstart/curated
    cotd train --config configs/train/quickstart.yaml data=runs/q1/curated out_dir=runs/q1/student

Checks the data, the model and the config before any worker starts; tokenizes the examples on Ray
Data (loss on the answer only), packs them, and runs a TorchTrainer whose workers each stream
their shard. Checkpoints go to <out_dir>/checkpoints (Ray Train); a failed worker restarts from the
latest one, and re-running the same command resumes there. Ends with <out_dir>/adapter (LoRA),
<out_dir>/merged (a full model vLLM and transformers load), MODEL_CARD.md, metrics.jsonl and
manifest.json.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from jobs.common.config import ConfigError
from jobs.common.errors import DataError
from jobs.common.progress import emit
from jobs.common.models import resolve
from jobs.common.raycluster import init_ray
from jobs.common.runs import (MANIFEST, check_dataset, check_run_dir, claim_run_dir, dataset_digest, part_files, publish,
                              read_json, write_lines, write_manifest, write_text)
from jobs.common.schemas import TRAIN_READS
from jobs.train.accuracy import accuracy_sample
from jobs.train.config import TrainConfig
from jobs.train.data import tokenize_batch
from jobs.train.loop import EXPORT_DIR, STATE_FILE, train_loop

STAGE = "train"


def main(cfg: TrainConfig, log=emit) -> dict[str, Any]:
    started = time.time()
    out = Path(cfg.out_dir).resolve()

    # validate: data, model, LoRA targets and the run directory, before Ray or a worker starts
    train_files, val_files = check_data(cfg.data)
    fingerprint = {**cfg.fingerprint(), "data": dataset_digest(train_files + val_files)}
    checkpoints = out / "checkpoints"
    check_run_dir(out, STAGE, fingerprint, has_outputs=checkpoints.exists(), overwrite=cfg.overwrite)
    model_path = str(resolve(cfg.model, log=log))
    check_model(cfg, model_path)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    sample = []
    if cfg.val_accuracy_samples:
        if not val_files:
            raise ConfigError(f"val_accuracy_samples: {cfg.data} has no validation split to sample")
        try:
            sample = accuracy_sample(val_files, cfg.val_accuracy_samples, cfg.seed, tokenizer)
        except ValueError as e:
            raise DataError(str(e)) from None
    if cfg.overwrite and checkpoints.exists():
        log(f"overwrite=true: deleting {checkpoints}")
        shutil.rmtree(checkpoints)
    claim_run_dir(out, STAGE, fingerprint)

    # data: tokenized and packed on Ray Data, then streamed to the workers
    init_ray(cfg.ray, log=log)
    train_ds, n_train, truncated = _sequences(cfg, model_path, train_files)
    val_ds, n_val, _ = _sequences(cfg, model_path, val_files) if val_files else (None, 0, 0)
    per_step = cfg.global_batch()
    steps_per_epoch = n_train // per_step
    if steps_per_epoch == 0:
        raise DataError(f"data: {n_train} training sequences do not fill one step of {per_step} "
                        f"(micro_batch_size {cfg.micro_batch_size} x grad_accum {cfg.grad_accum} x "
                        f"{cfg.scaling.num_workers} workers); lower them or add data")
    total_steps = min(cfg.max_steps or 10**12, steps_per_epoch * cfg.epochs)
    log(f"{n_train} training sequences ({'packed' if cfg.packing else 'one example each'}, "
        f"{truncated} examples cut to {cfg.max_seq_len} tokens), {n_val} validation; "
        f"{total_steps} steps of {per_step} sequences on {cfg.scaling.num_workers} workers, "
        + (cfg.precision if cfg.precision != "auto" else "precision auto (bf16 on GPUs and on CPUs with native bf16, "
           "decided by the workers)"))

    # run
    result = _fit(cfg, model_path, pad_id, train_ds, val_ds, sample, total_steps, steps_per_epoch, out, log)

    # export and summarize
    with result.checkpoint.as_directory() as d:
        state = json.loads((Path(d) / STATE_FILE).read_text())
        _publish_export(cfg, model_path, Path(d) / EXPORT_DIR, out, log)
    history = state["history"]
    write_lines(out / "metrics.jsonl", history)
    final = history[-1]
    manifest = write_manifest(
        out, STAGE, cfg, fingerprint, started, inputs={"data": fingerprint["data"]},
        model=cfg.model, model_path=model_path, student_prompt=student_prompt(cfg.data), method=cfg.method,
        steps=final["step"], resumed_at_steps=state["resumes"], precision=state["precision"], final=final,
        first_loss=history[0]["loss"], sequences={"train": n_train, "val": n_val, "truncated": truncated},
        checkpoint=result.checkpoint.path, outputs=_outputs(cfg, out))
    write_text(out / "MODEL_CARD.md", model_card(cfg, manifest, out.name))
    log(f"trained {final['step']} steps in {state['precision']}: loss {history[0]['loss']:.4f} -> {final['loss']:.4f}"
        + (f", val loss {final['val_loss']:.4f}" if final.get("val_loss") is not None else "")
        + (f", val answer accuracy {final['val_accuracy']:.3f} on {len(sample)} problems"
           if final.get("val_accuracy") is not None else ""))
    for name, path in manifest["outputs"].items():
        log(f"{name}: {path}")
    return manifest


def check_data(path: str) -> tuple[list[Path], list[Path]]:
    """The train (required) and val (optional) part files of a curated dataset, empty parts left out."""
    import pyarrow.parquet as pq

    root = Path(path)
    if not root.is_dir():
        raise DataError(f"data: {path} does not exist (expected curate's out_dir, holding train/ and val/)")
    found = {}
    for split in ("train", "val"):
        files = check_dataset(root / split, TRAIN_READS, "data", "cotd curate") if part_files(root / split) else []
        found[split] = [f for f in files if pq.read_metadata(f).num_rows > 0]
    if not found["train"]:
        raise DataError(f"data: {root / 'train'} holds no examples (has `cotd curate` kept any?)")
    return found["train"], found["val"]


def student_prompt(data: str) -> dict[str, Any] | None:
    """How the student was prompted in training (curate's example settings: format, granularity,
    system text), from the curated set's manifest; what evaluation and serving must prompt it with."""
    manifest = Path(data) / MANIFEST
    if not manifest.is_file():
        return None
    examples = read_json(manifest).get("config", {}).get("examples") or {}
    return {k: examples.get(k) for k in ("format", "granularity", "system")} if examples else None


def check_model(cfg: TrainConfig, model_path: str) -> None:
    """LoRA targets must name modules the student has, and a chunked loss needs a plain output
    head; checked on an empty (meta) copy."""
    if cfg.method != "lora" and not cfg.loss_chunk_tokens:
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from jobs.train.loss import decoder_and_head

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    def adapts(name: str, target: str) -> bool:  # how PEFT matches a target_modules entry to a module name
        return name == target or name.endswith("." + target)

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    targets = list(cfg.lora.target_modules) if cfg.method == "lora" else []
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    unmatched = [t for t in targets if not any(adapts(n, t) for n in names)]
    if unmatched:
        raise ConfigError(f"lora.target_modules: {', '.join(map(repr, unmatched))} match no module of {cfg.model}; "
                          f"its linear layers are: {', '.join(leaves)}")
    if cfg.loss_chunk_tokens:
        try:
            decoder_and_head(model)
        except ValueError as e:
            raise ConfigError(f"{e} ({cfg.model})") from None
        head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
        if any(adapts(head, t) for t in targets):
            raise ConfigError(f"loss_chunk_tokens with lora.target_modules adapting the output head ({head!r}): the "
                              "chunked loss reads the head's weight alone; leave the head out or use loss_chunk_tokens: 0")


def _sequences(cfg: TrainConfig, model_path: str, files: list[Path]):
    """The dataset of training sequences for one split, materialized in Ray's object store (so
    every epoch and every restart streams the same sequences), its size and truncation count."""
    import ray

    ds = ray.data.read_parquet([str(f) for f in files]).select_columns(["messages", "kind"])
    ds = ds.random_shuffle(seed=cfg.seed)
    # packing works within each batch of 512 examples, so their order (the seeded shuffle) decides
    # it; the batches' order kept too, so a rerun (a resumed job) streams the same sequences
    ds.context.execution_options.preserve_order = True
    ds = ds.map_batches(tokenize_batch, fn_args=(model_path, cfg.max_seq_len, dict(cfg.weights), cfg.packing),
                        batch_size=512)
    ds = ds.materialize()
    n = ds.count()
    # a plain projection read back, not an aggregation (which would start a shuffle)
    truncated = sum(int(b["truncated"].sum()) for b in ds.select_columns(["truncated"]).iter_batches(
        batch_size=None, batch_format="numpy"))
    return ds.drop_columns(["truncated"]), n, truncated


def _fit(cfg: TrainConfig, model_path: str, pad_id: int, train_ds, val_ds, sample: list[dict], total_steps: int,
         steps_per_epoch: int, out: Path, log):
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    s = cfg.scaling
    datasets = {"train": train_ds, **({"val": val_ds} if val_ds is not None else {})}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg, "model_path": model_path, "total_steps": total_steps,
                           "steps_per_epoch": steps_per_epoch, "pad_id": pad_id, "has_val": val_ds is not None,
                           "accuracy_sample": sample},
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, accelerator_type=s.accelerator_type,
                                  resources_per_worker={"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {}),
                                                        **s.worker_resources},
                                  placement_strategy=s.placement_strategy),
        datasets=datasets,
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        run_config=RunConfig(name="train", storage_path=str(out / "checkpoints"),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cuda" if s.use_gpu else "cpu",
                                                              "DS_BUILD_OPS": "0"}}),
    )
    return trainer.fit()


def _publish_export(cfg: TrainConfig, model_path: str, export: Path, out: Path, log) -> None:
    """adapter/ (LoRA) and merged/ (always): a full Hugging Face model with the student's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out / ".export-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if cfg.method == "lora":
        from peft import PeftModel

        shutil.copytree(export, tmp / "adapter")
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
        merged = PeftModel.from_pretrained(base, str(tmp / "adapter")).merge_and_unload()
    else:
        merged = AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.bfloat16)
    merged.save_pretrained(tmp / "merged")
    AutoTokenizer.from_pretrained(model_path).save_pretrained(tmp / "merged")
    publish(tmp, out, ("adapter", "merged"))
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"exported: {out / 'merged'}" + (f" and {out / 'adapter'}" if cfg.method == "lora" else ""))


def _outputs(cfg: TrainConfig, out: Path) -> dict[str, str]:
    names = (["adapter"] if cfg.method == "lora" else []) + ["merged", "metrics.jsonl", "MODEL_CARD.md"]
    return {n: str(out / n) for n in names}


def model_card(cfg: TrainConfig, manifest: dict[str, Any], name: str) -> str:
    f = manifest["final"]
    lines = [
        f"# {name}: a cotd student", "",
        f"- base model: `{cfg.model}` ({manifest['model_path']})",
        f"- method: {cfg.method}" + (f" (r={cfg.lora.r}, alpha={cfg.lora.alpha}, targets {', '.join(cfg.lora.target_modules)})" if cfg.method == "lora" else ""),
        f"- data: `{cfg.data}` ({manifest['sequences']['train']} training sequences, {manifest['sequences']['val']} validation)",
        f"- DeepSpeed ZeRO stage {cfg.zero.stage}, {manifest['precision']}, {cfg.scaling.num_workers} workers, "
        f"{'GPU' if cfg.scaling.use_gpu else 'CPU'}; global batch {cfg.global_batch()} sequences of <= {cfg.max_seq_len} tokens",
        f"- steps: {f['step']}; loss {manifest['first_loss']:.4f} -> {f['loss']:.4f}"
        + (f"; validation loss {f['val_loss']:.4f}" if f.get("val_loss") is not None else "")
        + (f"; validation answer accuracy {f['val_accuracy']:.3f}" if f.get("val_accuracy") is not None else ""),
    ]
    if manifest.get("student_prompt"):
        p = manifest["student_prompt"]
        lines.append(f"- prompted as trained: format {p['format']}, granularity {p['granularity']}"
                     + (f", system text {p['system']!r}" if p.get("system") else ""))
    lines += ["", "The full configuration and metrics are in manifest.json and metrics.jsonl.", ""]
    return "\n".join(lines)
