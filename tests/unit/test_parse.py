"""Answer extraction and step splitting on the shapes teachers actually write."""

from __future__ import annotations

import pytest

from jobs.formats.parse import extract_answer, last_boxed, split_steps


@pytest.mark.parametrize("text, fmt, answer, source", [
    ("Step 1: 2+2=4\nAnswer: 4", "pre", "4", "marker"),
    ("Step 1: think\nanswer: Thursday.", "pre", "Thursday", "marker"),
    ("**Final Answer:** 12", "pre", "12", "marker"),
    ("We get \\boxed{\\frac{1}{2}} so", "pre", "\\frac{1}{2}", "boxed"),
    ("Answer: 3\nwait, recheck... \\boxed{5}", "pre", "5", "boxed"),       # boxed after the marker wins
    ("\\boxed{5}\nAnswer: 7", "pre", "7", "marker"),                         # last statement wins in pre
    ("Answer: 7\nReasoning:\nStep 1: x\nAnswer: 9", "post", "7", "marker"),  # post: the first one
    ("Answer: $\\boxed{42}$", "pre", "42", "boxed"),
    ("no answer here at all", "pre", None, "none"),
    ("Answer:   \n", "pre", None, "none"),
])
def test_extract_answer(text, fmt, answer, source):
    assert extract_answer(text, fmt) == (answer, source)


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
    ("", []),
])
def test_split_steps(text, steps):
    assert split_steps(text) == steps
