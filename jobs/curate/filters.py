"""What curation keeps and why: pure functions over one problem's chain rows (jobs.common.schemas.CHAIN_SCHEMA dicts).

Each dropped chain gets exactly one reason, the first that applies in REASONS order: structure,
then correctness, then duplicates (`screen`); then the judge and the per-problem path cap
(`select`). Kept chains have reason None.
"""

from __future__ import annotations

import re
from typing import Any

from jobs.common.schemas import ERROR, OK
from jobs.curate.config import CorrectnessConfig, JudgeConfig, StructureConfig
from jobs.formats.parse import first_answer_line, split_steps
from jobs.tasks.verify import checkable, majority, vote_groups

STRUCTURE_REASONS = ("engine_error", "empty", "garbage", "truncated", "no_answer", "answer_before_reasoning",
                     "too_few_steps", "too_many_steps", "too_short", "too_long", "repetition")
CORRECTNESS_REASONS = ("incorrect", "no_gold", "no_consensus", "disagrees_with_majority")
SELECT_REASONS = ("duplicate", "judge_error", "judge_unparsed", "judge_low", "over_path_limit")
REASONS = STRUCTURE_REASONS + CORRECTNESS_REASONS + SELECT_REASONS

_STEP_LABEL = re.compile(r"\bstep\s*\d+\s*[:.)-]", re.IGNORECASE)
_WORD = re.compile(r"\w+")


def repeat_fraction(text: str, n: int = 4) -> float:
    """Share of the word n-grams that repeat an earlier one: near 0 for prose, high for loops."""
    words = text.lower().split()
    if len(words) < 2 * n:
        return 0.0
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


def alnum_fraction(text: str) -> float:
    chars = [c for c in text if not c.isspace()]
    return sum(c.isalnum() for c in chars) / len(chars) if chars else 0.0


def answer_before_reasoning(text: str) -> bool:
    """A `pre` chain must reason first: true when its first answer line has no reasoning before it
    but reasoning after it (the answer leaked ahead of the steps)."""
    span = first_answer_line(text)
    if span is None:
        return False
    return not split_steps(text[:span[0]]) and bool(split_steps(text[span[1]:]))


def structure_reason(row: dict[str, Any], cfg: StructureConfig) -> str | None:
    """The first structural fault of one chain, or None."""
    text = row.get("chain")
    if row.get("status") == ERROR or text is None:
        return "engine_error"
    if not text.strip():
        return "empty"
    if alnum_fraction(text) < cfg.min_alnum_fraction:
        return "garbage"
    if cfg.drop_truncated and row.get("finish_reason") == "length":
        return "truncated"
    if not row.get("answer"):
        return "no_answer"
    if row.get("format") == "pre" and answer_before_reasoning(text):
        return "answer_before_reasoning"
    steps = row.get("num_steps") or 0
    if steps < cfg.min_steps:
        return "too_few_steps"
    if steps > cfg.max_steps:
        return "too_many_steps"
    if len(text) < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    if repeat_fraction(text) > cfg.max_repeat_fraction:
        return "repetition"
    return None


def has_gold(row: dict[str, Any]) -> bool:
    return checkable(row.get("gold_answer"), row.get("verifier"))


def correctness_reasons(rows: list[dict[str, Any]], cfg: CorrectnessConfig) -> list[str | None]:
    """One reason (or None) per row of one problem; every row here passed the structural checks."""
    if cfg.mode == "off":
        return [None] * len(rows)
    use_gold = cfg.mode in ("auto", "gold")
    voters = [i for i, r in enumerate(rows) if not (use_gold and has_gold(r))]
    # a problem's paths share its verifier: equivalent answers (1/2, 0.5, \frac{1}{2}) vote together
    first = rows[voters[0]] if voters else {}
    answers = [rows[i]["answer"] for i in voters]
    groups = vote_groups(answers, first.get("verifier") or "exact", first.get("metadata") or "{}")
    top, share, votes = majority(groups)
    consensus = top is not None and votes >= cfg.min_votes and share >= cfg.min_agreement
    group_of = dict(zip(voters, groups))
    out = []
    for i, r in enumerate(rows):
        if use_gold and has_gold(r):
            out.append(None if r.get("correct") else "incorrect")
        elif cfg.mode == "gold":
            out.append("no_gold")
        elif not consensus:
            out.append("no_consensus")
        else:
            out.append(None if group_of[i] == top else "disagrees_with_majority")
    return out


def shingles(text: str, n: int = 3) -> frozenset[tuple[str, ...]]:
    words = _WORD.findall(_STEP_LABEL.sub(" ", text.lower()))
    if len(words) < n:
        return frozenset([tuple(words)])
    return frozenset(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def duplicates(texts: list[str], threshold: float) -> list[bool]:
    """Greedy collapse in order: a text is a duplicate when it is within `threshold` Jaccard
    similarity of a text kept before it (1.0: identical up to case, spacing and step labels)."""
    kept: list[frozenset] = []
    out = []
    for t in texts:
        s = shingles(t)
        dup = any(jaccard(s, k) >= threshold for k in kept)
        if not dup:
            kept.append(s)
        out.append(dup)
    return out


def screen(rows: list[dict[str, Any]], structure: StructureConfig, correctness: CorrectnessConfig,
           near_duplicate: float) -> list[str | None]:
    """Reasons from the checks that need no judge, for one problem's rows (in path order)."""
    reasons = [structure_reason(r, structure) for r in rows]
    ok = [i for i, r in enumerate(reasons) if r is None]
    for i, reason in zip(ok, correctness_reasons([rows[i] for i in ok], correctness)):
        reasons[i] = reason
    ok = [i for i, r in enumerate(reasons) if r is None]
    for i, dup in zip(ok, duplicates([rows[i]["chain"] for i in ok], near_duplicate)):
        if dup:
            reasons[i] = "duplicate"
    return reasons


def judged_low(judgements: list[dict[str, Any]], cfg: JudgeConfig) -> set[tuple[str, int]]:
    """Keys of the readable judgements the drop rule removes. `fraction` ranks all of them (lowest
    score first, ties by key) so the count is exact and the choice deterministic."""
    scored = [j for j in judgements if j["status"] == OK]
    if cfg.rule == "threshold":
        return {(j["problem_id"], j["path_index"]) for j in scored if j["score"] < cfg.min_score}
    scored.sort(key=lambda j: (j["score"], j["problem_id"], j["path_index"]))
    return {(j["problem_id"], j["path_index"]) for j in scored[:int(cfg.drop_fraction * len(scored))]}


def select(rows: list[dict[str, Any]], reasons: list[str | None], judgements: dict[tuple[str, int], dict[str, Any]] | None,
           low: set[tuple[str, int]], judge: JudgeConfig, max_paths: int) -> list[str | None]:
    """Final reasons for one problem: the judge's verdict on the screened survivors (`judgements`
    None: no judge), then at most `max_paths` of the rest, best rated first, then by path."""
    reasons = list(reasons)
    for i, r in enumerate(rows):
        if reasons[i] is not None or judgements is None:
            continue
        key = (r["problem_id"], r["path_index"])
        j = judgements.get(key)
        if j is None or j["status"] == ERROR:
            reasons[i] = "judge_error"
        elif j["status"] != OK:
            reasons[i] = "judge_unparsed" if judge.unparsed == "drop" else None
        elif key in low:
            reasons[i] = "judge_low"

    def rank(i: int) -> tuple[float, int]:
        j = (judgements or {}).get((rows[i]["problem_id"], rows[i]["path_index"]))
        score = j["score"] if j and j["status"] == OK else 0.0
        return (-score, rows[i]["path_index"])

    survivors = sorted((i for i, r in enumerate(reasons) if r is None), key=rank)
    for i in survivors[max_paths:]:
        reasons[i] = "over_path_limit"
    return reasons
