"""Routing policies: pure functions that decide, per query, whether the student's answer stands or
the teacher answers. Rules come first (before the student is asked), then the policy reads the
student's own answer: the agreement of its k samples, the probability of its tokens, or a learned
model's estimate that it is right. Thresholds come from `calibrate` (serve/calibrate.py), fitted on
the evaluation's per-item results, never guessed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

STUDENT, TEACHER = "student", "teacher"


@dataclass(frozen=True)
class Signals:
    """What the router knows about one query once the student has answered."""
    question: str
    category: str | None = None
    answers: tuple[str | None, ...] = ()    # the student's answers (the first is the one returned)
    agreement: float | None = None          # share of the answers in the largest equivalent group
    token_confidence: float | None = None   # exp(mean token log-probability) of the returned answer


@dataclass(frozen=True)
class Decision:
    target: str                  # student | teacher
    reason: str                  # why, in a word or two (rule:keyword, below_threshold, confident, ...)
    policy: str
    confidence: float | None = None
    threshold: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


def rule_decision(question: str, category: str | None, high_stakes: bool, rules) -> Decision | None:
    """A rule that sends the query to the teacher before the student is asked, or None."""
    if rules.honor_flag and high_stakes:
        return Decision(TEACHER, "rule:high_stakes_flag", "rules")
    if category and category in rules.teacher_categories:
        return Decision(TEACHER, "rule:category", "rules", details={"category": category})
    text = question.lower()
    for word in rules.keywords:
        if re.search(rf"(?<!\w){re.escape(word.lower())}(?!\w)", text):
            return Decision(TEACHER, "rule:keyword", "rules", details={"keyword": word})
    return None


def votes(kind: str, signal: str, learned: dict[str, Any] | None = None) -> bool:
    """Whether a policy reads the agreement of the student's k sampled answers, and so serves their
    vote (jobs.tasks.verify.vote) rather than a single answer: the agreement signal, and a learned
    router fitted on items that had samples."""
    if kind == "confidence":
        return signal == "agreement"
    return kind == "learned" and bool((learned or {}).get("samples"))


def signal_value(signals: Signals, signal: str) -> float | None:
    return signals.agreement if signal == "agreement" else signals.token_confidence


def features(signals: Signals, categories: list[str]) -> list[float]:
    """The learned router's inputs: a bias, the two confidences, the question's length, its category."""
    return ([1.0, signals.agreement if signals.agreement is not None else 0.5,
             signals.token_confidence if signals.token_confidence is not None else 0.5,
             min(len(signals.question), 4000) / 1000.0]
            + [1.0 if signals.category == c else 0.0 for c in categories])


def predict_correct(weights: list[float], x: list[float]) -> float:
    z = sum(w * v for w, v in zip(weights, x))
    return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))


def decide(kind: str, signals: Signals, *, signal: str = "logprob", threshold: float | None = None,
           learned: dict[str, Any] | None = None) -> Decision:
    """The policy's decision once the student has answered (rules were applied before)."""
    if kind == "always_student":
        return Decision(STUDENT, "always_student", kind)
    if kind == "always_teacher":
        return Decision(TEACHER, "always_teacher", kind)
    if kind == "confidence":
        value = signal_value(signals, signal)
        if value is None:
            return Decision(TEACHER, f"no_{signal}_signal", kind, threshold=threshold)
        target = STUDENT if value >= threshold else TEACHER
        return Decision(target, "confident" if target == STUDENT else "below_threshold", kind, value, threshold,
                        {"signal": signal})
    if kind == "learned":
        p = predict_correct(learned["weights"], features(signals, learned["categories"]))
        t = learned["threshold"]
        target = STUDENT if p >= t else TEACHER
        return Decision(target, "predicted_right" if target == STUDENT else "predicted_wrong", kind, p, t)
    raise ValueError(f"unknown policy {kind!r}")
