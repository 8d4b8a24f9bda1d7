"""The self-evaluation pass: a judge model rates each chain on a rubric (logical structure,
clarity, confidence; 1-10 each) with a one-sentence justification. The prompt and the reply format
are defined here once: curation uses them to judge, and the self-evaluation training examples
teach the student the same format.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import pyarrow as pa

from jobs.common.batch import engine_output
from jobs.common.schemas import ERROR, OK, UNPARSED

CRITERIA = ("structure", "clarity", "confidence")

# The reply template asks for each rating "over 10" instead of showing the range 1-10: a small
# judge (Qwen2.5-0.5B, measured) copied the range's first number into its reply as its rating.
JUDGE_SYSTEM = (
    "You are a strict grader of worked solutions. Rate the solution on three criteria, each a "
    "whole number from 1 (poor) to 10 (excellent):\n"
    "Structure: do the steps follow a logical order, each from the last?\n"
    "Clarity: is each step stated clearly and briefly?\n"
    "Confidence: how sure are you that the reasoning and the final answer are right?\n"
    "Reply with exactly four lines and nothing else:\n"
    "Structure: X/10\nClarity: X/10\nConfidence: X/10\nJustification: <one sentence>")


_SCORE = {c: re.compile(rf"^[\s*#-]*{c}[\s*]*[:=-][\s*]*(\d+(?:\.\d+)?)\s*(?:/\s*10)?", re.IGNORECASE | re.MULTILINE)
          for c in CRITERIA}
_JUSTIFICATION = re.compile(r"^[\s*#-]*justification[\s*]*[:=-][\s*]*(.+)$", re.IGNORECASE | re.MULTILINE)


def chain_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def judge_messages(question: str, chain: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": f"Problem:\n{question.strip()}\n\nSolution:\n{chain.strip()}"}]


def parse_judgement(text: str) -> dict[str, Any] | None:
    """The three ratings, their mean and the justification; None when any is missing or a rating
    is outside 1-10 (an unclear evaluation)."""
    out: dict[str, Any] = {}
    for c, pattern in _SCORE.items():
        m = pattern.search(text)
        if not m or not 1 <= float(m.group(1)) <= 10:
            return None
        out[c] = float(m.group(1))
    just = _JUSTIFICATION.search(text)
    if not just or not just.group(1).strip():
        return None
    out["justification"] = just.group(1).strip()
    out["score"] = round(sum(out[c] for c in CRITERIA) / len(CRITERIA), 3)
    return out


def render_judgement(j: dict[str, Any]) -> str:
    """A judgement in the reply format: the target text of a self-evaluation example."""
    return "\n".join([*(f"{c.capitalize()}: {int(round(j[c]))}/10" for c in CRITERIA),
                      f"Justification: {j['justification']}"])


def plan_judge_rows(candidates: list[dict[str, Any]], tokenizer: Any | None, model: str) -> list[dict[str, Any]]:
    """One judge request per chain; `tokenizer` applies the judge's chat template (None: an HTTP
    judge applies its own)."""
    from jobs.formats.prompts import apply_chat_template

    rows = []
    for c in candidates:
        messages = judge_messages(c["question"], c["chain"])
        rows.append({"problem_id": c["problem_id"], "path_index": c["path_index"], "chain_sha": chain_sha(c["chain"]),
                     "judge_model": model, "prompt_messages": json.dumps(messages),
                     "prompt": apply_chat_template(tokenizer, messages) if tokenizer is not None else None,
                     "seed": 0})
    return rows


def finish_judgements(rows: list[dict[str, Any]], max_tokens: int) -> list[dict[str, Any]]:
    """Engine outputs -> JUDGEMENT_SCHEMA rows."""
    out = []
    for row in rows:
        o = engine_output(row, max_tokens)
        text, o_tok, err = o.text, o.output_tokens, o.error
        j = {name: row.get(name) for name in ("problem_id", "path_index", "chain_sha", "judge_model", "prompt_messages")}
        j.update(judge_text=text, output_tokens=o_tok, error=err, justification=None, score=None,
                 **{c: None for c in CRITERIA})
        parsed = parse_judgement(text) if text is not None else None
        if parsed:
            j.update(parsed)
        j["status"] = ERROR if text is None else OK if parsed else UNPARSED
        out.append(j)
    return out


def latest(judgements: pa.Table | None, shas: dict[tuple[str, int], str]) -> dict[tuple[str, int], dict[str, Any]]:
    """The newest judgement of each chain's current text (part files sort oldest first)."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    if judgements is None:
        return out
    for j in judgements.to_pylist():
        key = (j["problem_id"], j["path_index"])
        if shas.get(key) == j["chain_sha"]:
            out[key] = j
    return out
