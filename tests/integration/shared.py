"""What the integration tests share: a synthetic curated set and a training config for the 2-layer
test model (the fixtures that train its students once per session are in conftest.py), and dotted
config overrides."""

from __future__ import annotations

import json

from jobs.common.config import build
from jobs.train.config import TrainConfig

# the LoRA run the export, resume and evaluation tests share (2 workers, ZeRO-2)
LORA = {"zero": {"stage": 2}, "val_accuracy_samples": 4, "val_accuracy_max_tokens": 16}


def dotted(data: dict, over: dict) -> dict:
    """`data` with `over`'s dotted keys (teacher.batch_size=...) set in place."""
    for key, value in over.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return data


def example(i: int, kind: str) -> dict:
    a, b = i % 9 + 1, i % 7 + 2
    if kind == "general":
        messages = [{"role": "user", "content": f"Spell 'cat{i}' backward."}, {"role": "assistant", "content": f"{i}tac"}]
    else:
        messages = [{"role": "system", "content": "Solve the problem step by step. End with 'Answer: <final answer>'."},
                    {"role": "user", "content": f"What is {a} + {b} times 2?"},
                    {"role": "assistant", "content": f"Step 1: {b} times 2 is {2 * b}.\nStep 2: {a} plus {2 * b} is {a + 2 * b}.\nAnswer: {a + 2 * b}"}]
    return {"example_id": f"{kind}{i}", "kind": kind, "problem_id": f"p{i}", "path_index": 0, "category": "math",
            "difficulty": "default", "format": "pre", "num_steps": 2, "messages": json.dumps(messages),
            "gold_answer": messages[-1]["content"].rsplit(" ", 1)[-1], "verifier": "exact", "metadata": "{}"}


def config(curated, out, model, **over) -> TrainConfig:
    data = {"data": str(curated), "out_dir": str(out), "model": str(model), "precision": "fp32", "max_seq_len": 256,
            "micro_batch_size": 2, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 1, "epochs": 4, "eval_every": 3,
            "save_every": 3, "max_failures": 0, "scaling": {"num_workers": 2}, "lora": {"dropout": 0.0}}
    data.update(over)
    return build(TrainConfig, data)
