"""Grading with reasoning-gym's verifiers, math-verify and exact match; equivalent answers voting
together."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
import reasoning_gym

from jobs.tasks.verify import (checkable, equivalent, is_correct, majority, math_equal, normalize, number_value, score,
                               stated_numbers, vote, vote_groups)


def gym_entry(task: str, answer: str | None = None, seed: int = 3) -> tuple[str, str]:
    """(gold answer, metadata) of a reasoning-gym problem of `task` (the first whose answer is
    `answer`, when given)."""
    ds = reasoning_gym.create_dataset(task, size=200, seed=seed)
    entry = next(e for e in ds if answer is None or str(e["answer"]) == answer)
    return str(entry["answer"]), json.dumps(entry, default=str)


@pytest.mark.parametrize("task", ["basic_arithmetic", "calendar_arithmetic", "syllogism", "time_intervals"])
def test_gym_verifier_on_json_round_tripped_entries(task):
    entry = reasoning_gym.create_dataset(task, size=1, seed=3)[0]
    metadata = json.dumps(entry, default=str)
    assert score(f"rg:{task}", entry["answer"], metadata, str(entry["answer"])) == 1.0
    assert score(f"rg:{task}", entry["answer"], metadata, "certainly not this") < 1.0
    assert score(f"rg:{task}", entry["answer"], metadata, None) == 0.0


@pytest.mark.parametrize("task, answer", [
    # reasoning-gym's own scorers give these 0.375, 0.17 and 0.5: partial credit, counted wrong
    ("leg_counting", "{} legs"), ("leg_counting", "There are {} legs"), ("leg_counting", "**{}**."),
    ("leg_counting", "{}.0"), ("basic_arithmetic", "{}.0"), ("basic_arithmetic", "$\\boxed{{{}}}$"),
    ("basic_arithmetic", "The result is {}."),
])
def test_a_stated_gold_number_is_correct_whatever_the_verifier_credits(task, answer):
    gold, metadata = gym_entry(task)
    assert is_correct(f"rg:{task}", gold, metadata, answer.format(gold)) is True
    assert is_correct("math", gold, "{}", answer.format(gold)) is True
    assert is_correct("exact", gold, "{}", answer.format(gold)) is True


def test_negative_gold_in_other_numeric_forms():
    gold, metadata = gym_entry("basic_arithmetic", seed=1)
    assert gold.startswith("-")  # seed 1's first problem: -4
    for form in (f"{gold}.0", f"{gold}.00", f"$ {gold} $", f"−{gold[1:]}"):
        assert is_correct("rg:basic_arithmetic", gold, metadata, form), form
    assert not is_correct("rg:basic_arithmetic", gold, metadata, gold[1:])  # the sign matters


@pytest.mark.parametrize("gold, answer, right", [
    # a leading dot is part of the number: 5 is not .5, and .5 is 0.5
    ("5", ".5", False), (".5", "0.5", True), ("0.5", ".5", True), ("-.5", "-0.5", True), ("5", "5.", True),
    # equivalent numeric forms
    ("0.5", "1/2", True), ("0.5", "\\frac{1}{2}", True), ("1000", "1,000", True), ("1000", "1e3", True),
    ("3", "3.000", True), ("12", "12 dollars", True), ("12", "$12", True), ("25", "25%", True),
    # a number among others is not a stated answer; a different number is wrong
    ("7", "7 and 8", False), ("7", "7 or 8", False), ("12", "13 dollars", False), ("0.33", "1/3", False),
    # words compare without case, spacing, wrappers or a trailing period
    ("Tuesday", "**tuesday**.", True), ("Mother-in-law", "mother-in-law ", True), ("a", "b", False),
])
def test_exact_and_math_grading(gold, answer, right):
    assert is_correct("exact", gold, "{}", answer) is right
    assert is_correct("math", gold, "{}", answer) is right


def test_math_verify_reads_an_equation_by_its_right_side():
    assert is_correct("math", "7", "{}", "3 + 4 = 7") and not is_correct("math", "8", "{}", "3 + 4 = 7")


def test_score_none_unknown_and_checkable():
    assert score("none", None, "{}", "anything") is None
    assert score("math", None, "{}", "5") is None  # no gold: nothing to check against
    assert not checkable(None, "math") and not checkable("5", "none") and checkable("5", "exact")
    with pytest.raises(ValueError, match="unknown verifier"):
        score("fuzzy", "a", "{}", "a")


@pytest.mark.parametrize("gold, answer, equal", [
    ("0.5", "1/2", True), ("\\frac{1}{2}", "0.5", True), ("12", "12.0", True),
    ("3", "4", False), ("x+1", "1+x", True), ("Paris", "paris", True),
])
def test_math_equal(gold, answer, equal):
    assert math_equal(gold, answer) is equal


def test_numbers_read_from_answers():
    assert stated_numbers("1,234 apples, -.5, 3/4 and \\frac{1}{3} and 1e3; x2") == [
        1234, Fraction(-1, 2), Fraction(3, 4), Fraction(1, 3), 1000]
    assert number_value("$-4$") == -4 and number_value("**.25**") == Fraction(1, 4)
    assert number_value("4 legs") is None and number_value("Tuesday") is None
    assert normalize("  **Two  Words**. ") == "two words" and normalize(".5") == ".5"


@pytest.mark.parametrize("verifier", ["math", "exact", "none"])
def test_equivalent_answers_vote_together(verifier):
    groups = vote_groups(["1/2", "0.5", "\\frac{1}{2}", "3", "**0.50**."], verifier)
    assert groups == [0, 0, 0, 1, 0]
    assert majority(groups) == (0, pytest.approx(0.8), 5)
    assert majority(vote_groups(["4", "5"], verifier))[0] is None  # a tie has no majority
    assert majority([]) == (None, 0.0, 0)
    # the vote the router serves: the largest group, a tie to the group sampled first
    assert vote([0, 1, 1, 0, 2]) == 0 and vote([0, 1, 1]) == 1 and vote([]) is None


def test_votes_use_a_reasoning_gym_verifier():
    gold, metadata = gym_entry("leg_counting")
    groups = vote_groups([f"{gold} legs", gold, f"{int(gold) + 1}"], "rg:leg_counting", metadata)
    assert groups == [0, 0, 1]
    assert equivalent("rg:leg_counting", metadata, gold, f"{gold}.0")
    assert not equivalent("rg:leg_counting", metadata, gold, f"{int(gold) + 2}")
