"""The optimizer in cotd's training step: torch's fused AdamW (what cotd's DeepSpeed config asks
for) against its foreach AdamW (what it asked for before, and torch's default), the same full
fine-tuning step otherwise. Prints the AdamW time and the whole step's time of each, and their
ratios, measured in the same process with the two alternating.

Run as:
    .venv/bin/python infra/bench/optimizer.py                       # CPU, SmolLM2-135M
    .venv/bin/python infra/bench/optimizer.py --model qwen2.5-coder-0.5b-instruct --zero 0
    python infra/bench/optimizer.py --model path/to/folder          # on a GPU machine, on its GPU

What runs is a Ray Train worker's step without Ray (one rank): the student from `build_model`,
the DeepSpeed engine on the config `deepspeed_config` derives, `optimizer_step` on packed rows of
random tokens. The AdamW time is the torch optimizer's own `step` inside DeepSpeed's wrapper
(ZeRO's or bf16's), which also clips and copies the weights; the step's time includes forward and
backward. A model folder without weights (only config.json) gets random ones.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def rows(vocab: int, tokens: int, count: int, seed: int = 0) -> list[dict[str, list]]:
    """`count` packed rows of `tokens` tokens, each four examples of a quarter row, prompt masked."""
    from jobs.train.data import IGNORE, example_sequence, pack

    rng = random.Random(seed)
    part = tokens // 4
    examples = []
    for _ in range(4 * count):
        ids = [rng.randrange(vocab) for _ in range(part)]
        examples.append(example_sequence(ids, [IGNORE] * (part // 2) + ids[part // 2:], 1.0))
    return pack(examples, tokens)


def measure(args, folder: str, fused: bool, device) -> dict:
    import torch

    from infra.bench.training_gpu import sync
    from jobs.common.config import build
    from jobs.train.config import TrainConfig, deepspeed_config
    from jobs.train.data import collate_packed
    from jobs.train.loop import build_engine, optimizer_step, trains_in_bf16

    cfg = build(TrainConfig, {
        "data": "-", "out_dir": "-", "model": folder, "method": args.method, "precision": args.precision,
        "zero": {"stage": args.zero}, "max_seq_len": args.tokens, "micro_batch_size": 1, "grad_accum": 1,
        "warmup_steps": 0, "scaling": {"num_workers": 1, "use_gpu": device.type == "cuda"}})
    bf16 = trains_in_bf16(cfg, None, device)
    ds = deepspeed_config(cfg, args.warmup + args.steps, bf16)
    ds["optimizer"]["params"]["fused"] = fused
    torch.manual_seed(0)
    model, engine, _ = build_engine(cfg, folder, ds)
    engine.train()
    adamw = engine.basic_optimizer
    assert adamw.defaults["fused"] is fused, "DeepSpeed did not pass `fused` to torch's AdamW"

    spent = []
    inner = adamw.step

    def timed_step(*a, **kw):
        sync(device)
        t = time.perf_counter()
        out = inner(*a, **kw)
        sync(device)
        spent.append(time.perf_counter() - t)
        return out

    adamw.step = timed_step
    vocab = model.get_input_embeddings().weight.shape[0]
    data = rows(vocab, args.tokens, args.warmup + args.steps)
    steps, adam, losses = [], [], []
    for i, row in enumerate(data):
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in collate_packed([row]).items()}
        weight = float(batch["weights"][:, 1:].sum())
        sync(device)
        t = time.perf_counter()
        loss, total = optimizer_step(engine, [batch], weight, 1, 1, device)
        losses.append(float(loss) / total)
        sync(device)
        if i >= args.warmup:
            steps.append(time.perf_counter() - t)
            adam.append(spent[-1])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    del engine, model, adamw
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"fused": fused, "adamw_s": statistics.median(adam), "step_s": statistics.median(steps),
            "steps_s": [round(x, 3) for x in steps], "adamw_steps_s": [round(x, 3) for x in adam],
            "trainable": trainable, "bf16": bf16, "losses": [round(x, 4) for x in losses]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="packaged name or model folder")
    p.add_argument("--method", choices=["full", "lora"], default="full")
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--tokens", type=int, default=512, help="tokens per step (one packed row)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeat", type=int, default=2, help="runs of each optimizer, alternating")
    args = p.parse_args()

    import torch

    from infra.bench.training_gpu import model_folder, one_rank

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    one_rank(cuda, "29534")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(args.model, Path(tmp))
        for _ in range(args.repeat):
            for fused in (False, True):
                runs.append(measure(args, folder, fused, device))
                print(json.dumps(runs[-1]), flush=True)
    med = {fused: {k: statistics.median(r[k] for r in runs if r["fused"] is fused) for k in ("adamw_s", "step_s")}
           for fused in (False, True)}
    name = torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    print(f"\n{name}; {args.model}, {args.method}, ZeRO-{args.zero}, {'bf16' if runs[0]['bf16'] else 'fp32'}, "
          f"{runs[0]['trainable'] / 1e6:.1f}M trainable, {args.tokens} tokens per step, "
          f"median of {args.repeat} runs x {args.steps} steps")
    print(f"AdamW step: foreach {med[False]['adamw_s']:.4f} s, fused {med[True]['adamw_s']:.4f} s -> "
          f"fused is {med[False]['adamw_s'] / med[True]['adamw_s']:.2f}x as fast")
    print(f"whole step: foreach {med[False]['step_s']:.3f} s, fused {med[True]['step_s']:.3f} s -> "
          f"ratio fused/foreach time {med[True]['step_s'] / med[False]['step_s']:.3f}")


if __name__ == "__main__":
    main()
