"""The file contract between stages (jobs.common.schemas): what generate writes is exactly what
curate reads, what curate writes is exactly what train reads. Each writer's rows are built by the
stage's own functions and written as the stage writes them; each reader is the stage's own check
and loader."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.common.config import build
from jobs.common.errors import DataError
from jobs.common.runs import PartWriter, check_dataset, part_files
from jobs.common.schemas import (ACCURACY_READS, CHAIN_SCHEMA, CURATE_READS, DECISION_SCHEMA, EXAMPLE_SCHEMA,
                                 JUDGEMENT_SCHEMA, KINDS, METRIC_FIELDS, STATUSES, TRAIN_READS, columns)
from jobs.curate.config import CurateConfig
from jobs.curate.examples import general_examples
from jobs.curate.judge import finish_judgements, plan_judge_rows
from jobs.curate.main import check_chains
from jobs.curate.pipeline import DECIDED_SCHEMA, decide_group, screen_group
from jobs.formats.prompts import load_exemplars
from jobs.generate.config import GenerateConfig
from jobs.generate.pipeline import finish_rows, plan_rows
from jobs.tasks.sources import load_problems
from jobs.train.accuracy import accuracy_sample
from jobs.train.main import check_data

GEN = build(GenerateConfig, {"out_dir": "-", "teacher": {"model": "m"}, "paths_per_problem": 2, "sources": [
    {"type": "reasoning_gym", "tasks": [{"name": "basic_arithmetic", "size": 3, "seed": 4}]}]})


def generated_chains(folder):
    """Chains as generate writes them: planned rows, engine outputs, finish_rows, PartWriter."""
    rows = plan_rows(load_problems(GEN.sources), GEN, load_exemplars(), tokenizer=None)
    outputs = []
    for r in rows:
        gold = r["gold_answer"]
        text = f"Step 1: Work it out.\nStep 2: Check it.\nAnswer: {gold if r['path_index'] == 0 else 'none'}"
        outputs.append(r | {"generated_text": text, "num_generated_tokens": 12, "num_input_tokens": 40,
                            "time_taken_llm": 0.5})
    outputs[-1] |= {"__inference_error__": "engine died", "generated_text": None}
    chains = finish_rows(outputs, max_tokens=64)
    assert all(set(c) == set(CHAIN_SCHEMA.names) for c in chains)  # exactly the schema, nothing more or less
    assert {c["status"] for c in chains} <= set(STATUSES)
    PartWriter(folder, CHAIN_SCHEMA).write(pa.Table.from_pylist(chains, schema=CHAIN_SCHEMA))
    return chains


def test_what_generate_writes_is_what_curate_reads(tmp_path):
    chains = generated_chains(tmp_path / "run" / "chains")
    folder, files, rows, teacher = check_chains(str(tmp_path / "run"), tmp_path / "curated")
    assert folder == tmp_path / "run" / "chains" and teacher == "m" and rows == len(chains)
    table = pq.read_table(files, columns=list(CURATE_READS))
    cfg = build(CurateConfig, {"chains": str(folder), "out_dir": str(tmp_path / "curated")})
    by_problem = {}
    for r in table.to_pylist():
        by_problem.setdefault(r["problem_id"], []).append(r)
    for rows in by_problem.values():
        group = pa.Table.from_pylist(rows, schema=table.schema)
        candidates = screen_group(group, cfg).to_pylist()
        judged = finish_judgements([r | {"generated_text": "Structure: 8/10\nClarity: 7/10\nConfidence: 9/10\n"
                                                            "Justification: Sound.", "num_generated_tokens": 20}
                                    for r in plan_judge_rows(candidates, None, "m")], max_tokens=64)
        assert all(set(j) == set(JUDGEMENT_SCHEMA.names) for j in judged)
        decided = decide_group(group, cfg, {(j["problem_id"], j["path_index"]): j for j in judged}, set())
        assert decided.schema.equals(DECIDED_SCHEMA)
        assert set(DECISION_SCHEMA.names) <= set(decided.schema.names)
    assert len(chains) == 6


def test_a_dataset_without_the_columns_a_reader_needs_is_refused(tmp_path):
    partial = pa.schema([f for f in CHAIN_SCHEMA if f.name not in ("chain", "steps")])
    PartWriter(tmp_path / "chains", partial).write(pa.Table.from_pylist([], schema=partial))
    with pytest.raises(DataError, match=r"chains: .* lacks column\(s\) chain, steps"):
        check_chains(str(tmp_path / "chains"), tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"data: .*empty holds no part-\*.parquet files \(has `cotd curate` written any"):
        check_dataset(tmp_path / "empty", ["x"], "data", "cotd curate")


def curated_examples(root, decided_rows):
    """Examples as curate writes them: the kept chains' examples riding on decisions, general data,
    one PartWriter per split."""
    found = [json.loads(d[col]) for d in decided_rows for col in ("example", "self_eval") if d[col]]
    problems = load_problems(build(CurateConfig, {"chains": "-", "out_dir": "-"}).mix.sources)[:3]
    rows = found + general_examples(problems, 3, seed=0)
    assert rows and all(set(r) == set(EXAMPLE_SCHEMA.names) for r in rows)  # exactly the schema
    assert {r["kind"] for r in rows} <= set(KINDS)
    for split in ("train", "val"):
        PartWriter(root / split, EXAMPLE_SCHEMA).write(pa.Table.from_pylist(rows, schema=EXAMPLE_SCHEMA))
    return rows


def test_what_curate_writes_is_what_train_reads(tmp_path, tokenizer):
    generated_chains(tmp_path / "chains")
    table = pq.read_table(part_files(tmp_path / "chains"), columns=list(CURATE_READS))
    cfg = build(CurateConfig, {"chains": "-", "out_dir": "-", "judge": {"enabled": False}})
    decided = decide_group(table, cfg, None, set()).to_pylist()
    rows = curated_examples(tmp_path / "curated", decided)
    train, val = check_data(str(tmp_path / "curated"))
    assert train and val and set(TRAIN_READS) <= set(pq.read_schema(train[0]).names)
    sample = accuracy_sample(val, 10, seed=0, tokenizer=tokenizer)
    assert sample and all(s["prompt_ids"] for s in sample)
    from jobs.train.data import tokenize_example

    ids, labels, _ = tokenize_example(json.loads(rows[0]["messages"]), tokenizer, 1024)
    assert any(lab != -100 for lab in labels) and len(ids) == len(labels)


def test_reader_columns_are_declared_from_the_schemas():
    assert set(CURATE_READS) <= set(CHAIN_SCHEMA.names)
    assert set(TRAIN_READS) | set(ACCURACY_READS) <= set(EXAMPLE_SCHEMA.names)
    with pytest.raises(AssertionError, match="not in the schema"):
        columns(CHAIN_SCHEMA, ("problem_id", "no_such_column"))
    assert {"step", "loss", "val_loss"} <= set(METRIC_FIELDS)


def test_docs_document_every_column_and_metric():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "schema.md").read_text()
    from jobs.common.schemas import ITEM_SCHEMA, PREDICTION_SCHEMA

    for schema in (CHAIN_SCHEMA, JUDGEMENT_SCHEMA, EXAMPLE_SCHEMA, DECISION_SCHEMA, PREDICTION_SCHEMA, ITEM_SCHEMA):
        missing = [n for n in schema.names if f"`{n}`" not in doc]
        assert not missing, f"docs/schema.md does not document {missing}"
    assert not [k for k in METRIC_FIELDS if f"`{k}`" not in doc]


def test_the_shuffle_has_a_partition_per_20k_chains_however_many_files_hold_them(tmp_path, monkeypatch):
    """Many small part files (write_rows=1) are few chains: one partition, not one per 8 files."""
    import jobs.curate.main as curate

    for _ in range(40):  # 40 part files of 6 chains
        generated_chains(tmp_path / "run" / "chains")
    _, files, rows, _ = curate.check_chains(str(tmp_path / "run"), tmp_path / "curated")
    assert len(files) == 40 and rows == 240 and curate.shuffle_partitions(rows) == 1
    monkeypatch.setattr(curate, "ROWS_PER_PARTITION", 100)
    assert curate.shuffle_partitions(rows) == 3
    monkeypatch.setattr(curate, "ROWS_PER_PARTITION", 1)
    assert curate.shuffle_partitions(rows) == 64
