"""CoT formats, granularity, exemplar choice and prompt building."""

from __future__ import annotations

import pytest

from jobs.formats.cot import (COARSE_STEPS, instruction, regroup_steps, render_solution, resolve_format,
                              target_steps)
from jobs.formats.parse import parse_chain
from jobs.formats.prompts import Exemplar, build_messages, load_exemplars, select_exemplars


def test_regroup_merges_adjacent_steps_evenly_and_keeps_all_text():
    steps = [f"s{i}." for i in range(1, 8)]
    grouped = regroup_steps(steps, 3)
    assert grouped == ["s1. s2. s3.", "s4. s5.", "s6. s7."]
    assert " ".join(grouped).split() == " ".join(steps).split()
    assert regroup_steps(steps, None) == steps
    assert regroup_steps(steps[:2], 3) == steps[:2]


@pytest.mark.parametrize("granularity, expected", [("coarse", COARSE_STEPS), ("fine", None), (5, 5)])
def test_target_steps(granularity, expected):
    assert target_steps(granularity) == expected


@pytest.mark.parametrize("bad", ["medium", 0, -2, True, 2.5])
def test_bad_granularity(bad):
    with pytest.raises(ValueError, match="granularity"):
        target_steps(bad)


def test_pre_and_post_render_and_parse_back():
    steps = ["Add 2 and 3 to get 5.", "Double it to get 10."]
    pre = render_solution(steps, "10", "pre")
    post = render_solution(steps, "10", "post")
    assert pre.splitlines()[-1] == "Answer: 10" and pre.startswith("Step 1:")
    assert post.splitlines()[0] == "Answer: 10"
    for text, fmt in ((pre, "pre"), (post, "post")):
        parsed = parse_chain(text, fmt)
        assert parsed.answer == "10" and parsed.steps == steps


def test_adaptive_picks_post_for_easy_problems_only():
    assert resolve_format("adaptive", "easy") == "post"
    assert resolve_format("adaptive", "hard") == "pre"
    assert resolve_format("post", "hard") == "post"
    with pytest.raises(ValueError):
        resolve_format("sideways", "easy")


def test_instruction_names_the_format_and_granularity():
    assert "at most 3" in instruction("pre", "coarse")
    assert "exactly 6 steps" in instruction("pre", 6)
    assert instruction("post", "fine").startswith("Give the final answer first")


POOL = [Exemplar(f"e{i}", cat, f"question {i}", ("a.", "b.", "c.", "d."), str(i))
        for i, cat in enumerate(["math", "math", "logic", "temporal", "math"])]


def test_exemplars_are_deterministic_same_category_first_and_never_the_problem():
    picked = select_exemplars(POOL, problem_id="p1", question="q?", category="math", k=3, seed=7)
    assert picked == select_exemplars(POOL, problem_id="p1", question="q?", category="math", k=3, seed=7)
    assert {e.category for e in picked} == {"math"}
    # the problem itself is never its own exemplar, by id or by question text
    picked = select_exemplars(POOL, problem_id="e0", question="question 1", category="math", k=5, seed=7)
    assert {e.id for e in picked} == {"e2", "e3", "e4"}
    assert select_exemplars(POOL, problem_id="p", question="q", category="math", k=0, seed=1) == []


def test_messages_render_exemplars_in_the_problem_format_and_granularity():
    ex = select_exemplars(POOL, problem_id="p", question="q", category="math", k=2, seed=0)
    msgs = build_messages("What is 2+2?", fmt="post", difficulty="default", granularity=2, exemplars=ex, system="Be brief.")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[0]["content"].startswith("Be brief.") and "exactly 2 steps" in msgs[0]["content"]
    assert msgs[2]["content"].startswith("Answer: ")          # post: answer first
    assert "Step 3:" not in msgs[2]["content"]                 # four steps regrouped into two
    assert msgs[-1] == {"role": "user", "content": "What is 2+2?"}


def test_builtin_pool_loads_and_covers_the_categories():
    pool = load_exemplars()
    assert {"math", "temporal", "logic"} <= {e.category for e in pool}
    assert len({e.id for e in pool}) == len(pool)


def test_bad_exemplar_file(tmp_path):
    bad = tmp_path / "ex.jsonl"
    bad.write_text('{"id": "a", "category": "math", "question": "q", "answer": "1"}\n')
    with pytest.raises(ValueError, match=r"ex.jsonl:1: not a valid exemplar"):
        load_exemplars(bad)
