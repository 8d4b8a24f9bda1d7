"""The evaluate stage for real: the session's tiny LoRA student, its base (on one vLLM engine with
the adapter) and a teacher, on reasoning-gym suites checked disjoint from the training data;
report files that parse, and report.json's numbers recounted from the saved predictions."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from jobs.common.config import ConfigError, build
from jobs.common.errors import DataError
from jobs.common.runs import read_dataset
from jobs.evaluate.config import EvalConfig
from jobs.evaluate.main import main

pytestmark = pytest.mark.integration

SUITES = [
    {"name": "held", "kind": "held_out", "sources": [{"type": "reasoning_gym", "tasks": [
        {"name": "basic_arithmetic", "size": 3, "seed": 901}, {"name": "syllogism", "size": 2, "seed": 901}]}]},
    {"name": "general", "kind": "general", "sources": [{"type": "reasoning_gym", "tasks": [
        {"name": "letter_counting", "size": 2, "seed": 901, "category": "general"}]}]},
    {"name": "reworded", "kind": "shifted", "sources": [{"type": "reasoning_gym", "tasks": [
        {"name": "basic_arithmetic", "size": 2, "seed": 902, "config": {"format_style": "natural"}}]}]},
]


def config(out, student, teacher, **over) -> EvalConfig:
    data = {"out_dir": str(out), "student": student and str(student), "suites": SUITES, "samples": 2,
            "teacher": teacher and {"model": str(teacher), "gpu_memory_utilization": 0.1, "max_model_len": 1024,
                                    "batch_size": 8},
            "teacher_prompt": {"few_shot": 1},  # prompted as in generation, with an exemplar
            "engine": {"gpu_memory_utilization": 0.1, "max_model_len": 1024, "batch_size": 8},
            "sampling": {"max_tokens": 24, "temperature": 0.9}, "bootstrap": {"samples": 200},
            "prices": {"teacher": {"per_hour": 2.0}, "student": {"input_per_million": 0.1, "output_per_million": 0.4}}}
    data.update(over)
    return build(EvalConfig, data)


def test_eval_reports_teacher_base_and_student_with_intervals(tmp_path, lora_run, tiny_model, ray_session, monkeypatch):
    student_dir, _, _ = lora_run
    out = tmp_path / "eval"
    lines: list[str] = []
    manifest = main(config(out, student_dir, tiny_model, lora_student="adapter"), log=lines.append)

    # models on one engine share it: the teacher here is the base model under its own prompt, and
    # the LoRA student rides on the base's engine, so one engine run serves all three
    runs = [line for line in lines if line.startswith("[eval ") and "%)" in line and "/" in line]
    assert {line.split("]")[0] for line in runs} == {"[eval teacher+base+student"}, runs
    preds = read_dataset(out / "predictions").to_pylist()
    n_problems = 5 + 2 + 2
    assert len(preds) == 3 * n_problems * 3  # three models, greedy and two samples each
    assert {p["status"] for p in preds} <= {"ok", "unparsed"}
    assert all(p["mean_logprob"] is not None and p["mean_logprob"] <= 0 for p in preds if p["output_tokens"])
    by = {(p["target"], p["suite"], p["problem_id"], p["sample_index"]): p for p in preds}
    # the adapter is served: the student's greedy answers are not all its base's
    differ = [k for k in by if k[0] == "student" and k[3] == 0
              and by[k]["output"] != by[("base",) + k[1:]]["output"]]
    assert differ
    assert all(p["temperature"] == 0 for p in preds if p["sample_index"] == 0)

    # the base model's answers on the shared engine are its own: the same as from an engine without
    # the adapter (vLLM's CPU build applies a batch's LoRA weights to base requests beside them).
    # Beside it, the same student as lora_student auto runs it on CPU: its merged model, on an engine of its own
    base_prompt = next(m["prompt"] for m in manifest["models"] if m["name"] == "base")
    lines = []
    alone = main(config(tmp_path / "alone", None, None, samples=1, sampled=["merged"], seed=1,
                        suites=SUITES[:1], prices={},
                        models=[{"name": "alone", "model": {"model": str(tiny_model), "gpu_memory_utilization": 0.1,
                                                            "max_model_len": 1024, "batch_size": 8},
                                 "prompt": base_prompt},
                                {"name": "merged", "role": "student", "run": str(student_dir)}]), log=lines.append)
    assert {m["name"]: m["adapter"] for m in alone["models"]} == {"alone": None, "merged": None}
    merged = next(m for m in alone["models"] if m["name"] == "merged")
    assert merged["identity"].startswith(str(student_dir / "merged"))
    assert {line.split("]")[0] for line in lines if line.startswith("[eval ") and "%)" in line} == {"[eval alone", "[eval merged"}
    got = read_dataset(tmp_path / "alone" / "predictions").to_pylist()
    own = {p["problem_id"]: p["output"] for p in got if p["target"] == "alone"}
    shared = {k[2]: by[k]["output"] for k in by if k[0] == "base" and k[1] == "held" and k[3] == 0}
    assert shared == own
    # `sampled` names the models that get the k samples: the merged student alone here
    assert sorted(p["sample_index"] for p in got if p["target"] == "merged") == [0] * 5 + [1] * 5
    assert {p["sample_index"] for p in got if p["target"] == "alone"} == {0}
    assert any("15 answers" in line for line in lines), lines

    # the report files exist and parse; every accuracy recounts from the saved predictions
    report = json.loads((out / "report.json").read_text())
    for name in ("teacher", "base", "student"):
        for suite in ("held", "general", "reworded"):
            greedy = [p for p in preds if p["target"] == name and p["suite"] == suite and p["sample_index"] == 0]
            got = report["models"][name]["suites"][suite]["overall"]
            assert (got["n"], got["correct"]) == (len(greedy), sum(bool(p["correct"]) for p in greedy))
            assert got["format_failures"] == sum(bool(p["format_failure"]) for p in greedy)
    assert set(report["comparisons"]["held"]) == {"recovery", "gain_over_base"}
    assert "general" in report["forgetting"] and "reworded" in report["template_gap"]
    assert {"agreement", "logprob"} <= set(report["calibration"])
    assert report["cost"]["teacher"]["engine_seconds_per_query"] > 0 and report["cost"]["student"]["per_1k_queries"] > 0
    items = pq.read_table(out / "items").to_pylist()
    assert len(items) == 3 * n_problems and all(i["samples"] == 2 for i in items)
    md = (out / "report.md").read_text()
    assert "## Suite `held` (held_out)" in md and "| student |" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3
    assert manifest["stage"] == "evaluate" and manifest["summary"]["accuracy"]["student"]["held"] is not None
    assert any(line.startswith("report: ") for line in lines)

    # the same evaluation again: every answer is in the cache, no engine starts
    from jobs.common import batch

    monkeypatch.setattr(batch, "run_llm", lambda *a, **k: pytest.fail("an engine started with nothing to evaluate"))
    lines = []
    again = main(config(out, student_dir, tiny_model, lora_student="adapter"), log=lines.append)
    assert any("; 0 to generate" in line for line in lines), lines
    assert again["summary"]["accuracy"] == manifest["summary"]["accuracy"]


def test_sampled_must_name_the_evaluated_models(tmp_path, lora_run, tiny_model):
    student_dir, _, _ = lora_run
    with pytest.raises(ConfigError, match=r"sampled: no model named studnet; the models are teacher, base, student"):
        main(config(tmp_path / "eval", student_dir, tiny_model, sampled=["studnet"]), log=lambda *_: None)
    assert not (tmp_path / "eval").exists()


def test_a_suite_overlapping_the_training_data_is_refused(tmp_path, lora_run, tiny_model, curated):
    """The curated set's questions are the student's training data: a suite that asks one of them
    again is refused before anything runs, naming the suite and the problem."""
    student_dir, _, _ = lora_run
    first = json.loads(pq.read_table(curated / "train").column("messages")[0].as_py())
    leak = tmp_path / "leak.jsonl"
    leak.write_text(json.dumps({"question": first[1]["content"].upper() + "  ", "answer": "1"}) + "\n"
                    + json.dumps({"question": "A fresh question?", "answer": "2"}) + "\n")
    suites = [{"name": "leaky", "sources": [{"type": "jsonl", "path": str(leak), "category": "math"}]}]
    with pytest.raises(DataError, match=r"suite 'leaky': 1 of 2 problems are in the training data"):
        main(config(tmp_path / "eval", student_dir, tiny_model, suites=suites), log=lambda *_: None)
    assert not (tmp_path / "eval").exists()
