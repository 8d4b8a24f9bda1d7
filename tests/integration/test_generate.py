"""The generate stage for real: Ray Data + vLLM on CPU with a tiny model, resume after interruption,
and bad input refused before anything is written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.common.config import build
from jobs.common.llm import LLMConfig, SamplingConfig, build_llm
from jobs.common.runs import part_files, read_dataset
from jobs.generate.config import GenerateConfig
from jobs.generate.main import main
from jobs.generate.schema import CHAIN_SCHEMA

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
TEST_KV = 0.1  # on CPU, the share of RAM vLLM reserves (and zeroes) for its memory and KV cache: plenty here

MIX = [{"type": "reasoning_gym", "tasks": [
    {"name": "basic_arithmetic", "size": 3, "seed": 2},     # math
    {"name": "calendar_arithmetic", "size": 2, "seed": 2},  # temporal
    {"name": "syllogism", "size": 2, "seed": 2},            # logic
]}]


def config(out_dir, model, **over):
    data = {"out_dir": str(out_dir), "sources": MIX, "paths_per_problem": 2, "write_rows": 4,
            "teacher": {"model": str(model), "max_model_len": 2048, "batch_size": 8, "gpu_memory_utilization": TEST_KV},
            "sampling": {"max_tokens": 24}, "prompt": {"few_shot": 1}}
    for key, value in over.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return build(GenerateConfig, data)


def keys(run_dir):
    t = read_dataset(Path(run_dir) / "chains", columns=["problem_id", "path_index"])
    return list(zip(t.column("problem_id").to_pylist(), t.column("path_index").to_pylist()))


def test_generate_writes_graded_chains_and_manifest(tmp_path, tiny_model, ray_session):
    # one problem too long for the engine: its rows must fail alone, with the engine's reason
    long_file = tmp_path / "long.jsonl"
    long_file.write_text(json.dumps({"question": "Add these up: " + " + ".join(["7"] * 3000), "answer": "21000"}) + "\n")
    sources = MIX + [{"type": "jsonl", "path": str(long_file), "category": "stress"}]
    lines = []
    manifest = main(config(tmp_path / "run", tiny_model, sources=sources), log=lines.append)

    table = pq.read_table(tmp_path / "run" / "chains")
    assert table.schema.equals(CHAIN_SCHEMA)
    rows = table.to_pylist()
    assert len(rows) == 16 and len(set(keys(tmp_path / "run"))) == 16
    failed = [r for r in rows if r["category"] == "stress"]
    rows = [r for r in rows if r["category"] != "stress"]
    assert [r["status"] for r in failed] == ["error", "error"]
    assert all("max_model_len" in r["error"] or "maximum" in r["error"] or "longer" in r["error"] for r in failed), failed[0]["error"]
    assert {r["category"] for r in rows} == {"math", "temporal", "logic"}
    assert {r["path_index"] for r in rows} == {0, 1}
    for r in rows:
        assert r["status"] in ("ok", "unparsed") and r["error"] == ""   # random weights rarely answer
        assert r["prompt"].startswith("<|im_start|>system") and r["question"] in r["prompt"]
        assert 0 < r["output_tokens"] <= 24 and r["prompt_tokens"] > 0
        assert r["correct"] is not None and r["gold_answer"]
        assert r["teacher_model"] == str(tiny_model) and r["format"] == "pre" and len(r["exemplar_ids"]) == 1
    # the two paths of a problem are sampled independently
    by_problem = {}
    for r in rows:
        by_problem.setdefault(r["problem_id"], set()).add(r["chain"])
    assert sum(len(c) == 2 for c in by_problem.values()) >= len(by_problem) - 1

    on_disk = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert on_disk["summary"] == manifest["summary"]
    assert on_disk["summary"]["chains"] == 16 and on_disk["summary"]["duplicates"] == 0
    assert on_disk["summary"]["status"]["error"] == 2
    assert set(on_disk["summary"]["by_category"]) == {"math", "temporal", "logic", "stress"}
    assert on_disk["last_attempt"]["rows"] == 16 and on_disk["last_attempt"]["tokens_per_s"] > 0
    assert on_disk["config"]["paths_per_problem"] == 2
    assert any(line.startswith("[generate] 16/16") for line in lines)  # progress
    assert any("accuracy" in line for line in lines)                  # summary table


def test_resume_fills_only_what_is_missing_and_refuses_a_different_setup(tmp_path, tiny_model, ray_session, monkeypatch):
    """Three engine runs in all: the first run, a resume that fills a lost part and a third path per
    problem at once, and an overwrite; the no-op and the refusal start no engine."""
    from jobs.common import raycluster
    from jobs.common.config import ConfigError

    run = tmp_path / "run"
    main(config(run, tiny_model), log=lambda *_: None)
    first = {p.name: p.stat().st_mtime_ns for p in part_files(run / "chains")}

    # a crash: one part lost, a half-written temporary file left behind
    lost = sorted(first)[1]
    lost_keys = set(zip(*(pq.read_table(run / "chains" / lost).column(c).to_pylist() for c in ("problem_id", "path_index"))))
    assert lost_keys and all(path < 2 for _, path in lost_keys)
    (run / "chains" / lost).unlink()
    (run / "chains" / ".part-crashed-00009.parquet.tmp").write_bytes(b"PAR1 half")

    # resumed with more paths per problem: the lost chains and the 7 new paths, nothing else
    lines = []
    manifest = main(config(run, tiny_model, paths_per_problem=3), log=lines.append)
    assert any(f"{21 - len(lost_keys) - 7} already in" in line and f"{len(lost_keys) + 7} to generate" in line
               for line in lines), lines
    assert not list((run / "chains").glob(".*.tmp"))
    ks = keys(run)
    assert len(ks) == 21 and len(set(ks)) == 21 and lost_keys <= set(ks)
    # untouched parts were neither rewritten nor duplicated
    assert all((run / "chains" / name).stat().st_mtime_ns == t for name, t in first.items() if name != lost)
    assert manifest["last_attempt"]["rows"] == len(lost_keys) + 7

    # the same command once more: nothing to do, nothing duplicated; and neither Ray nor the
    # tokenizer is started, nor, for the refusal below, before refusing
    with monkeypatch.context() as m:
        m.setattr(raycluster, "init_ray_while", lambda *a, **k: pytest.fail("started Ray with nothing to generate"))
        manifest = main(config(run, tiny_model, paths_per_problem=3), log=lambda *_: None)
        assert manifest["last_attempt"]["rows"] == 0 and len(keys(run)) == 21

        # other sampling settings would mix two setups in one dataset: refused, the run left as it is
        with pytest.raises(ConfigError, match="different sampling"):
            main(config(run, tiny_model, paths_per_problem=3, **{"sampling.temperature": 0.3}), log=lambda *_: None)
        assert len(keys(run)) == 21
    # unless the user asks to start over
    manifest = main(config(run, tiny_model, overwrite=True, **{"sampling.temperature": 0.3,
                    "sources": [{"type": "reasoning_gym", "tasks": [{"name": "chain_sum", "size": 1}]}]}),
                    log=lambda *_: None)
    assert manifest["summary"]["chains"] == 2 and len(keys(run)) == 2


def cli(*args, timeout=600, **kw):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


def test_killed_run_resumes_without_loss_or_duplicates(tmp_path, tiny_model):
    """SIGKILL the whole job (driver, Ray, engine) mid-run, then run the same command again."""
    run = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({
        "out_dir": str(run), "sources": MIX, "paths_per_problem": 2, "write_rows": 1,
        "teacher": {"model": str(tiny_model), "batch_size": 1, "max_concurrent_batches": 1,
                    "gpu_memory_utilization": TEST_KV},
        "sampling": {"max_tokens": 48}, "prompt": {"few_shot": 1}}))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "generate", "--config", str(cfg)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(part_files(run / "chains")) < 3 and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(["pkill", "-9", "-f", f"{run}"], check=False)
    saved = len(keys(run))
    assert 3 <= saved < 14, f"the kill should land mid-run; {saved} of 14 chains were saved"

    done = cli("generate", "--config", str(cfg))
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{14 - saved} to generate" in done.stdout
    ks = keys(run)
    assert len(ks) == 14 and len(set(ks)) == 14


@pytest.mark.parametrize("setup, override, message", [
    ("bad_jsonl", "sources=[{type: jsonl, path: BAD}]", ":2: not valid JSON"),
    ("missing_field", "sources=[{type: jsonl, path: BAD}]", ":1: missing field 'question'"),
    (None, "sources=[{type: reasoning_gym, tasks: [{name: no_such_task}]}]", "unknown reasoning-gym task 'no_such_task'"),
    (None, "teacher.model=no-such-model", "model 'no-such-model': not a folder, not a packaged model"),
    (None, "paths_per_problem=0", "paths_per_problem must be >= 1"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, setup, override, message):
    bad = tmp_path / "bad.jsonl"
    if setup == "bad_jsonl":
        bad.write_text('{"question": "q", "answer": "1"}\n{"question": oops}\n')
    elif setup == "missing_field":
        bad.write_text('{"prompt": "q", "answer": "1"}\n')
    out = tmp_path / "out"
    res = cli("generate", "--config", str(REPO / "configs/generate/quickstart.yaml"), f"out_dir={out}",
              override.replace("BAD", str(bad)))
    assert res.returncode == 2
    assert message in res.stderr and res.stderr.startswith("cotd: error:")
    assert not out.exists()


def test_engine_computes_per_step_metrics_only_when_asked(ray_session, tiny_model):
    """An offline vllm.LLM computes no per-step statistics; ray.data.llm's engine does unless told
    not to, and exports them to Ray's Prometheus endpoint, which `engine_metrics` turns back on."""
    for wanted in (False, True):
        proc = build_llm(LLMConfig(model="tiny", engine_metrics=wanted), SamplingConfig(), str(tiny_model)).config
        assert proc.log_engine_metrics is wanted and proc.engine_kwargs["disable_log_stats"] is not wanted

