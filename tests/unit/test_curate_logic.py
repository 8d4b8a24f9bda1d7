"""Curation's filters and transforms on crafted chain rows (no Ray, no model)."""

from __future__ import annotations

import json
import re
from collections import Counter

import pyarrow as pa
import pytest

from jobs.common.config import ConfigError, build
from jobs.curate.config import CorrectnessConfig, CurateConfig, ExampleConfig, JudgeConfig, StructureConfig
from jobs.curate.examples import general_examples, rationale_example, self_eval_example, val_ids
from jobs.curate.filters import (REASONS, answer_before_reasoning, correctness_reasons, duplicates, jaccard, judged_low,
                                 repeat_fraction, screen, select, shingles, structure_reason)
from jobs.curate.judge import finish_judgements, judge_messages, parse_judgement, render_judgement
from jobs.common.schemas import CURATE_READS
from jobs.curate.pipeline import decide_group, screen_group
from jobs.curate.report import markdown, plot, summarize
from jobs.formats.parse import parse_chain
from jobs.common.schemas import CHAIN_SCHEMA
from jobs.tasks.problem import Problem
from jobs.tasks.verify import is_correct

GOOD = ("Step 1: Add 3 and 4 to get 7.\nStep 2: Multiply 7 by 2 to get 14.\n"
        "Step 3: Subtract 4 from 14 to get 10.\nAnswer: 10")


def chain(text=GOOD, pid="p1", k=0, fmt="pre", gold="10", verifier="math", correct=None, status="ok",
          finish="stop", category="math", difficulty="default"):
    parsed = parse_chain(text or "", fmt)
    if correct is None and gold is not None and parsed.answer is not None:
        correct = is_correct(verifier, gold, "{}", parsed.answer)
    return {"problem_id": pid, "path_index": k, "category": category, "difficulty": difficulty,
            "question": f"What is (3 + 4) * 2 - 4? [{pid}]", "gold_answer": gold, "verifier": verifier if gold else "none",
            "metadata": "{}", "format": fmt, "chain": text, "finish_reason": finish, "steps": parsed.steps, "num_steps": len(parsed.steps),
            "answer": parsed.answer, "correct": correct if gold else None, "output_tokens": len((text or "").split()),
            "status": status if text is not None else "error"}


S = StructureConfig()


@pytest.mark.parametrize("row, reason", [
    (chain(text=None), "engine_error"),
    (chain(text="   \n "), "empty"),
    (chain(text="#### $$$ ((( ))) !!! ??? ### Answer: 1"), "garbage"),
    (chain(finish="length"), "truncated"),
    (chain(text="Step 1: Add 3 and 4 to get 7.\nStep 2: Then double it."), "no_answer"),
    (chain(text="Answer: 10\nStep 1: Add 3 and 4 to get 7.\nStep 2: Double it and take 4."), "answer_before_reasoning"),
    (chain(text="\n".join(f"Step {i}: add one more to the total." for i in range(1, 45)) + "\nAnswer: 44"), "too_many_steps"),
    (chain(text="Step 1: x\nAnswer: 1"), "too_short"),
    (chain(text="Step 1: " + "the value keeps growing and " * 30 + "\nStep 2: so it is ten.\nAnswer: 10"), "repetition"),
    (chain(), None),
])
def test_structure_reasons(row, reason):
    assert structure_reason(row, S) == reason


def test_structure_bounds_are_configurable():
    assert structure_reason(chain(), StructureConfig(min_steps=4)) == "too_few_steps"
    assert structure_reason(chain(), StructureConfig(max_chars=50)) == "too_long"
    assert structure_reason(chain(finish="length"), StructureConfig(drop_truncated=False)) is None


def test_post_format_may_state_the_answer_first():
    post = "Answer: 10\nReasoning:\nStep 1: Add 3 and 4 to get 7.\nStep 2: Double 7 and subtract 4."
    assert answer_before_reasoning(post)
    assert structure_reason(chain(text=post, fmt="post"), S) is None


def test_repeat_fraction_separates_loops_from_prose():
    assert repeat_fraction(GOOD) < 0.05
    assert repeat_fraction("and then again " * 40) > 0.9


def test_correctness_gold_consistency_and_off():
    rows = [chain(k=0), chain(k=1, text=GOOD.replace("Answer: 10", "Answer: 11"))]
    assert correctness_reasons(rows, CorrectnessConfig()) == [None, "incorrect"]
    assert correctness_reasons(rows, CorrectnessConfig(mode="off")) == [None, None]
    # no gold answer: majority of the paths decides
    nogold = [chain(k=i, gold=None, text=GOOD.replace("10", a)) for i, a in enumerate(["10", "10", "12"])]
    assert correctness_reasons(nogold, CorrectnessConfig()) == [None, None, "disagrees_with_majority"]
    assert correctness_reasons(nogold, CorrectnessConfig(mode="gold")) == ["no_gold"] * 3
    assert correctness_reasons(nogold, CorrectnessConfig(min_agreement=0.9)) == ["no_consensus"] * 3
    assert correctness_reasons(nogold[:1], CorrectnessConfig()) == ["no_consensus"]  # min_votes 2
    # equivalent answers vote together, by the problem's verifier (math here)
    forms = [chain(k=i, gold=None, verifier="math", text=GOOD.replace("Answer: 10", f"Answer: {a}"))
             for i, a in enumerate(["1/2", "0.5", "\\frac{1}{2}", "3"])]
    for r in forms:
        r["verifier"] = "math"
    assert correctness_reasons(forms, CorrectnessConfig()) == [None, None, None, "disagrees_with_majority"]
    # consistency mode ignores the gold answer even where there is one
    assert correctness_reasons(rows + [chain(k=2)], CorrectnessConfig(mode="consistency")) == [None, "disagrees_with_majority", None]


def test_duplicates_exact_near_and_distinct():
    a = GOOD
    exact = GOOD.replace("Step 1:", "STEP 1:").replace("\n", "  \n")
    near = GOOD.replace("to get 10", "which gives 10")
    other = "Step 1: Compute 3 + 4 = 7.\nStep 2: Then 7 * 2 = 14, minus 4 is 10.\nAnswer: 10"
    assert 0.6 < jaccard(shingles(a), shingles(near)) < 0.7
    assert duplicates([a, exact, near, other], 0.6) == [False, True, True, False]
    assert duplicates([a, exact, near, other], 0.8) == [False, True, False, False]
    assert duplicates([a, exact, near, other], 1.0) == [False, True, False, False]


def test_screen_gives_one_reason_in_order():
    rows = [chain(k=0), chain(k=1), chain(k=2, finish="length", text=GOOD.replace("10", "11")),
            chain(k=3, text=GOOD.replace("Answer: 10", "Answer: 11"))]
    reasons = screen(rows, S, CorrectnessConfig(), 0.8)
    # path 2 is both truncated and wrong: the structural reason comes first
    assert reasons == [None, "duplicate", "truncated", "incorrect"]
    assert set(reasons) - {None} <= set(REASONS)


def J(pid, k, score, status="ok"):
    return {"problem_id": pid, "path_index": k, "score": score, "status": status, "chain_sha": "x",
            "structure": score, "clarity": score, "confidence": score, "justification": "ok" if score else None}


def test_judged_low_threshold_and_exact_fraction():
    js = [J("a", 0, 3.0), J("a", 1, 7.0), J("b", 0, 5.0), J("b", 1, 5.0), J("c", 0, None, "unparsed")]
    assert judged_low(js, JudgeConfig(min_score=6)) == {("a", 0), ("b", 0), ("b", 1)}
    low = judged_low(js, JudgeConfig(rule="fraction", drop_fraction=0.5))
    assert low == {("a", 0), ("b", 0)}  # 2 of 4 readable; the tie breaks by key, deterministically
    assert judged_low(js, JudgeConfig(rule="fraction", drop_fraction=0.0)) == set()


def test_select_applies_judge_verdicts_and_path_cap():
    rows = [chain(k=k, text=GOOD + " " * k) for k in range(5)]
    js = {("p1", 0): J("p1", 0, 9.0), ("p1", 1): J("p1", 1, 2.0), ("p1", 2): J("p1", 2, None, "unparsed"),
          ("p1", 3): J("p1", 3, 7.0), ("p1", 4): J("p1", 4, 8.0)}
    low = judged_low(list(js.values()), JudgeConfig())
    reasons = select(rows, [None] * 5, js, low, JudgeConfig(), max_paths=2)
    assert reasons == [None, "judge_low", "judge_unparsed", "over_path_limit", None]
    kept_unparsed = select(rows, [None] * 5, js, low, JudgeConfig(unparsed="keep"), max_paths=5)
    assert kept_unparsed[2] is None
    missing = select(rows, [None] * 5, {}, set(), JudgeConfig(), max_paths=5)
    assert missing == ["judge_error"] * 5
    # no judge: only the cap, in path order
    assert select(rows, ["duplicate", None, None, None, None], None, set(), JudgeConfig(), 2) == \
        ["duplicate", None, None, "over_path_limit", "over_path_limit"]


def test_parse_and_render_judgement():
    text = "**Structure:** 8/10\nClarity: 6\nConfidence: 7\nJustification: Steps are in order."
    j = parse_judgement(text)
    assert (j["structure"], j["clarity"], j["confidence"], j["score"]) == (8, 6, 7, 7.0)
    assert parse_judgement(render_judgement(j)) == j
    assert parse_judgement("Structure: 8\nClarity: 6\nJustification: fine") is None     # a criterion missing
    assert parse_judgement("Structure: 11\nClarity: 6\nConfidence: 7\nJustification: x") is None  # out of range
    assert parse_judgement("Structure: 8\nClarity: 6\nConfidence: 7") is None          # no justification
    assert parse_judgement("I think it is good.") is None


def test_finish_judgements_statuses():
    base = {"problem_id": "p", "path_index": 0, "chain_sha": "s", "judge_model": "m", "prompt_messages": "[]"}
    rows = finish_judgements([
        {**base, "generated_text": "Structure: 9\nClarity: 9\nConfidence: 8\nJustification: ok", "num_generated_tokens": 20},
        {**base, "generated_text": "nice", "num_generated_tokens": 2},
        {**base, "__inference_error__": "prompt too long"},
    ], max_tokens=160)
    assert [r["status"] for r in rows] == ["ok", "unparsed", "error"]
    assert rows[0]["score"] == pytest.approx(26 / 3, abs=1e-3) and rows[2]["error"] == "prompt too long"


def test_val_split_is_deterministic_and_by_problem():
    ids = [f"p{i}" for i in range(40)]
    v = val_ids(ids, 0.1, seed=3)
    assert len(v) == 4 and v == val_ids(list(reversed(ids)), 0.1, seed=3)
    assert v != val_ids(ids, 0.1, seed=4)
    assert len(val_ids(ids[:5], 0.01, 0)) == 1        # at least one problem when asked for any
    assert val_ids(ids[:1], 0.5, 0) == set() and val_ids(ids, 0.0, 0) == set()


@pytest.mark.parametrize("fmt, granularity, steps", [("pre", "coarse", 3), ("pre", "fine", 5), ("post", 2, 2)])
def test_rationale_example_format_and_granularity(fmt, granularity, steps):
    text = "\n".join(f"Step {i}: fact number {i} about the sum." for i in range(1, 6)) + "\nAnswer: 10"
    ex = rationale_example(chain(text=text), ExampleConfig(format=fmt, granularity=granularity))
    messages = json.loads(ex["messages"])
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]  # zero-shot student prompt
    target = messages[-1]["content"]
    assert ex["num_steps"] == steps and target.count("Step ") == steps
    assert "fact number 5" in target and "fact number 1" in target  # merged, nothing lost
    assert target.startswith("Answer: 10") if fmt == "post" else target.endswith("Answer: 10")
    assert ex["format"] == fmt and ex["kind"] == "rationale"


def test_adaptive_format_follows_difficulty():
    cfg = ExampleConfig(format="adaptive")
    assert rationale_example(chain(difficulty="easy"), cfg)["format"] == "post"
    assert rationale_example(chain(difficulty="hard"), cfg)["format"] == "pre"


def test_self_eval_and_general_examples():
    j = parse_judgement("Structure: 8\nClarity: 6\nConfidence: 7\nJustification: Clear.")
    ex = self_eval_example(chain(), j)
    messages = json.loads(ex["messages"])
    assert messages[:-1] == judge_messages(chain()["question"], GOOD)
    assert parse_judgement(messages[-1]["content"])["score"] == j["score"]
    probs = [Problem(id=f"g{i}", question=f"Reverse word {i}", answer=f"{i}drow", category="general",
                     difficulty="default", source="t", verifier="exact", metadata="{}") for i in range(10)]
    picked = general_examples(probs, 4, seed=1)
    assert len(picked) == 4 and picked == general_examples(list(reversed(probs)), 4, seed=1)
    assert len(general_examples(probs, 50, seed=1)) == 10
    assert json.loads(picked[0]["messages"])[-1]["role"] == "assistant"
    assert (ex["gold_answer"], ex["verifier"]) == ("10", "math")  # examples carry their problem's answer check
    assert (picked[0]["verifier"], picked[0]["gold_answer"]) == ("exact", f"{picked[0]['problem_id'][1:]}drow")


def _table(rows):
    return pa.Table.from_pylist([{k: r.get(k) for k in CURATE_READS} for r in rows],
                                schema=pa.schema([CHAIN_SCHEMA.field(c) for c in CURATE_READS]))


def test_groups_screen_then_decide_invariants():
    cfg = build(CurateConfig, {"chains": "x", "out_dir": "y", "diversity": {"max_paths": 2}})
    rows = [chain(k=3), chain(k=0, text=GOOD.replace("Answer: 10", "Answer: 9")), chain(k=1, finish="length"),
            chain(k=2, text="Step 1: Compute 3 + 4 = 7.\nStep 2: Then 7 * 2 = 14, minus 4 is 10.\nAnswer: 10"),
            chain(k=4, text="Step 1: First, 3 plus 4 equals 7.\nStep 2: Doubling gives 14 and 14 - 4 = 10.\nAnswer: 10")]
    cands = screen_group(_table(rows), cfg).to_pylist()
    assert [c["path_index"] for c in cands] == [2, 3, 4]
    js = {("p1", k): J("p1", k, s) for k, s in ((2, 9.0), (3, 8.0), (4, 3.0))}
    out = decide_group(_table(rows), cfg, js, judged_low(list(js.values()), cfg.judge)).to_pylist()
    assert len(out) == len(rows) and len({(d["problem_id"], d["path_index"]) for d in out}) == len(rows)
    by_k = {d["path_index"]: d for d in out}
    assert by_k[0]["reason"] == "incorrect" and by_k[1]["reason"] == "truncated" and by_k[4]["reason"] == "judge_low"
    for d in out:
        assert d["kept"] == (d["reason"] is None) == (d["example"] is not None)
        assert (d["self_eval"] is not None) == (d["path_index"] in (2, 3, 4))  # readable judgements only
    assert sorted(k for k, d in by_k.items() if d["kept"]) == [2, 3]


def test_report_counts_add_up(tmp_path):
    decisions = [{"problem_id": f"p{i // 2}", "path_index": i % 2, "category": "math" if i < 6 else "logic",
                  "kept": i % 3 == 0, "reason": None if i % 3 == 0 else ("incorrect" if i % 2 else "truncated"),
                  "num_steps": i, "chars": 100 + i, "judge_score": 7.0 if i % 3 == 0 else None} for i in range(10)]
    s = summarize(decisions, {"train": Counter(rationale=3, general=1), "val": Counter(rationale=1)})
    assert s["kept"] + sum(s["dropped_by_reason"].values()) == s["chains"] == 10
    assert sum(v["chains"] for v in s["by_category"].values()) == 10
    assert sum(v["kept"] + sum(v["dropped"].values()) for v in s["by_category"].values()) == 10
    assert s["distributions"]["num_steps/kept"]["n"] == s["kept"]
    md = markdown(s, "report.png")
    assert "| incorrect |" in md and "| logic |" in md and "report.png" in md
    plot(decisions, s, tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curate_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="mix: ratio > 0 needs at least one source"):
        build(CurateConfig, {"chains": "x", "out_dir": "y", "mix": {"ratio": 0.5, "sources": []}})
    with pytest.raises(ConfigError, match="judge.rule"):
        build(CurateConfig, {"chains": "x", "out_dir": "y", "judge": {"rule": "median"}})
    with pytest.raises(ConfigError, match="missing required key 'chains'"):
        build(CurateConfig, {"out_dir": "y"})


def test_perturbations_damage_steps_deterministically_and_keep_the_answer():
    from jobs.curate.perturb import perturb

    steps = [f"Step text {i}: 12 + {i} = {12 + i}." for i in range(6)]
    kept = perturb(steps, "delete_steps", 0.67, 0, "p#0")
    assert len(kept) == 2 and all(s in steps for s in kept) and kept == perturb(steps, "delete_steps", 0.67, 0, "p#0")
    assert kept != perturb(steps, "delete_steps", 0.67, 0, "p#1") or kept != perturb(steps, "delete_steps", 0.67, 1, "p#0")
    assert perturb(steps[:1], "delete_steps", 0.67, 0, "x") == steps[:1]  # one step always stays
    noisy = perturb(steps, "insert_noise", 0.67, 0, "p#0")
    assert len(noisy) == 10 and [s for s in noisy if s in steps] == steps  # the original order is kept
    wrong = perturb(steps, "corrupt_numbers", 0, 0, "p#0")
    assert len(wrong) == 6 and all(w != s for w, s in zip(wrong, steps))
    assert [re.sub(r"\d", "#", w).replace("##", "#") for w in wrong][:1] == [re.sub(r"\d", "#", steps[0]).replace("##", "#")]
    assert perturb(steps, "none", 0.67, 0, "p#0") == steps
    cfg = build(ExampleConfig, {"perturb": {"kind": "delete_steps", "fraction": 0.67}, "granularity": "fine"})
    ex = rationale_example(chain(), cfg)
    target = json.loads(ex["messages"])[-1]["content"]
    assert ex["num_steps"] == 1 and target.endswith("Answer: 10")  # 3 steps -> 1, the answer unchanged
