"""The problem record every source produces and every stage reads."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

# Verifier names a problem may carry: how an answer to it is checked.
#   "rg:<task>"  reasoning-gym's own score_answer for that task (needs `metadata`, the gym entry)
#   "math"       math-verify equivalence against `answer`
#   "exact"      normalized string equality against `answer`
#   "none"       answers are not checked; a problem without a gold answer keeps its source's
#                verifier, by which its paths' answers are compared in self-consistency votes
VERIFIERS = ("math", "exact", "none")


@dataclass(frozen=True)
class Problem:
    id: str            # stable across runs: the resume key together with the path index
    question: str
    answer: str | None  # the gold answer, when the source has one
    category: str      # reasoning category for reports: math, temporal, logic, ...
    difficulty: str    # a label the source sets ("default", "easy", a file's own value, ...)
    source: str        # where it came from: "reasoning_gym:chain_sum", "jsonl:data/x.jsonl", ...
    verifier: str      # see VERIFIERS; "rg:<task>" for reasoning-gym
    metadata: str      # JSON text: the source's own data (reasoning-gym's entry metadata, extra fields)


def stable_id(*parts: Any) -> str:
    """A short id that depends only on `parts` (so a re-run gives every problem the same id)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rank_key(seed: int, ident: str) -> str:
    """A seeded, reproducible sort key: sorting ids by it draws a deterministic sample."""
    return hashlib.sha256(f"{seed}|{ident}".encode()).hexdigest()
