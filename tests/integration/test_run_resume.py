"""`cotd run` killed in two different stages and run again: SIGKILL of the whole job (driver, its
Ray, the workers) once while the teacher writes chains and once while the student trains; each
rerun finishes the work with nothing lost and nothing done twice. The teacher is an HTTP server on
loopback (slow enough for the first kill to land mid-generation), the student the tiny test model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from jobs.common.runs import part_files, read_dataset, read_json
from shared import cotd, cotd_start
from test_http_teacher import TeacherServer

pytestmark = pytest.mark.integration
PROBLEMS = 40


def start(cfg: Path, log: Path) -> subprocess.Popen:
    return cotd_start("run", str(cfg), log=log.open("w"), group=True)


def kill_when(proc: subprocess.Popen, ready, what: str, run: Path, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.1)
    assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before it could be killed {what}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(["pkill", "-9", "-f", str(run)], check=False)


def test_a_run_killed_in_generation_and_in_training_finishes_with_nothing_lost(tmp_path, tiny_model):
    server = TeacherServer()
    server.failed_once, server.delay = True, 0.3
    threading.Thread(target=server.serve_forever, daemon=True).start()
    run = tmp_path / "run"
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"question": f"Calculate {a} + {a % 7}.", "answer": str(a + a % 7)}) + "\n"
                                for a in range(PROBLEMS)))
    files = {
        "generate": {"out_dir": "unused", "sources": [{"type": "jsonl", "path": str(problems), "category": "math"}],
                     "paths_per_problem": 1, "write_rows": 1,
                     "teacher": {"backend": "openai", "model": "served-teacher", "batch_size": 1,
                                 "base_url": f"http://127.0.0.1:{server.server_address[1]}/v1"},
                     "sampling": {"max_tokens": 48}, "prompt": {"few_shot": 0}},
        "curate": {"chains": "unused", "out_dir": "unused", "structure": {"min_steps": 1}, "correctness": {"mode": "gold"},
                   "judge": {"enabled": False}, "mix": {"ratio": 0}, "val_fraction": 0.1},
        "train": {"data": "unused", "out_dir": "unused", "model": str(tiny_model), "precision": "fp32", "max_seq_len": 256,
                  "micro_batch_size": 2, "grad_accum": 1, "lr": 3e-3, "warmup_steps": 1, "epochs": 3, "eval_every": 4,
                  "save_every": 2, "max_failures": 0, "scaling": {"num_workers": 2}, "lora": {"dropout": 0.0}},
    }
    for name, data in files.items():
        (tmp_path / f"{name}.yaml").write_text(json.dumps(data))
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(json.dumps({"out_dir": str(run), "eval": None,
                               **{name: str(tmp_path / f"{name}.yaml") for name in files}}))
    try:
        # 1. killed while the teacher writes chains
        first = start(cfg, tmp_path / "first.log")
        kill_when(first, lambda: len(part_files(run / "generate" / "chains")) >= 3, "in generation", run)

        def keys():
            t = read_dataset(run / "generate" / "chains", columns=["problem_id", "path_index"])
            return list(zip(t.column("problem_id").to_pylist(), t.column("path_index").to_pylist()))

        saved = len(keys())
        assert 3 <= saved < PROBLEMS, f"the kill should land mid-generation; {saved} of {PROBLEMS} chains were saved"
        assert not (run / "curated").exists()

        # 2. run again, killed while the student trains (after its first checkpoint)
        server.delay = 0.0
        second = start(cfg, tmp_path / "second.log")
        snapshot = run / "student" / "checkpoints" / "train" / "checkpoint_manager_snapshot.json"
        kill_when(second, lambda: snapshot.is_file() and "step-" in snapshot.read_text(), "in training", run)
        log2 = (tmp_path / "second.log").read_text()
        assert f"{PROBLEMS - saved} to generate" in log2, log2[-3000:]
        assert not (run / "student" / "manifest.json").exists()
        curated_at = read_json(run / "curated" / "manifest.json")["finished_at"]

        # 3. run again: generation has nothing to do, curation is up to date, training resumes
        done = cotd("run", str(cfg))
    finally:
        server.shutdown()
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "0 to generate" in out and "curate: " in out and "up to date" in out, out[-3000:]
    ks = keys()
    assert len(ks) == PROBLEMS and len(set(ks)) == PROBLEMS
    assert read_json(run / "curated" / "manifest.json")["finished_at"] == curated_at
    train = read_json(run / "student" / "manifest.json")
    assert len(train["resumed_at_steps"]) == 1 and train["resumed_at_steps"][0] >= 2
    assert (run / "student" / "adapter").is_dir() and (run / "summary.md").is_file()
    manifest = read_json(run / "manifest.json")
    assert set(manifest["stages"]) == {"generate", "curate", "train"}
