"""The train stage for real: Ray Train with 2 gloo workers, DeepSpeed ZeRO-2 (LoRA) and ZeRO-3
(full), gradient-accumulation invariance, a worker killed mid-run, export that transformers and
vLLM load, and bad input refused before any worker starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from jobs.common.config import ConfigError, build
from jobs.common.runs import PartWriter
from jobs.curate.examples import EXAMPLE_SCHEMA
from jobs.train.config import TrainConfig
from jobs.train.main import main

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


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


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("curated")
    train = [example(i, "rationale") for i in range(48)] + [example(100 + i, "general") for i in range(8)]
    val = [example(200 + i, "rationale") for i in range(8)]
    PartWriter(root / "train", EXAMPLE_SCHEMA).write(pa.Table.from_pylist(train, schema=EXAMPLE_SCHEMA))
    PartWriter(root / "val", EXAMPLE_SCHEMA).write(pa.Table.from_pylist(val, schema=EXAMPLE_SCHEMA))
    return root


def config(curated, out, model, **over) -> TrainConfig:
    data = {"data": str(curated), "out_dir": str(out), "model": str(model), "precision": "fp32", "max_seq_len": 256,
            "micro_batch_size": 2, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 1, "epochs": 4, "eval_every": 3,
            "save_every": 3, "max_failures": 0, "scaling": {"num_workers": 2}, "lora": {"dropout": 0.0}}
    data.update(over)
    return build(TrainConfig, data)


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def check_run(out: Path, manifest: dict, accuracy: bool = False, precision: str = "fp32") -> list[dict]:
    """`accuracy`: the run sampled answer accuracy at each validation (val_accuracy_samples);
    `precision`: the one the workers trained in."""
    h = history(out)
    validated = [m for m in h if m.get("val_loss") is not None]
    if accuracy:  # a random student answers few right, but each validation measures it
        assert validated and all(0 <= m["val_accuracy"] <= 1 for m in validated)
        assert "validation answer accuracy" in (out / "MODEL_CARD.md").read_text()
    assert [m["step"] for m in h] == list(range(1, manifest["steps"] + 1))  # a continuous curve
    assert h[-1]["loss"] < h[0]["loss"] - 0.2, [m["loss"] for m in h]  # learning, even for LoRA on a random model
    assert h[-1]["val_loss"] is not None and h[-1]["tokens_per_s"] > 0
    assert all(m["lr"] >= 0 for m in h)
    ckpts = sorted(p.name for p in (out / "checkpoints" / "train").iterdir() if p.name.startswith("step-"))
    assert ckpts and ckpts[-1].endswith("-final") and len(ckpts) <= 2  # keep_checkpoints
    assert "loss" in (out / "MODEL_CARD.md").read_text()
    assert manifest["precision"] == precision and f", {precision}, " in (out / "MODEL_CARD.md").read_text()
    return h


@pytest.mark.parametrize("packing", [True, False])
def test_sequences_stage_tokenizes_packs_and_counts_cut_examples(curated, tiny_model, tokenizer, ray_session, packing):
    """The Ray Data stage the workers stream from: every example becomes training tokens (packed or
    one sequence each) and the examples cut to max_seq_len are counted."""
    import pyarrow.parquet as pq

    from jobs.train.data import tokenize_example
    from jobs.train.main import _sequences, check_data

    train_files, _ = check_data(str(curated))
    rows = [r for f in train_files for r in pq.read_table(f).to_pylist()]

    def sequences(max_len: int):
        expected = [tokenize_example(json.loads(r["messages"]), tokenizer, max_len) for r in rows]
        cfg = config(curated, "-", tiny_model, max_seq_len=max_len, packing=packing)
        ds, n, truncated = _sequences(cfg, str(tiny_model), train_files)
        seqs = ds.take_all()
        assert n == len(seqs) and truncated == sum(cut for _, _, cut in expected)
        assert sum(len(s["input_ids"]) for s in seqs) == sum(len(ids) for ids, _, _ in expected)
        assert all(len(s["input_ids"]) <= max_len for s in seqs)
        # each example starts its positions at 0, packed or not
        assert sum(list(s["position_ids"]).count(0) for s in seqs) == len(expected)
        return seqs, truncated

    # the rationale examples take 77-81 tokens: at 79 the longest are cut
    seqs, truncated = sequences(79)
    assert 0 < truncated < len(rows)
    again, _ = sequences(79)  # the seeded order: the same sequences
    assert [list(s["input_ids"]) for s in again] == [list(s["input_ids"]) for s in seqs]
    if packing:  # with room for two, examples share sequences
        roomy, truncated = sequences(200)
        assert truncated == 0 and len(roomy) < len(rows)


def test_lora_zero2_two_workers_trains_exports_and_vllm_loads(tmp_path, curated, tiny_model, ray_session, capfd):
    out = tmp_path / "student"
    manifest = main(config(curated, out, tiny_model, zero={"stage": 2}, val_accuracy_samples=4,
                           val_accuracy_max_tokens=16), log=lambda *_: None)
    check_run(out, manifest, accuracy=True)
    # a local cluster has no state API; Ray Train's cleaner would warn about it every second
    assert "State API may be temporarily unavailable" not in capfd.readouterr().err
    assert (out / "adapter" / "adapter_config.json").is_file()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q].float(), base.state_dict()[q].float())  # the adapter merged in

    # the merged student is a teacher cotd generate can load with vLLM
    from jobs.generate.config import GenerateConfig
    from jobs.generate.main import main as generate

    gen = generate(build(GenerateConfig, {
        "out_dir": str(tmp_path / "gen"), "paths_per_problem": 1, "sampling": {"max_tokens": 8},
        "teacher": {"model": str(out / "merged"), "max_model_len": 1024, "gpu_memory_utilization": 0.1},
        "sources": [{"type": "reasoning_gym", "tasks": [{"name": "basic_arithmetic", "size": 2, "seed": 1}]}]}),
        log=lambda *_: None)
    assert gen["summary"]["status"]["error"] == 0 and gen["summary"]["chains"] == 2


def test_full_zero3_two_workers(tmp_path, curated, tiny_model, ray_session):
    out = tmp_path / "student"
    manifest = main(config(curated, out, tiny_model, method="full", zero={"stage": 3}, lr=1e-3, packing=False,
                           val_accuracy_samples=3, val_accuracy_max_tokens=16), log=lambda *_: None)
    check_run(out, manifest, accuracy=True)  # 3 problems on 2 ranks: generate in step across ZeRO-3 shards
    assert not (out / "adapter").exists()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not torch.equal(merged.state_dict()["model.norm.weight"].float(), base.state_dict()["model.norm.weight"].float())


def test_micro_batch_times_accumulation_invariance(tmp_path, curated, tiny_model, ray_session):
    """One optimizer step over the same 4 sequences: 1 x 4 and 4 x 1 give the same gradient (its
    norm, which Adam's scale invariance would hide from the weights) and the same weights. The
    1 x 4 side computes its loss chunked (loss_chunk_tokens), so the chunked loss is held to the
    same standard through DeepSpeed."""
    import shutil

    weights, norms = [], []
    train_only = tmp_path / "train-only"  # a curated set without a val split trains too
    shutil.copytree(curated / "train", train_only / "train")
    for mb, ga, chunk in ((4, 1, 0), (1, 4, 5)):
        out = tmp_path / f"mb{mb}"
        main(config(train_only, out, tiny_model, method="full", zero={"stage": 2}, micro_batch_size=mb, grad_accum=ga,
                    max_steps=1, lr=1e-2, warmup_steps=0, scaling={"num_workers": 1}, loss_chunk_tokens=chunk),
             log=lambda *_: None)
        from transformers import AutoModelForCausalLM

        # the fp32 weights as trained (merged/ is bf16), from the final checkpoint's export
        export = out / "checkpoints" / "train" / "step-000001-final" / "export"
        weights.append(AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).state_dict())
        norms.append(history(out)[0]["grad_norm"])
    assert norms[0] == pytest.approx(norms[1], rel=1e-5) and norms[0] > 0
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
    key = "model.layers.1.mlp.down_proj.weight"
    moved = (weights[0][key] - base[key]).abs().max().item()
    assert moved > 1e-3  # the step did something
    diff = sum((weights[0][k] - weights[1][k]).abs().sum().item() for k in base)
    step = sum((weights[0][k] - base[k]).abs().sum().item() for k in base)
    assert diff / step < 1e-5  # measured ~4e-8 (float summation order)


def test_killed_worker_restarts_from_checkpoint(tmp_path, curated, tiny_model, ray_session, monkeypatch):
    """Also: precision auto is decided by the workers' CPUs, not the driver's (here told the
    opposite of what this machine has)."""
    import psutil

    import jobs.common.llm as llm_mod

    workers = llm_mod.cpu_has_native_bf16()
    monkeypatch.setattr(llm_mod, "cpu_has_native_bf16", lambda *a: not workers)

    out = tmp_path / "student"
    killed: list[int] = []

    def kill_after_first_checkpoint():
        deadline = time.time() + 400
        # Ray Train has registered a checkpoint once its manager's snapshot names one
        snapshot = out / "checkpoints" / "train" / "checkpoint_manager_snapshot.json"
        while time.time() < deadline and not killed:
            if snapshot.is_file() and "step-" in snapshot.read_text():
                for proc in psutil.process_iter(["cmdline"]):
                    if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
                        proc.kill()
                        killed.append(proc.pid)
                        return
            time.sleep(0.5)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    manifest = main(config(curated, out, tiny_model, max_failures=2, precision="auto"), log=lambda *_: None)
    killer.join(timeout=5)
    assert killed, "no training worker was found to kill"
    assert len(manifest["resumed_at_steps"]) == 1 and manifest["resumed_at_steps"][0] >= 3
    check_run(out, manifest, precision="bf16" if workers else "fp32")


def test_rerun_after_the_job_is_killed_resumes_from_its_checkpoint(tmp_path, curated, tiny_model, ray_session):
    """SIGKILL the whole `cotd train` job (driver, its Ray, the workers) after its first checkpoint,
    then run the same command again: it continues from that checkpoint, not from step 0."""
    out = tmp_path / "student"
    settings = {"data": str(curated), "out_dir": str(out), "model": str(tiny_model), "precision": "fp32",
                "max_seq_len": 256, "micro_batch_size": 2, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 1,
                "epochs": 4, "eval_every": 3, "save_every": 3, "max_failures": 0, "lora": {"dropout": 0.0},
                "scaling": {"num_workers": 2}}
    cfg = tmp_path / "train.yaml"
    cfg.write_text(json.dumps(settings))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "train", "--config", str(cfg)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    snapshot = out / "checkpoints" / "train" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and not (snapshot.is_file() and "step-" in snapshot.read_text()):
        time.sleep(0.5)
    assert proc.poll() is None, f"the first run ended (exit {proc.returncode}) before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()

    manifest = main(build(TrainConfig, settings), log=lambda *_: None)
    assert len(manifest["resumed_at_steps"]) == 1 and manifest["resumed_at_steps"][0] >= 3
    check_run(out, manifest)


@pytest.mark.parametrize("over, message", [
    ({"lora": {"target_modules": ["q_proj", "qkv"]}}, r"lora.target_modules: 'qkv' match no module.*q_proj"),
    ({"lora": {"target_modules": ["q_proj", "lm_head"]}, "loss_chunk_tokens": 64},
     r"loss_chunk_tokens with lora.target_modules adapting the output head \('lm_head'\)"),
])
def test_bad_lora_target_fails_before_any_worker(tmp_path, curated, tiny_model, over, message):
    out = tmp_path / "student"
    with pytest.raises(ConfigError, match=message):
        main(config(curated, out, tiny_model, **over), log=lambda *_: None)
    assert not out.exists()


def test_accuracy_without_a_validation_split_is_refused(tmp_path, curated, tiny_model):
    import shutil

    shutil.copytree(curated / "train", tmp_path / "curated" / "train")
    with pytest.raises(ConfigError, match="val_accuracy_samples: .* has no validation split"):
        main(config(tmp_path / "curated", tmp_path / "out", tiny_model, val_accuracy_samples=4), log=lambda *_: None)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("data, message", [("missing", "does not exist"), ("empty", "holds no examples")])
def test_bad_data_is_refused(tmp_path, data, message):
    root = tmp_path / "curated"
    if data == "empty":
        (root / "train").mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-m", "jobs.train", "--config", str(REPO / "configs/train/quickstart.yaml"),
                           f"data={root}", f"out_dir={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "cotd: error: data:" in proc.stderr and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
