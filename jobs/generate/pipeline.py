"""The generate stage's logic: plan one request row per (problem, path), build the teacher
processor (ray.data.llm), and turn engine outputs into graded chain rows.

`plan_rows` and `finish_rows` are plain functions (tested without Ray); `build_teacher` is the only
place that touches ray.data.llm.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from jobs.formats.parse import parse_chain
from jobs.formats.prompts import Exemplar, apply_chat_template, build_messages, select_exemplars
from jobs.formats.cot import resolve_format
from jobs.generate.config import GenerateConfig, SamplingConfig, TeacherConfig
from jobs.generate.schema import CHAIN_SCHEMA, ERROR, OK, UNPARSED
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


def sampling_params(s: SamplingConfig, seed: int | None) -> dict[str, Any]:
    params: dict[str, Any] = {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens, **s.extra}
    if seed is not None:
        params["seed"] = seed
    return params


class VLLMRequest:
    """preprocess for the vLLM processor: the engine's prompt and sampling parameters."""

    def __init__(self, sampling: SamplingConfig, seeded: bool):
        self.sampling, self.seeded = sampling, seeded

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"prompt": row["prompt"], "sampling_params": sampling_params(self.sampling, row["seed"] if self.seeded else None)}


class HTTPRequest:
    """preprocess for the HTTP processor: an OpenAI chat-completions payload."""

    def __init__(self, sampling: SamplingConfig, model: str, seeded: bool):
        self.sampling, self.model, self.seeded = sampling, model, seeded

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        payload = {"model": self.model, "messages": json.loads(row["prompt_messages"]),
                   **sampling_params(self.sampling, row["seed"] if self.seeded else None)}
        return {"payload": payload}


def engine_kwargs(t: TeacherConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {"dtype": t.dtype, "max_model_len": t.max_model_len,
                          "gpu_memory_utilization": t.gpu_memory_utilization,
                          "tensor_parallel_size": t.tensor_parallel_size}
    if not t.use_gpu:
        kw["enforce_eager"] = True  # no CUDA graphs on CPU
    kw.update(t.engine_kwargs)
    return kw


def build_teacher(cfg: GenerateConfig, model_path: str):
    """The ray.data.llm processor for the configured teacher."""
    from ray.data.llm import HttpRequestProcessorConfig, build_processor, vLLMEngineProcessorConfig

    t = cfg.teacher
    if t.backend == "openai":
        key = os.environ.get(t.api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        proc_cfg = HttpRequestProcessorConfig(
            url=t.base_url.rstrip("/") + "/chat/completions", headers=headers, qps=t.qps,
            max_retries=t.max_retries, concurrency=t.http_concurrency, batch_size=t.batch_size)
        return build_processor(proc_cfg, preprocess=HTTPRequest(cfg.sampling, t.served_model or t.model, t.seeds_to_engine()))
    placement = None
    if not t.use_gpu:
        placement = {"bundles": [{"CPU": t.cpus_per_replica}] * t.tensor_parallel_size}
    proc_cfg = vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs=engine_kwargs(t),
        concurrency=tuple(t.concurrency),
        batch_size=t.batch_size,
        max_concurrent_batches=t.max_concurrent_batches,
        accelerator_type=t.accelerator_type,
        placement_group_config=placement,
        should_continue_on_error=True,
        # Prompts arrive already templated (we store them), and vLLM returns text: the
        # chat-template, tokenize and detokenize stages would only add CPU actors.
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
    )
    return build_processor(proc_cfg, preprocess=VLLMRequest(cfg.sampling, t.seeds_to_engine()))


def engine_output(row: dict[str, Any], max_tokens: int) -> tuple[str | None, int, int, float, str, str]:
    """(text, prompt_tokens, output_tokens, seconds, finish_reason, error) from either processor."""
    err = row.get("__inference_error__") or ""
    if "http_response" in row and row["http_response"] is not None:
        resp = row["http_response"]
        # Arrow unifies response structs across a batch, so an absent field comes back as None
        if resp.get("error") or not resp.get("choices"):
            return None, 0, 0, 0.0, "error", f"teacher server: {json.dumps(resp.get('error') or resp, default=str)[:500]}"
        choice, usage = resp["choices"][0], resp.get("usage") or {}
        return (choice["message"].get("content") or "", int(usage.get("prompt_tokens") or 0),
                int(usage.get("completion_tokens") or 0), 0.0, choice.get("finish_reason") or "", "")
    if err:
        return None, 0, 0, 0.0, "error", str(err)[:2000]
    out_tokens = int(row.get("num_generated_tokens") or 0)
    seconds = float(row.get("time_taken_llm") or 0.0)
    return (row.get("generated_text") or "", int(row.get("num_input_tokens") or 0), out_tokens,
            max(seconds, 0.0), "length" if out_tokens >= max_tokens else "stop", "")


def finish_rows(rows: list[dict[str, Any]], max_tokens: int) -> list[dict[str, Any]]:
    """Engine outputs -> chain rows of CHAIN_SCHEMA: parsed, graded, with status and error."""
    out = []
    for row in rows:
        text, p_tok, o_tok, secs, finish, err = engine_output(row, max_tokens)
        chain = {name: row.get(name) for name in CHAIN_SCHEMA.names}
        chain.update(chain=text, prompt_tokens=p_tok, output_tokens=o_tok, gen_seconds=secs,
                     finish_reason=finish, error=err, steps=[], num_steps=0, answer=None,
                     answer_source="none", score=None, correct=None)
        if text is None:
            chain["status"] = ERROR
        else:
            parsed = parse_chain(text, row["format"])
            s = score(row["verifier"], row["gold_answer"], row["metadata"], parsed.answer)
            chain.update(steps=parsed.steps, num_steps=len(parsed.steps), answer=parsed.answer,
                         answer_source=parsed.answer_source, score=s,
                         correct=None if s is None else s >= CORRECT_AT,
                         status=OK if parsed.answer is not None else UNPARSED)
        out.append(chain)
    return out


class FinishBatch:
    """map_batches adapter around finish_rows (Arrow in, Arrow out)."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens

    def __call__(self, batch):
        import pyarrow as pa

        return pa.Table.from_pylist(finish_rows(batch.to_pylist(), self.max_tokens), schema=CHAIN_SCHEMA)
