"""Student training throughput, two ratios measured in one run on the same model and data:

  (a) packed vs padded: cotd's training loop with `packing: true` against `packing: false`
      (each micro-batch padded to its longest example), real (non-pad) tokens per second;
  (b) cotd vs plain: cotd's loop (Ray Train, 1 worker, DeepSpeed ZeRO-2, LoRA, packed) against a
      plain single-process PyTorch + PEFT loop over the very same packed micro-batches.

Run as:
    .venv/bin/python infra/bench/training.py --chains runs/quickstart/chains
    .venv/bin/python infra/bench/training.py --chains runs/q1/chains --model qwen2.5-coder-0.5b-instruct --steps 8

The data is the real CoT length distribution: every answered chain of a generate run becomes one
training example (zero-shot student prompt, the chain as the answer). Rates are real (non-pad)
tokens over the wall time from the end of the first step (which pays for warm-up) to the end of
the last. Both sides use the same number of CPU threads (`--threads`, default all cores).
Targets: (a) >= 1.4, (b) >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def chain_examples(chains: Path) -> list[tuple[dict, list[dict[str, str]]]]:
    """(chain row, training chat) for every answered chain of a generate run: the zero-shot
    student prompt, the chain as the answer."""
    from jobs.common.runs import read_dataset
    from jobs.formats.prompts import build_messages

    return [(r, build_messages(r["question"], fmt=r["format"], difficulty=r["difficulty"], granularity="fine",
                               exemplars=[]) + [{"role": "assistant", "content": r["chain"]}])
            for r in read_dataset(chains).to_pylist() if r["status"] == "ok"]


def write_train_examples(out: Path, examples: list[dict]) -> int:
    """A curated-style dataset (train/ only) of rationale examples. Each gives at least example_id,
    problem_id and messages (a chat); the other example fields default to a math `pre` chain."""
    import pyarrow as pa

    from jobs.common.runs import PartWriter
    from jobs.common.schemas import EXAMPLE_SCHEMA

    defaults = {"kind": "rationale", "path_index": 0, "category": "math", "difficulty": "default", "format": "pre",
                "num_steps": 0}
    rows = [{**defaults, **e, "messages": json.dumps(e["messages"])} for e in examples]
    PartWriter(out / "train", EXAMPLE_SCHEMA).write(pa.Table.from_pylist(rows, schema=EXAMPLE_SCHEMA))
    return len(rows)


def examples_from_chains(chains: Path, out: Path) -> int:
    """Every answered chain of a generate run as a rationale example (see write_train_examples)."""
    return write_train_examples(out, [
        {"example_id": f"{r['problem_id']}#{r['path_index']}", "problem_id": r["problem_id"],
         "path_index": r["path_index"], "category": r["category"], "difficulty": r["difficulty"],
         "format": r["format"], "num_steps": r["num_steps"], "messages": messages}
        for r, messages in chain_examples(chains)])


def train_config(args, data: Path, out: Path, packing: bool):
    from jobs.common.config import build
    from jobs.train.config import TrainConfig

    return build(TrainConfig, {
        "data": str(data), "out_dir": str(out), "model": args.model, "method": "lora", "precision": "fp32",
        "zero": {"stage": 2}, "packing": packing, "max_seq_len": args.max_seq_len, "micro_batch_size": args.micro_batch,
        "grad_accum": 1, "max_steps": args.steps, "epochs": 100, "warmup_steps": 0, "eval_every": 0, "save_every": 0,
        "max_failures": 0, "lora": {"dropout": 0.0}, "scaling": {"num_workers": 1, "cpus_per_worker": args.threads}})


def throughput(steps: list[tuple[int, float]]) -> float:
    """Real tokens per second over the steps after the first, from (tokens, end time) per step:
    everything between the first step's end and the last one's counts (data, reporting, barriers)."""
    return sum(n for n, _ in steps[1:]) / (steps[-1][1] - steps[0][1])


def cotd_rate(cfg) -> tuple[float, list[float]]:
    from jobs.train.main import main

    main(cfg, log=lambda *_: None)
    rows = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    return throughput([(r["tokens"], r["time"]) for r in rows]), [round(r["tokens_per_s"], 1) for r in rows]


def plain_rate(cfg, model_path: str) -> tuple[float, list[float]]:
    """The same packed micro-batches (same tokenizer, packing, collation and attention) through a
    plain loop: one process, PEFT LoRA, torch AdamW, the same loss."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jobs.common.runs import read_dataset
    from jobs.train.attention import register
    from jobs.train.data import collate_packed, example_sequence, model_inputs, pack, tokenize_example
    from jobs.train.loss import weighted_loss_sum

    torch.set_num_threads(cfg.scaling.cpus_per_worker)  # what Ray gives the cotd worker (OMP_NUM_THREADS)
    tok = AutoTokenizer.from_pretrained(model_path)
    seqs = []
    for r in read_dataset(Path(cfg.data) / "train").to_pylist():
        ids, labels, _ = tokenize_example(json.loads(r["messages"]), tok, cfg.max_seq_len)
        seqs.append(example_sequence(ids, labels, 1.0))
    seqs = pack(seqs, cfg.max_seq_len)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation=register())
    model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=0.0,
                                             target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    steps, rates = [], []
    mb = cfg.micro_batch_size
    for step in range(cfg.max_steps):
        batch_seqs = [seqs[(step * mb + i) % len(seqs)] for i in range(mb)]
        t0 = time.time()
        b = collate_packed(batch_seqs)
        logits = model(**model_inputs(b)).logits
        loss = weighted_loss_sum(logits, b["labels"], b["weights"]) / b["weights"][:, 1:].sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens = sum(len(s["input_ids"]) for s in batch_seqs)
        steps.append((tokens, time.time()))
        rates.append(round(tokens / (steps[-1][1] - t0), 1))
    return throughput(steps), rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chains", required=True, help="a generate run's chains folder")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="CPU threads of each side: the cotd worker's cpus_per_worker and the plain loop's torch threads")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from jobs.common.models import resolve

    model_path = str(resolve(args.model))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        n = examples_from_chains(Path(args.chains), data)
        print(f"{n} examples from {args.chains}; model {args.model}; {args.steps} steps of {args.micro_batch} sequences; "
              f"{args.threads} CPU threads per side")
        packed, packed_all = cotd_rate(train_config(args, data, Path(tmp) / "packed", packing=True))
        padded, padded_all = cotd_rate(train_config(args, data, Path(tmp) / "padded", packing=False))
        plain, plain_all = plain_rate(train_config(args, data, Path(tmp) / "plain", packing=True), model_path)
    print(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores", "examples": n, "threads": args.threads,
                      "tok_s": {"cotd_packed": packed_all, "cotd_padded": padded_all, "plain_packed": plain_all}}))
    print(f"(a) packed / padded real tokens/s: {packed:.1f} / {padded:.1f} = {packed / padded:.3f}  (target >= 1.4)")
    print(f"(b) cotd / plain real tokens/s:    {packed:.1f} / {plain:.1f} = {packed / plain:.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
