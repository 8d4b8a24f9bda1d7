"""The GPU benchmark scripts run where CI is (no GPU) so they cannot rot between the sessions that
have one: `training_gpu.py run --cpu` and `optimizer.py` on a tiny model, without Ray (the GPU
machine has none)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(out / "tiny")
    (out / "lengths.json").write_text(json.dumps({"prompt_answer": [[12, 30], [20, 44], [8, 16]]}))
    # a stand-in for the GPU machine, which has no Ray: importing it fails
    (out / "noray").mkdir()
    (out / "noray" / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None\n")
    return out


def run(tiny: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tiny / "noray"), "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_gpu_training_benchmark_sweeps_on_cpu(tiny):
    base = ["infra/bench/training_gpu.py", "run", "--lengths", str(tiny / "lengths.json"), "--model", str(tiny / "tiny"),
            "--methods", "full", "--zero", "0", "--micro-batch", "1,2", "--loss-chunk", "0,16", "--max-seq-len", "128",
            "--grad-accum", "2", "--warmup", "1", "--steps", "1"]
    refused = run(tiny, *base)
    assert refused.returncode != 0 and "no CUDA GPU here" in refused.stderr
    proc = run(tiny, *base, "--cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"method"')]
    assert [(r["micro_batch"], r["loss_chunk"]) for r in rows] == [(1, 0), (1, 16), (2, 0), (2, 16)]
    assert all(r["tok_s"] > 0 and r["tokens_per_step"] > 0 and r["mfu"] is None for r in rows)


def test_optimizer_benchmark_compares_fused_and_foreach_adamw(tiny):
    proc = run(tiny, "infra/bench/optimizer.py", "--model", str(tiny / "tiny"), "--tokens", "64", "--steps", "1",
               "--repeat", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"fused"')]
    assert [r["fused"] for r in runs] == [False, True]
    assert "fused is" in proc.stdout and "ratio fused/foreach time" in proc.stdout


def test_the_avx2_emulation_hides_avx512_and_native_bf16_only_when_asked():
    """infra/bench/avx2_emulation.py, the proxy for the AVX2-only machine type (docs/benchmarks.md)."""
    code = ("import avx2_emulation, torch.cpu as c; from jobs.common.engine import bf16_by_default; "
            "print(c._is_avx512_supported(), c._is_avx512_bf16_supported(), bf16_by_default(False))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "infra" / "bench"), str(REPO)])}
    on = subprocess.run([sys.executable, "-c", code], env={**env, "COTD_EMULATE_AVX2": "1"}, capture_output=True,
                        text=True, timeout=120)
    assert on.returncode == 0, on.stderr
    assert on.stdout.split() == ["False", "False", "False"]
    off = subprocess.run([sys.executable, "-c", "import avx2_emulation, torch.cpu as c; print(c._is_avx512_supported())"],
                         env={k: v for k, v in env.items() if k != "COTD_EMULATE_AVX2"}, capture_output=True, text=True,
                         timeout=120)
    assert off.returncode == 0, off.stderr
    import torch.cpu

    assert off.stdout.split() == [str(torch.cpu._is_avx512_supported())]


def test_the_serving_bench_pairs_its_interleaved_requests():
    """The router's overhead is the median of per-iteration differences with a bootstrap interval:
    a shared slow moment of the machine cancels out, a shift between the paths does not."""
    import random

    sys.path.insert(0, str(REPO / "infra" / "bench"))
    from serving import paired_median

    rng = random.Random(0)
    base = [rng.gauss(300, 40) for _ in range(300)]  # the machine's swings, seen by both paths
    routed = [b + 3.0 + rng.gauss(0, 1) for b in base]
    med, (lo, hi) = paired_median(routed, base)
    assert 2.7 < med < 3.3 and lo < 3.0 < hi and hi - lo < 0.6
    assert paired_median(base, base) == (0.0, (0.0, 0.0))
