"""Training examples from curated chains: the student's prompt and target in the chosen CoT
format and granularity (jobs.formats, the definition generation and serving share), the judge's
ratings as self-evaluation examples, general data against forgetting, and the split by problem.

An example is a chat (`messages`, JSON): the student is trained on the last (assistant) message.
"""

from __future__ import annotations

import json
from typing import Any

from jobs.common.schemas import GENERAL, RATIONALE, SELF_EVAL
from jobs.curate.config import ExampleConfig
from jobs.curate.judge import judge_messages, render_judgement
from jobs.curate.perturb import perturb
from jobs.formats.cot import regroup_steps, render_solution, resolve_format, target_steps
from jobs.formats.prompts import build_messages
from jobs.tasks.problem import Problem, rank_key



def val_ids(ids: set[str] | list[str], fraction: float, seed: int) -> set[str]:
    """The ids in the validation split: the `fraction` of them (at least one when there are two or
    more) that rank first by a seeded hash. Deterministic; all examples of an id land together."""
    ids = sorted(set(ids))
    if fraction <= 0 or len(ids) < 2:
        return set()
    n = min(len(ids) - 1, max(1, round(fraction * len(ids))))
    return set(sorted(ids, key=lambda i: rank_key(seed, i))[:n])


def answer_check(row: dict[str, Any]) -> dict[str, Any]:
    """A chain's problem's gold answer, verifier and metadata (None where the row lacks them)."""
    return {k: row.get(k) for k in ("gold_answer", "verifier", "metadata")}


def rationale_example(row: dict[str, Any], cfg: ExampleConfig) -> dict[str, Any]:
    """A kept chain as the student should write it: its steps (damaged as `cfg.perturb` says, for
    experiments) regrouped to the student's granularity, rendered in the student's format, after
    the student's (zero-shot) prompt."""
    fmt = resolve_format(cfg.format, row["difficulty"] or "default")
    p = cfg.perturb
    teacher_steps = perturb(list(row["steps"] or []), p.kind, p.fraction, p.seed, f"{row['problem_id']}#{row['path_index']}")
    steps = regroup_steps(teacher_steps, target_steps(cfg.granularity))
    messages = build_messages(row["question"], fmt=cfg.format, difficulty=row["difficulty"] or "default",
                              granularity=cfg.granularity, exemplars=[], system=cfg.system)
    messages.append({"role": "assistant", "content": render_solution(steps, row["answer"], fmt)})
    return {"example_id": f"{row['problem_id']}#{row['path_index']}", "kind": RATIONALE,
            "problem_id": row["problem_id"], "path_index": row["path_index"], "category": row["category"],
            "difficulty": row["difficulty"], "format": fmt, "num_steps": len(steps), "messages": json.dumps(messages),
            **answer_check(row)}


def self_eval_example(row: dict[str, Any], judgement: dict[str, Any]) -> dict[str, Any]:
    """The judge's readable rating of a chain, as an example that teaches the student to rate."""
    messages = judge_messages(row["question"], row["chain"])
    messages.append({"role": "assistant", "content": render_judgement(judgement)})
    return {"example_id": f"{row['problem_id']}#{row['path_index']}#eval", "kind": SELF_EVAL,
            "problem_id": row["problem_id"], "path_index": row["path_index"], "category": row["category"],
            "difficulty": row["difficulty"], "format": None, "num_steps": None, "messages": json.dumps(messages),
            **answer_check(row)}


def general_examples(problems: list[Problem], n: int, seed: int) -> list[dict[str, Any]]:
    """`n` general question -> answer examples drawn deterministically (all when there are fewer)."""
    usable = [p for p in problems if p.answer is not None and p.answer.strip()]
    chosen = sorted(usable, key=lambda p: rank_key(seed, p.id))[:n]
    return [{"example_id": f"general#{p.id}", "kind": GENERAL, "problem_id": p.id, "path_index": None,
             "category": p.category, "difficulty": p.difficulty, "format": None, "num_steps": None,
             "messages": json.dumps([{"role": "user", "content": p.question},
                                     {"role": "assistant", "content": p.answer.strip()}]),
             "gold_answer": p.answer, "verifier": p.verifier, "metadata": p.metadata}
            for p in sorted(chosen, key=lambda p: p.id)]
