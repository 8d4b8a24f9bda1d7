"""Grading with reasoning-gym's verifiers, math-verify and exact match."""

from __future__ import annotations

import json

import pytest
import reasoning_gym

from jobs.tasks.verify import math_equal, score


@pytest.mark.parametrize("task", ["basic_arithmetic", "calendar_arithmetic", "syllogism", "time_intervals"])
def test_gym_verifier_on_json_round_tripped_entries(task):
    entry = reasoning_gym.create_dataset(task, size=1, seed=3)[0]
    metadata = json.dumps(entry, default=str)
    assert score(f"rg:{task}", entry["answer"], metadata, str(entry["answer"])) == 1.0
    assert score(f"rg:{task}", entry["answer"], metadata, "certainly not this") < 1.0
    assert score(f"rg:{task}", entry["answer"], metadata, None) == 0.0


@pytest.mark.parametrize("gold, answer, equal", [
    ("0.5", "1/2", True), ("\\frac{1}{2}", "0.5", True), ("12", "12.0", True),
    ("3", "4", False), ("x+1", "1+x", True), ("Paris", "paris", True),
])
def test_math_equal(gold, answer, equal):
    assert math_equal(gold, answer) is equal


def test_exact_none_and_unknown():
    assert score("exact", "Mother-in-law", "{}", "mother-in-law ") == 1.0
    assert score("exact", "a", "{}", "b") == 0.0
    assert score("none", None, "{}", "anything") is None
    with pytest.raises(ValueError, match="unknown verifier"):
        score("fuzzy", "a", "{}", "a")
