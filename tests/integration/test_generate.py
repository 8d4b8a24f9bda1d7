"""The generate stage for real: Ray Data + vLLM on CPU with a tiny model, resume after interruption,
and bad input refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.common.config import build
from jobs.common.batch import build_llm
from jobs.common.engine import ModelConfig, SamplingConfig
from jobs.common.runs import read_dataset
from jobs.generate.config import GenerateConfig
from jobs.generate.main import main
from jobs.common.schemas import CHAIN_SCHEMA
from shared import cotd, dotted

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
    return build(GenerateConfig, dotted(data, over))


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
    res = cotd("generate", "--config", str(REPO / "configs/generate/quickstart.yaml"), f"out_dir={out}",
              override.replace("BAD", str(bad)))
    assert res.returncode == 2
    assert message in res.stderr and res.stderr.startswith("cotd: error:")
    assert not out.exists()


def test_engine_computes_per_step_metrics_only_when_asked(ray_session, tiny_model):
    """An offline vllm.LLM computes no per-step statistics; ray.data.llm's engine does unless told
    not to, and exports them to Ray's Prometheus endpoint, which `engine_metrics` turns back on."""
    for wanted in (False, True):
        proc = build_llm(ModelConfig(model="tiny", engine_metrics=wanted), SamplingConfig(), str(tiny_model)).config
        assert proc.log_engine_metrics is wanted and proc.engine_kwargs["disable_log_stats"] is not wanted



def test_cpu_replicas_get_the_binding_in_their_environment(ray_session, tiny_model, monkeypatch):
    """The engine's process reads vLLM's binding settings from its environment: the processor's
    runtime_env carries them (none on GPU replicas)."""
    import jobs.common.engine as engine

    monkeypatch.setattr(engine, "physical_cores", lambda: 2)
    proc = build_llm(ModelConfig(model="tiny"), SamplingConfig(), str(tiny_model)).config
    assert proc.runtime_env == {"env_vars": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}}
    proc = build_llm(ModelConfig(model="tiny", cpu_binding="vllm"), SamplingConfig(), str(tiny_model)).config
    assert not proc.runtime_env
