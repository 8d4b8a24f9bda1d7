"""The optimizer cotd's DeepSpeed config builds: torch's fused AdamW (one pass over each flat state
buffer; 9-12x as fast as the foreach AdamW on CPU, docs/benchmarks.md), which must update the
weights as the foreach one does. DeepSpeed needs a process group, so the engines are built in a
child process, one rank on gloo."""

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
from jobs.train.config import FIRST_ITERATION, TrainConfig, deepspeed_config
from jobs.train.data import collate_packed, example_sequence, pack
from jobs.train.loop import build_model, optimizer_step, skip_unused_cpu_ops

folder, stage, precision, offload = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "offload"
skip_unused_cpu_ops()  # as training does
deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(0)
LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)
rows = pack([example_sequence(list(range(1, n + 1)), [-100] * 2 + list(range(3, n + 1)), 1.0) for n in (9, 14, 6, 11)], 20)
out = {}
for fused in (None, False):  # None: the config as cotd derives it
    cfg = build(TrainConfig, {"data": "-", "out_dir": "-", "model": folder, "method": "full", "precision": precision,
                              "zero": {"stage": stage, "offload_optimizer": offload}, "max_seq_len": 20, "micro_batch_size": 1, "lr": 1e-2,
                              "warmup_steps": 0, "max_grad_norm": 0.0, "scaling": {"num_workers": 1}})
    bf16 = precision == "bf16"
    ds = deepspeed_config(cfg, 3, bf16)
    if fused is not None:
        ds["optimizer"]["params"]["fused"] = fused
    torch.manual_seed(0)
    model = build_model(cfg, folder, torch.bfloat16 if bf16 else torch.float32)
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds,
                                                   dist_init_required=False)
    scheduler.step(FIRST_ITERATION)
    out["initial"] = [p.detach().float().flatten().tolist() for p in model.parameters()]
    for row in rows[:3]:
        batch = collate_packed([row])
        optimizer_step(engine, [batch], float(batch["weights"][:, 1:].sum()), 1, 1, torch.device("cpu"))
    adamw = engine.basic_optimizer
    out["cotd" if fused is None else "foreach"] = {
        "type": type(adamw).__name__, "fused": adamw.defaults["fused"], "foreach": adamw.defaults["foreach"],
        "weights": [p.detach().float().flatten().tolist() for p in model.parameters()]}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.parametrize("stage, precision, offload", [(2, "fp32", ""), (0, "bf16", ""), (2, "bf16", "offload")])
def test_cotd_trains_with_fused_adamw_and_it_updates_as_foreach_does(tmp_path, stage, precision, offload):
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(29600 + stage + (10 if offload else 0)), "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "tiny"), str(stage), precision, offload or "-"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    cotd, foreach = out["cotd"], out["foreach"]
    assert cotd["type"] == "AdamW" and cotd["fused"] is True
    assert foreach["fused"] is False

    def largest_difference(x, y):
        return max(abs(a - b) for w, v in zip(x, y) for a, b in zip(w, v))

    # three steps at lr 1e-2 moved the weights, and both optimizers moved them alike
    tol = 1e-2 if precision == "bf16" else 1e-5  # bf16 weights keep 8 bits of mantissa
    assert largest_difference(cotd["weights"], out["initial"]) > 1e-2
    assert largest_difference(cotd["weights"], foreach["weights"]) <= tol
