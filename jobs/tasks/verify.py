"""Checking an extracted answer against a problem: reasoning-gym's own verifiers, math-verify, or
normalized string equality. Returns a score in [0, 1]; `CORRECT_AT` decides `correct`."""

from __future__ import annotations

import functools
import json
import re
import threading
from typing import Any, Callable, Iterable

CORRECT_AT = 0.999  # reasoning-gym gives partial credit; only a full score counts as correct


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
    text = text.strip().lower()
    text = re.sub(r"[\s]+", " ", text)
    return text.strip(" .$")


def math_equal(gold: str, answer: str) -> bool:
    """math-verify equivalence, falling back to normalized equality when it cannot parse either."""
    if normalize(gold) == normalize(answer):
        return True
    from math_verify import parse, verify

    try:
        # math-verify's timeouts use signals, which work only in a main thread (Ray may call us
        # from another one); there we go without the timeout
        t = 5 if threading.current_thread() is threading.main_thread() else None
        g = parse(f"${gold}$", parsing_timeout=t)
        a = parse(f"${answer}$", parsing_timeout=t)
        return bool(g and a and verify(g, a, timeout_seconds=t))
    except Exception:  # math-verify raises on inputs it cannot handle; that is "not equal"
        return False


def score(verifier: str, gold: str | None, metadata: str, answer: str | None) -> float | None:
    """Score of `answer`, or None when the problem has no way to check it (verifier 'none')."""
    if verifier == "none":
        return None
    if answer is None:
        return 0.0
    if verifier.startswith("rg:"):
        entry: dict[str, Any] = json.loads(metadata)
        try:
            return float(_gym_scorer(verifier[3:])(answer, entry))
        except Exception:  # a verifier crashing on odd model output means the answer is not right
            return 0.0
    if gold is None:
        return None
    if verifier == "math":
        return 1.0 if math_equal(gold, answer) else 0.0
    if verifier == "exact":
        return 1.0 if normalize(gold) == normalize(answer) else 0.0
    raise ValueError(f"unknown verifier {verifier!r}")
