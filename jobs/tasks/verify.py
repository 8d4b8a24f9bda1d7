"""Checking an extracted answer against a problem: reasoning-gym's own verifiers, math-verify, or
normalized string equality, and telling which answers of a problem are the same answer (votes).

`score` returns a number in [0, 1]; `is_correct` applies `CORRECT_AT`. Two rules sit above every
verifier, so that no verifier's quirk hides an equivalent answer:
- an answer equal to the gold one once both are cleaned and normalized is correct;
- where the gold answer is a number, an answer that states that number and no other (with a unit,
  in words around it, in another numeric form: `292 legs`, `-4.0`, `1/2` for 0.5) is correct.
reasoning-gym's scorers give partial credit for such answers (0.375 for `292 legs`, 0.5 for
`-4.0`); only a full score counts as correct, so without these rules they would count as wrong.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from fractions import Fraction
from typing import Any, Callable, Iterable

from jobs.formats.parse import clean_answer

CORRECT_AT = 0.999  # reasoning-gym gives partial credit; only a full score counts as correct

# a number as people and models write it: sign, thousands separators, decimals (a leading dot
# too), an exponent, a fraction a/b, or LaTeX's \frac{a}{b}
_NUM = r"[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?"
_NUMBER = re.compile(
    r"(?<![\w.])(?:\\d?frac\{\s*(?P<fn>[-+−]?\d+(?:\.\d+)?)\s*\}\{\s*(?P<fd>[-+−]?\d+(?:\.\d+)?)\s*\}"
    rf"|(?P<a>{_NUM})\s*/\s*(?P<b>\d+(?:\.\d+)?)(?![\d.])"
    rf"|(?P<x>{_NUM}))(?![\w])")


@functools.lru_cache(maxsize=None)
def _gym_scorer(task: str) -> Callable[[str, dict], float]:
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(task)


def warm(verifiers: Iterable[str]) -> None:
    """Load what scoring with these verifiers needs (reasoning-gym's scorers, math-verify), ahead
    of the first answer."""
    for verifier in verifiers:
        if verifier.startswith("rg:"):
            _gym_scorer(verifier[3:])
        elif verifier == "math":
            import math_verify  # noqa: F401


def normalize(text: str) -> str:
    """Case, spacing and wrappers (jobs.formats.parse.clean_answer) do not matter; a leading dot
    or sign does (`.5` is not `5`)."""
    return " ".join(clean_answer(text).lower().split())


def _to_fraction(text: str) -> Fraction | None:
    text = text.replace("−", "-").replace(",", "")
    if not re.search(r"\d", text):
        return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def stated_numbers(text: str) -> list[Fraction]:
    """Every number `text` states, as exact fractions, in order."""
    out = []
    for m in _NUMBER.finditer(text):
        if m.group("fn") is not None:
            n, d = _to_fraction(m.group("fn")), _to_fraction(m.group("fd"))
        elif m.group("a") is not None and m.group("a") not in ("", "-", "+", "−"):
            n, d = _to_fraction(m.group("a")), _to_fraction(m.group("b"))
        else:
            n, d = _to_fraction(m.group("x") or ""), Fraction(1)
        if n is not None and d:
            out.append(n / d)
    return out


def number_value(text: str) -> Fraction | None:
    """The value of an answer that is a number and nothing else (`-4`, `1,000`, `.5`, `3/4`,
    `\\frac{1}{2}`, `$7$`); None otherwise."""
    t = clean_answer(text)
    nums = list(_NUMBER.finditer(t))
    if len(nums) != 1 or t[:nums[0].start()].strip() or t[nums[0].end():].strip():
        return None
    values = stated_numbers(t)
    return values[0] if len(values) == 1 else None


def states_number(answer: str, value: Fraction) -> bool:
    """Whether `answer` states `value` and no other number (units and words around it allowed)."""
    values = set(stated_numbers(clean_answer(answer)))
    return values == {value}


def math_equal(gold: str, answer: str) -> bool:
    """math-verify equivalence, falling back to normalized equality when it cannot parse either."""
    if normalize(gold) == normalize(answer):
        return True
    from math_verify import parse, verify

    try:
        # math-verify's timeouts use signals, which work only in a main thread (Ray may call us
        # from another one); there we go without the timeout
        t = 5 if threading.current_thread() is threading.main_thread() else None
        g = parse(f"${clean_answer(gold)}$", parsing_timeout=t)
        a = parse(f"${clean_answer(answer)}$", parsing_timeout=t)
        return bool(g and a and verify(g, a, timeout_seconds=t))
    except Exception:  # math-verify raises on inputs it cannot handle; that is "not equal"
        return False


def _same_answer(gold: str, answer: str) -> bool:
    """The rules above every verifier: normalized equality, or the gold number stated alone."""
    if normalize(gold) == normalize(answer):
        return True
    value = number_value(gold)
    return value is not None and states_number(answer, value)


def score(verifier: str, gold: str | None, metadata: str, answer: str | None) -> float | None:
    """Score of `answer`, or None when the problem has no way to check it (verifier 'none')."""
    if verifier == "none":
        return None
    if answer is None:
        return 0.0
    if verifier.startswith("rg:"):
        entry: dict[str, Any] = json.loads(metadata)
        try:
            s = float(_gym_scorer(verifier[3:])(answer, entry))
        except Exception:  # a verifier crashing on odd model output means the answer is not right
            s = 0.0
        if s < CORRECT_AT and gold is not None and _same_answer(gold, answer):
            return 1.0
        return s
    if gold is None:
        return None
    if verifier == "math":
        return 1.0 if _same_answer(gold, answer) or math_equal(gold, answer) else 0.0
    if verifier == "exact":
        return 1.0 if _same_answer(gold, answer) else 0.0
    raise ValueError(f"unknown verifier {verifier!r}")


def checkable(gold: str | None, verifier: str | None) -> bool:
    """Whether a problem's answers can be graded: it has a gold answer and a way to compare."""
    return gold is not None and verifier not in (None, "none")


def is_correct(verifier: str, gold: str | None, metadata: str, answer: str | None) -> bool | None:
    """Whether `answer` is right (None: the problem cannot be checked)."""
    s = score(verifier, gold, metadata, answer)
    return None if s is None else s >= CORRECT_AT


def equivalent(verifier: str, metadata: str, a: str, b: str) -> bool:
    """Whether two answers to one problem are the same answer, by the problem's own verifier:
    each taken as the other's gold answer (either way round), with the rules above every verifier."""
    if _same_answer(a, b) or _same_answer(b, a):
        return True
    if verifier == "math":
        return math_equal(a, b)
    if verifier.startswith("rg:"):
        try:
            entry = {**json.loads(metadata), "answer": b}
            return float(_gym_scorer(verifier[3:])(a, entry)) >= CORRECT_AT
        except Exception:  # as in score: a crash means "not the same"
            return False
    return False


def vote_groups(answers: list[str], verifier: str = "exact", metadata: str = "{}") -> list[int]:
    """The group of each answer (0, 1, ...: in order of first appearance): answers `equivalent` by
    the problem's verifier share a group."""
    reps: list[int] = []
    out = []
    for i, a in enumerate(answers):
        g = next((g for g, r in enumerate(reps) if equivalent(verifier, metadata, answers[r], a)), None)
        if g is None:
            reps.append(i)
            g = len(reps) - 1
        out.append(g)
    return out


def vote(groups: list[int]) -> int | None:
    """The group self-consistency answers with: the largest, a tie going to the group sampled first
    (vote_groups numbers groups in order of first appearance); None without votes. The router
    serves this answer, and the evaluation grades it as majority@k."""
    return max(set(groups), key=lambda g: (groups.count(g), -g)) if groups else None


def majority(groups: list[int]) -> tuple[int | None, float, int]:
    """Self-consistency from vote_groups' numbering: (the majority group, or None on a tie or
    without votes; its share of the votes; the number of votes)."""
    if not groups:
        return None, 0.0, 0
    sizes = sorted(((groups.count(g), -g) for g in set(groups)), reverse=True)
    (n, neg), *rest = sizes
    top = None if rest and rest[0][0] == n else -neg
    return top, n / len(groups), len(groups)
