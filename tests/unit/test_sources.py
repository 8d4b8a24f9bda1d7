"""Problem sources: reasoning-gym, JSONL and Parquet files; bad input names file, line and field."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.common.config import build
from jobs.tasks.sources import (FileSource, GymSource, GymTask, SourceError, gym_category, load_problems)


def gym(*tasks):
    return GymSource(type="reasoning_gym", tasks=[GymTask(**t) for t in tasks])


def test_gym_problems_are_stable_categorized_and_verifiable():
    src = gym({"name": "chain_sum", "size": 3, "seed": 5}, {"name": "calendar_arithmetic", "size": 2},
              {"name": "syllogism", "size": 2, "difficulty": "easy"})
    a, b = load_problems([src]), load_problems([src])
    assert [p.id for p in a] == [p.id for p in b] and len({p.id for p in a}) == 7
    assert [p.category for p in a] == ["math"] * 3 + ["temporal"] * 2 + ["logic"] * 2
    assert all(p.answer and p.verifier.startswith("rg:") and json.loads(p.metadata)["answer"] for p in a)
    assert a[-1].difficulty == "easy"


def test_gym_config_changes_the_problems_and_their_ids():
    plain = load_problems([gym({"name": "basic_arithmetic", "size": 2})])
    harder = load_problems([gym({"name": "basic_arithmetic", "size": 2, "config": {"min_terms": 5, "max_terms": 6}})])
    assert {p.id for p in plain}.isdisjoint({p.id for p in harder})


def test_gym_categories():
    assert gym_category("gsm_symbolic") == "math"
    assert gym_category("time_intervals") == "temporal"
    assert gym_category("knights_knaves") == "logic"


def test_unknown_task_and_bad_task_config():
    with pytest.raises(SourceError, match="unknown reasoning-gym task 'chain_summ'.*did you mean chain_sum"):
        load_problems([gym({"name": "chain_summ"})])
    with pytest.raises(SourceError, match="bad config"):
        load_problems([gym({"name": "chain_sum", "config": {"no_such_knob": 1}})])


def jsonl_source(path, **kw):
    return build(FileSource, {"type": "jsonl", "path": str(path), **kw})


def test_jsonl_with_field_mapping(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"q": "What is 2+3?", "a": "5", "uid": "x1", "topic": "math", "level": "easy", "note": "n"},
        {"q": "What is 1/2 + 1/2?", "a": "1", "uid": "x2", "topic": "math", "level": "hard"},
    ]) + "\n\n")
    probs = load_problems([jsonl_source(f, fields={"question": "q", "answer": "a", "id": "uid",
                                                   "category": "topic", "difficulty": "level"})])
    assert [(p.id, p.answer, p.category, p.difficulty, p.verifier) for p in probs] == [
        ("x1", "5", "math", "easy", "math"), ("x2", "1", "math", "hard", "math")]
    assert json.loads(probs[0].metadata) == {"topic": "math", "level": "easy", "note": "n"}


def test_jsonl_without_gold_answers_gets_derived_ids(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"question": "Why?"}\n{"question": "How?"}\n')
    probs = load_problems([jsonl_source(f, fields={"answer": None}, category="commonsense")])
    assert all(p.answer is None and p.verifier == "math" and p.category == "commonsense" for p in probs)
    assert len({p.id for p in probs}) == 2 and probs[0].id == load_problems([jsonl_source(f, fields={"answer": None})])[0].id


@pytest.mark.parametrize("content, message", [
    ('{"question": "a", "answer": "1"}\n{"question": "b", "answer": \n', r"p.jsonl:2: not valid JSON"),
    ('{"question": "a", "answer": "1"}\n{"answer": "2"}\n', r"p.jsonl:2: missing field 'question'"),
    ('["a", "b"]\n', r"p.jsonl:1: expected a JSON object"),
    ("", r"holds no problems"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, message):
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    with pytest.raises(SourceError, match=message):
        load_problems([jsonl_source(f)])


def test_parquet_source_and_duplicate_ids(tmp_path):
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"question": ["q1", "q2"], "answer": ["1", "2"], "id": ["a", "a"]}), f)
    src = build(FileSource, {"type": "parquet", "path": str(f), "verifier": "exact", "fields": {"id": "id"}})
    with pytest.raises(SourceError, match="problem id 'a' appears twice"):
        load_problems([src])
    ok = build(FileSource, {"type": "parquet", "path": str(f), "limit": 1})
    assert [p.question for p in load_problems([ok])] == ["q1"]


def test_missing_and_damaged_files(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        load_problems([jsonl_source(tmp_path / "absent.jsonl")])
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(SourceError, match="not a readable Parquet"):
        load_problems([build(FileSource, {"type": "parquet", "path": str(bad)})])
