"""Invariance of cotd's optimizer step: 2 workers x micro-batch m, 1 worker x micro-batch 2m and
1 worker x micro-batch 1 x 2m accumulation steps make the same update over the same sequences (each
micro-batch's loss is normalized by the label weight of the whole step over all micro-batches and
workers, jobs.train.loop.optimizer_step). The accumulating side computes its loss chunked
(loss_chunk_tokens), so the chunked loss is held to the same standard through DeepSpeed. DeepSpeed
needs a process group, so each side runs as real gloo ranks in child processes, no Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, os, sys
import torch, deepspeed
from transformers import LlamaConfig, LlamaForCausalLM
from jobs.common.config import build
from jobs.train.config import TrainConfig, deepspeed_config
from jobs.train.data import collate_packed, example_sequence
from jobs.train.loop import build_engine, optimizer_step, skip_unused_cpu_ops

folder, micro, steps, accum, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
skip_unused_cpu_ops()  # as training does
deepspeed.init_distributed(dist_backend="gloo")
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
if rank == 0 and not os.path.exists(os.path.join(folder, "config.json")):
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)
torch.distributed.barrier()
# sequences of different lengths and label counts, so an unweighted mean per worker would differ
lengths = [9, 14, 6, 11, 7, 13, 10, 5]
seqs = [example_sequence([(7 * n + i) % 60 + 1 for i in range(n)], [-100] * (n // 3) + [(7 * n + i) % 60 + 1 for i in range(n // 3, n)], 1.0)
        for n in lengths]
cfg = build(TrainConfig, {"data": "-", "out_dir": "-", "model": folder, "method": "full", "precision": "fp32",
                          "zero": {"stage": 2}, "max_seq_len": 64, "micro_batch_size": micro, "grad_accum": accum,
                          "lr": 1e-2, "warmup_steps": 0, "loss_chunk_tokens": chunk, "scaling": {"num_workers": world}})
torch.manual_seed(0)
model, engine, _ = build_engine(cfg, folder, deepspeed_config(cfg, steps, False))
per_rank = micro * accum
losses, norms = [], []
initial = [p.detach().float().flatten().tolist() for p in model.parameters()]
for step in range(steps):
    window = seqs[step * per_rank * world:(step + 1) * per_rank * world]
    mine = window[rank * per_rank:(rank + 1) * per_rank]  # rank r: the r-th share of the step's sequences
    batches = [collate_packed(mine[i:i + micro]) for i in range(0, per_rank, micro)]
    weight = sum(float(b["weights"][:, 1:].sum()) for b in batches)
    loss, total = optimizer_step(engine, batches, weight, world, accum, torch.device("cpu"), chunk)
    t = torch.tensor([float(loss)], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    losses.append(t.item() / total)
    norms.append(float(engine.get_global_grad_norm()))
if rank == 0:
    print("RESULT " + json.dumps({"losses": losses, "norms": norms, "initial": initial,
                                  "weights": [p.detach().float().flatten().tolist() for p in model.parameters()]}))
"""


def run(folder: Path, world: int, micro: int, steps: int, port: int, accum: int = 1, chunk: int = 0) -> dict:
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", CHILD, str(folder), str(micro), str(steps), str(accum), str(chunk)], cwd=REPO,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return json.loads(next(line for line in outs[0][0].splitlines() if line.startswith("RESULT "))[7:])


def test_workers_micro_batches_and_accumulation_make_one_update(tmp_path):
    folder = tmp_path / "tiny"
    one = run(folder, world=1, micro=4, steps=2, port=29650)
    two = run(folder, world=2, micro=2, steps=2, port=29651)
    acc = run(folder, world=1, micro=1, steps=2, port=29652, accum=4, chunk=5)

    def total(x, y):
        return sum(abs(a - b) for w, v in zip(x, y) for a, b in zip(w, v))

    step = total(one["weights"], one["initial"])
    assert step > 1e-2  # the steps did something
    for other in (two, acc):
        assert other["losses"] == pytest.approx(one["losses"], rel=1e-6)
        assert other["norms"] == pytest.approx(one["norms"], rel=1e-5) and min(one["norms"]) > 0
        # Adam divides by the gradient's size, so float summation order shows in tiny gradients' steps
        assert total(other["weights"], one["weights"]) / step < 1e-4
