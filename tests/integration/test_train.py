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

import pytest
import torch

from jobs.common.config import ConfigError, build
from jobs.common.errors import CotdError
from jobs.common.schemas import METRIC_FIELDS
from jobs.train.config import TrainConfig
from jobs.train.main import main
from shared import LORA, config, cotd_start

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


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
    assert all(set(m) <= set(METRIC_FIELDS) for m in h)  # the documented record
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


def test_lora_zero2_two_workers_trains_and_exports(lora_run, tiny_model):
    """The merged student loads in vLLM too: the evaluation and serving tests serve it."""
    out, manifest, lines = lora_run
    check_run(out, manifest, accuracy=True)
    assert any(line.startswith("trained ") for line in lines)
    assert (out / "adapter" / "adapter_config.json").is_file()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q].float(), base.state_dict()[q].float())  # the adapter merged in


def test_full_zero3_survives_a_killed_worker(tmp_path, curated, tiny_model, ray_session, monkeypatch):
    """Full fine-tuning under ZeRO-3 on 2 workers, one of them killed after the first checkpoint:
    Ray Train restarts the group, which loads the sharded checkpoint and continues the curve.
    Also: precision auto is decided by the workers' CPUs, not the driver's (here told the opposite
    of what this machine has)."""
    import psutil

    import jobs.common.engine as llm_mod

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
    manifest = main(config(curated, out, tiny_model, method="full", zero={"stage": 3}, lr=1e-3, packing=False, epochs=2,
                           max_failures=2, precision="auto", val_accuracy_samples=3, val_accuracy_max_tokens=16),
                    log=lambda *_: None)
    killer.join(timeout=5)
    assert killed, "no training worker was found to kill"
    assert len(manifest["resumed_at_steps"]) == 1 and manifest["resumed_at_steps"][0] >= 3
    # 3 problems on 2 ranks: they generate in step across ZeRO-3 shards
    check_run(out, manifest, accuracy=True, precision="bf16" if workers else "fp32")
    assert not (out / "adapter").exists()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not torch.equal(merged.state_dict()["model.norm.weight"].float(), base.state_dict()["model.norm.weight"].float())


def test_rerun_after_the_job_is_killed_resumes_from_its_checkpoint(tmp_path, lora_run, curated, tiny_model, ray_session):
    """SIGKILL the whole `cotd train` job (driver, its Ray, the workers) after its first checkpoint,
    then run the same command again: it continues from that checkpoint, not from step 0, and ends
    with the loss curve and the weights of the same run uninterrupted (lora_run). Its non-TTY
    output shows progress lines while it trains. Resuming under another setup is refused."""
    from jobs.common.config import to_dict

    out = tmp_path / "student"
    settings = to_dict(config(curated, out, tiny_model, **LORA))
    cfg = tmp_path / "train.yaml"
    cfg.write_text(json.dumps(settings))
    log = tmp_path / "first-run.log"
    proc = cotd_start("train", "--config", str(cfg), log=log.open("w"), group=True)
    snapshot = out / "checkpoints" / "train" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and not (snapshot.is_file() and "step-" in snapshot.read_text()):
        time.sleep(0.5)
    assert proc.poll() is None, f"the first run ended (exit {proc.returncode}) before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()

    first = log.read_text()
    progress = [line for line in first.splitlines() if "[train] " in line]
    assert progress  # progress from the workers, through a file
    assert len(set(progress)) == len(progress), progress  # each line once (Ray Train's print patch)
    assert "shm_comm_op built" not in first  # DeepSpeed compiles nothing training does not use
    # a local cluster has no state API; Ray Train's cleaner would warn about it every second
    assert "State API may be temporarily unavailable" not in first
    manifest = main(build(TrainConfig, settings), log=lambda *_: None)
    assert len(manifest["resumed_at_steps"]) == 1 and manifest["resumed_at_steps"][0] >= 3
    check_run(out, manifest, accuracy=True)

    # the same run uninterrupted: the same loss curve and the same weights
    ref_out, ref_manifest, _ = lora_run
    ref, resumed = history(ref_out), history(out)
    assert [m["step"] for m in resumed] == [m["step"] for m in ref]
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in ref], rel=1e-4)
    assert [m.get("val_loss") is None for m in resumed] == [m.get("val_loss") is None for m in ref]
    assert [m["val_loss"] for m in resumed if m.get("val_loss") is not None] == pytest.approx(
        [m["val_loss"] for m in ref if m.get("val_loss") is not None], rel=1e-4)
    from safetensors.torch import load_file

    a, b = (load_file(o / "adapter" / "adapter_model.safetensors") for o in (ref_out, out))
    assert a.keys() == b.keys()
    moved = max(a[k].abs().max().item() for k in a if "lora_B" in k)  # LoRA's B starts at zero
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-3 and diff < 1e-4 * moved, (diff, moved)

    # resuming its checkpoints under another setup would mix two runs: refused before any work
    with pytest.raises(CotdError, match=r"holds train outputs made with a different lr.*overwrite=true"):
        main(build(TrainConfig, {**settings, "lr": 1e-3}), log=lambda *_: None)


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
