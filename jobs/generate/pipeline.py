"""The generate stage's logic: plan one request row per (problem, path), and turn the teacher's
outputs into graded chain rows. Plain functions, tested without Ray; jobs.common.batch runs them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from jobs.formats.parse import parse_chain
from jobs.formats.prompts import Exemplar, apply_chat_template, build_messages, select_exemplars
from jobs.formats.cot import resolve_format
from jobs.common.batch import engine_output
from jobs.generate.config import GenerateConfig
from jobs.common.schemas import CHAIN_SCHEMA, ERROR, OK, UNPARSED
from jobs.tasks.problem import Problem
from jobs.tasks.verify import CORRECT_AT, score


def chain_seed(base: int, problem_id: str, path_index: int) -> int:
    """A distinct, reproducible seed per chain (fits vLLM's 63-bit seed)."""
    digest = hashlib.sha256(f"{base}|{problem_id}|{path_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2


def plan_rows(problems: list[Problem], cfg: GenerateConfig, pool: list[Exemplar], tokenizer: Any | None,
              skip: set[tuple[str, int]] = frozenset()) -> list[dict[str, Any]]:
    """One request row per (problem, path) not in `skip`. The prompt is built once per problem;
    `tokenizer` applies the teacher's chat template (None for an HTTP teacher, which applies its own)."""
    rows = []
    p_cfg = cfg.prompt
    for p in problems:
        todo = [k for k in range(cfg.paths_per_problem) if (p.id, k) not in skip]
        if not todo:
            continue
        exemplars = select_exemplars(pool, problem_id=p.id, question=p.question, category=p.category,
                                     k=p_cfg.few_shot, seed=cfg.seed)
        messages = build_messages(p.question, fmt=p_cfg.format, difficulty=p.difficulty,
                                  granularity=p_cfg.granularity, exemplars=exemplars, system=p_cfg.system)
        prompt = apply_chat_template(tokenizer, messages) if tokenizer is not None else None
        base = {
            "problem_id": p.id, "source": p.source, "category": p.category, "difficulty": p.difficulty,
            "question": p.question, "gold_answer": p.answer, "verifier": p.verifier, "metadata": p.metadata,
            "format": resolve_format(p_cfg.format, p.difficulty), "granularity": str(p_cfg.granularity),
            "exemplar_ids": [e.id for e in exemplars], "prompt_messages": json.dumps(messages),
            "prompt": prompt, "teacher_model": cfg.teacher.model, "temperature": cfg.sampling.temperature,
        }
        for k in todo:
            rows.append({**base, "path_index": k, "seed": chain_seed(cfg.seed, p.id, k)})
    return rows


def finish_rows(rows: list[dict[str, Any]], max_tokens: int) -> list[dict[str, Any]]:
    """Engine outputs -> chain rows of CHAIN_SCHEMA: parsed, graded, with status and error."""
    out = []
    for row in rows:
        o = engine_output(row, max_tokens)
        chain = {name: row.get(name) for name in CHAIN_SCHEMA.names}
        chain.update(chain=o.text, prompt_tokens=o.prompt_tokens, output_tokens=o.output_tokens, gen_seconds=o.seconds,
                     finish_reason=o.finish_reason, error=o.error, steps=[], num_steps=0, answer=None,
                     answer_source="none", score=None, correct=None)
        if o.text is None:
            chain["status"] = ERROR
        else:
            parsed = parse_chain(o.text, row["format"])
            s = score(row["verifier"], row["gold_answer"], row["metadata"], parsed.answer)
            chain.update(steps=parsed.steps, num_steps=len(parsed.steps), answer=parsed.answer,
                         answer_source=parsed.answer_source, score=s,
                         correct=None if s is None else s >= CORRECT_AT,
                         status=OK if parsed.answer is not None else UNPARSED)
        out.append(chain)
    return out
