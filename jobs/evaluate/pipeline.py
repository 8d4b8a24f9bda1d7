"""The evaluate stage's logic: one request row per (model, problem, sample) and the graded
prediction row of each answer. Plain functions, tested without Ray; jobs.common.batch runs them.

Sample 0 is the greedy answer (temperature 0): accuracy is computed from it. Samples 1..k are drawn
at the sampling temperature: pass@k, majority@k and the agreement confidence.
"""

from __future__ import annotations

import json
from typing import Any

from jobs.common.batch import engine_output
from jobs.common.schemas import ERROR, OK, PREDICTION_SCHEMA, UNPARSED
from jobs.formats.cot import resolve_format
from jobs.formats.parse import parse_chain
from jobs.formats.prompts import Exemplar, apply_chat_template, build_messages, select_exemplars
from jobs.generate.pipeline import chain_seed
from jobs.tasks.problem import Problem
from jobs.tasks.verify import is_correct


def plan_rows(target, key: str, suite: str, kind: str, problems: list[Problem], samples: int, temperature: float,
              seed: int, pool: list[Exemplar], tokenizer: Any | None, skip: set[tuple] = frozenset()) -> list[dict[str, Any]]:
    """Request rows for one target on one suite: sample 0 greedy, 1..samples sampled, the keys in
    `skip` (target key, problem id, sample index) left out. `tokenizer` applies the engine's chat
    template (None for an HTTP model)."""
    rows = []
    spec = target.prompt
    for p in problems:
        todo = [i for i in range(samples + 1) if (key, p.id, i) not in skip]
        if not todo:
            continue
        exemplars = select_exemplars(pool, problem_id=p.id, question=p.question, category=p.category,
                                     k=spec.few_shot, seed=seed)
        messages = build_messages(p.question, fmt=spec.format, difficulty=p.difficulty,
                                  granularity=spec.granularity, exemplars=exemplars, system=spec.system)
        base = {"target": target.name, "target_key": key, "role": target.role, "suite": suite, "suite_kind": kind,
                "problem_id": p.id, "source": p.source, "category": p.category, "difficulty": p.difficulty,
                "question": p.question, "gold_answer": p.answer, "verifier": p.verifier, "metadata": p.metadata,
                "format": resolve_format(spec.format, p.difficulty), "prompt_messages": json.dumps(messages),
                "prompt": apply_chat_template(tokenizer, messages) if tokenizer is not None else None}
        # ray.data.llm serves a row whose `model` is not the engine's own with that LoRA adapter; every
        # row names one, so rows of several models can share a batch
        base["model"] = target.adapter or target.engine.model
        for i in todo:
            rows.append({**base, "sample_index": i, "temperature": 0.0 if i == 0 else temperature,
                         "seed": chain_seed(seed, f"{key}|{p.id}", i)})
    return rows


def route_base_rows(rows: list[dict[str, Any]], base_model: str, identity: str) -> list[dict[str, Any]]:
    """The rows that ask the engine's base model (`model` is the engine's own), sent through the
    `identity` adapter instead: vLLM's CPU build was seen to apply the LoRA weights of a batch's
    other requests to a base-model request in the same batch, and LoRA requests each get their own."""
    return [{**r, "model": identity} if r.get("model") == base_model else r for r in rows]


def finish_predictions(rows: list[dict[str, Any]], max_tokens: int) -> list[dict[str, Any]]:
    """Engine outputs -> PREDICTION_SCHEMA rows: the answer read in the prompt's format and graded
    by the problem's verifier; `format_failure` when no answer could be read."""
    out = []
    for row in rows:
        o = engine_output(row, max_tokens)
        pred = {name: row.get(name) for name in PREDICTION_SCHEMA.names}
        pred.update(output=o.text, prompt_tokens=o.prompt_tokens, output_tokens=o.output_tokens,
                    gen_seconds=o.seconds, finish_reason=o.finish_reason, error=o.error,
                    mean_logprob=o.mean_logprob, answer=None, answer_source="none", correct=None)
        if o.text is None:
            pred["status"] = ERROR
        else:
            parsed = parse_chain(o.text, row["format"])
            pred.update(answer=parsed.answer, answer_source=parsed.answer_source,
                        correct=is_correct(row["verifier"], row["gold_answer"], row["metadata"], parsed.answer),
                        status=OK if parsed.answer is not None else UNPARSED)
        pred["format_failure"] = pred["status"] == UNPARSED
        out.append(pred)
    return out
