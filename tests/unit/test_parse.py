"""Answer extraction and step splitting on the shapes teachers actually write."""

from __future__ import annotations

import itertools

import pytest

from jobs.formats.cot import regroup_steps, render_solution, target_steps
from jobs.formats.parse import clean_answer, extract_answer, last_boxed, parse_chain, split_steps
from jobs.formats.prompts import load_exemplars


@pytest.mark.parametrize("text, fmt, answer, source", [
    ("Step 1: 2+2=4\nAnswer: 4", "pre", "4", "marker"),
    ("Step 1: think\nanswer: Thursday.", "pre", "Thursday", "marker"),
    ("**Final Answer:** 12", "pre", "12", "marker"),
    ("**Answer**: 12", "pre", "12", "marker"),
    ("### Final answer: **Tuesday**.", "pre", "Tuesday", "marker"),
    ("We get \\boxed{\\frac{1}{2}} so", "pre", "\\frac{1}{2}", "boxed"),
    ("Answer: 3\nwait, recheck... \\boxed{5}", "pre", "5", "boxed"),       # boxed after the marker wins
    ("\\boxed{5}\nAnswer: 7", "pre", "7", "marker"),                         # last statement wins in pre
    ("Answer: 7\nReasoning:\nStep 1: x\nAnswer: 9", "post", "7", "marker"),  # post: the first one
    ("Answer: $\\boxed{42}$", "pre", "42", "boxed"),
    ("no answer here at all", "pre", None, "none"),
    ("Answer:   \n", "pre", None, "none"),
    # an empty marker line never takes the format's next marker or a step as its answer
    ("Answer:\n\nReasoning:\nStep 1: a", "post", None, "none"),
    ("Answer:\nStep 1: a\nStep 2: b", "post", None, "none"),
    ("Answer:\n\nStep 1: a", "pre", None, "none"),
    # ... but an answer on its own line after the marker is the answer
    ("Answer:\n42\nReasoning:\nStep 1: x", "post", "42", "marker"),
    ("Step 1: x\nAnswer:\n  **Friday**.", "pre", "Friday", "marker"),
    ("Step 1: x\nFinal answer:\n\\boxed{9}", "pre", "9", "boxed"),
])
def test_extract_answer(text, fmt, answer, source):
    assert extract_answer(text, fmt) == (answer, source)


@pytest.mark.parametrize("raw, clean", [
    # wrappers in any order, then trailing sentence punctuation, in either nesting
    ("**12**.", "12"), ("$7$.", "7"), ("**$7$**.", "7"), ("$**7**$", "7"), ("`12`;", "12"),
    ("\\(\\frac{1}{2}\\).", "\\frac{1}{2}"), ("\\boxed{\\text{Tuesday}}.", "Tuesday"), ("\\boxed{$12$}", "12"),
    ("\"Paris\".", "Paris"), ("12.", "12"), ("12!", "12"), (" **x** ", "x"),
    # signs and leading dots belong to the number
    ("-4", "-4"), (".5", ".5"), ("-.5.", "-.5"), ("**-0.25**", "-0.25"), ("$-3$.", "-3"),
    # not one wrapped answer: left as it is
    ("$x$ + $y$", "$x$ + $y$"), ("**a** and **b**", "**a** and **b**"), ("3.14", "3.14"),
])
def test_clean_answer(raw, clean):
    assert clean_answer(raw) == clean


def test_marker_answers_are_cleaned_before_and_after_punctuation():
    assert extract_answer("Step 1: add\nAnswer: **12**.", "pre") == ("12", "marker")
    assert extract_answer("Answer: $7$.", "pre") == ("7", "marker")
    assert extract_answer("Step 1: half\nAnswer: .5", "pre") == (".5", "marker")


def test_last_boxed_balances_braces():
    assert last_boxed("x \\boxed{a{b}c} y \\boxed{{1}{2}}") == "{1}{2}"
    assert last_boxed("\\boxed{unclosed") is None
    assert last_boxed("nothing") is None


@pytest.mark.parametrize("text, steps", [
    ("Step 1: a\nStep 2: b\nAnswer: 3", ["a", "b"]),
    ("**Step 1:** a\n  more of a\n**Step 2:** b", ["a more of a", "b"]),
    ("1. first\n2. second\nAnswer: x", ["first", "second"]),
    ("First line.\n\nSecond line.\nAnswer: 4", ["First line.", "Second line."]),
    ("One sentence. Two sentence. 3 is next.", ["One sentence.", "Two sentence.", "3 is next."]),
    ("Answer: 5\nReasoning:\nStep 1: a", ["a"]),
    # an empty marker line is removed alone: the first step stays
    ("Answer:\nStep 1: a\nStep 2: b", ["a", "b"]),
    ("Answer:\n\nReasoning:\nStep 1: a\nStep 2: b", ["a", "b"]),
    # an answer on its own line goes with its marker, not into the steps
    ("First add.\nThen halve.\nAnswer:\n42", ["First add.", "Then halve."]),
    ("", []),
])
def test_split_steps(text, steps):
    assert split_steps(text) == steps


def test_every_exemplar_in_every_format_and_granularity_parses_back():
    """What the prompts show and what training teaches (render_solution) reads back exactly."""
    for ex, fmt, granularity in itertools.product(load_exemplars(), ("pre", "post"), ("coarse", "fine", 1, 2, 5)):
        steps = regroup_steps(list(ex.steps), target_steps(granularity))
        parsed = parse_chain(render_solution(steps, ex.answer, fmt), fmt)
        assert (parsed.answer, parsed.steps) == (ex.answer, [" ".join(s.split()) for s in steps]), (ex.id, fmt, granularity)
