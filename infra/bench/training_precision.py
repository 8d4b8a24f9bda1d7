"""bf16 against fp32 training on this machine's CPU: the same cotd training run (1 worker, DeepSpeed
ZeRO-2, packed) twice in one process, once per precision; prints both rates and their ratio. It is
what `precision: auto` decides from the CPU flags: bf16 where the CPU computes it natively
(AVX512-BF16 or AMX), fp32 elsewhere.

Run as:
    .venv/bin/python infra/bench/training_precision.py
    .venv/bin/python infra/bench/training_precision.py --method full --steps 8

The data is synthetic arithmetic chains (the lengths matter here, not the content). Rates are real
tokens per second after the first step, as in infra/bench/training.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "infra" / "bench"))


def synthetic_examples(root: Path, n: int) -> None:
    from training import write_train_examples

    examples = []
    for i in range(n):
        a, b, times = i % 97 + 3, i % 89 + 5, i % 6 + 1
        steps = "\n".join(f"Step {k + 1}: {a} plus {k * b} is {a + k * b}." for k in range(times + 1))
        messages = [{"role": "system", "content": "Solve the problem step by step. End with 'Answer: <final answer>'."},
                    {"role": "user", "content": f"What is {a} plus {b} times {times}?"},
                    {"role": "assistant", "content": f"{steps}\nAnswer: {a + times * b}"}]
        examples.append({"example_id": f"e{i}", "problem_id": f"p{i}", "num_steps": times + 1, "messages": messages})
    write_train_examples(root, examples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--method", choices=["lora", "full"], default="lora")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=512)
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from jobs.common.config import build
    from jobs.common.engine import cpu_has_native_bf16
    from jobs.train.config import TrainConfig
    from training import cotd_rate

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, native bf16: {cpu_has_native_bf16()}; "
          f"model {args.model}, {args.method}")
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        synthetic_examples(Path(tmp) / "data", 400)
        for precision in ("fp32", "bf16"):
            cfg = build(TrainConfig, {
                "data": str(Path(tmp) / "data"), "out_dir": str(Path(tmp) / precision), "model": args.model,
                "method": args.method, "precision": precision, "zero": {"stage": 2}, "max_seq_len": args.max_seq_len,
                "micro_batch_size": args.micro_batch, "grad_accum": 1, "max_steps": args.steps, "epochs": 100,
                "warmup_steps": 0, "eval_every": 0, "save_every": 0, "max_failures": 0,
                "scaling": {"num_workers": 1, "cpus_per_worker": os.cpu_count()}})
            rates[precision], per_step = cotd_rate(cfg)
            print(f"  {precision}: {rates[precision]:7.1f} tok/s   (per step: {per_step})", flush=True)
    print(f"ratio bf16/fp32 (tok/s): {rates['bf16'] / rates['fp32']:.3f}   "
          f"(precision auto picks {'bf16' if cpu_has_native_bf16() else 'fp32'} here)")


if __name__ == "__main__":
    main()
