"""Prompt building: system instruction, few-shot exemplars, the question; then the model's chat
template. The same function builds teacher prompts (generate) and student prompts (train, serve)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.formats.cot import Granularity, instruction, regroup_steps, render_solution, resolve_format, target_steps

BUILTIN_EXEMPLARS = Path(__file__).with_name("exemplars.jsonl")


@dataclass(frozen=True)
class Exemplar:
    id: str
    category: str
    question: str
    steps: tuple[str, ...]
    answer: str


def load_exemplars(path: str | Path | None = None) -> list[Exemplar]:
    """Worked examples (one JSON object a line: id, category, question, steps, answer)."""
    path = Path(path) if path else BUILTIN_EXEMPLARS
    if not path.is_file():
        raise ValueError(f"exemplar pool {path} does not exist")
    pool = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            pool.append(Exemplar(id=str(rec["id"]), category=str(rec["category"]), question=str(rec["question"]),
                                 steps=tuple(map(str, rec["steps"])), answer=str(rec["answer"])))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: not a valid exemplar (needs id, category, question, steps, answer): {e}") from None
    return pool


def select_exemplars(pool: list[Exemplar], *, problem_id: str, question: str, category: str,
                     k: int, seed: int) -> list[Exemplar]:
    """k exemplars for one problem, the same every time for the same (problem, seed): same-category
    ones first, in an order fixed by a hash; never the problem itself (same id or same question)."""
    if k <= 0:
        return []
    q = question.strip()
    candidates = [e for e in pool if e.id != problem_id and e.question.strip() != q]

    def rank(e: Exemplar) -> tuple[int, str]:
        h = hashlib.sha256(f"{seed}|{problem_id}|{e.id}".encode()).hexdigest()
        return (0 if e.category == category else 1, h)

    return sorted(candidates, key=rank)[:k]


def build_messages(question: str, *, fmt: str, difficulty: str, granularity: Granularity,
                   exemplars: list[Exemplar], system: str | None = None) -> list[dict[str, str]]:
    """Chat messages: the format's instruction (plus an optional system prefix), each exemplar as a
    user/assistant turn rendered in the same format and granularity, then the question."""
    concrete = resolve_format(fmt, difficulty)
    sys_text = instruction(concrete, granularity)
    if system:
        sys_text = f"{system.strip()}\n\n{sys_text}"
    messages = [{"role": "system", "content": sys_text}]
    for ex in exemplars:
        steps = regroup_steps(list(ex.steps), target_steps(granularity))
        messages.append({"role": "user", "content": ex.question})
        messages.append({"role": "assistant", "content": render_solution(steps, ex.answer, concrete)})
    messages.append({"role": "user", "content": question})
    return messages


def apply_chat_template(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text the engine receives. A leading BOS is dropped when the tokenizer adds one
    itself, so the engine does not see it twice."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        ids = tokenizer("x").input_ids
        if ids and ids[0] == tokenizer.bos_token_id:
            text = text[len(bos):]
    return text
