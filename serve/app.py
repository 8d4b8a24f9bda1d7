"""The hybrid server: a Ray Serve application with an OpenAI-compatible ingress that answers with
the distilled student and escalates to the teacher when the routing policy says so.

    student  ray.serve.llm's LLMServer (vLLM), the merged student, autoscaled
    teacher  another LLMServer, or an OpenAI-compatible endpoint (a hosted large model)
    router   this module's HybridRouter: FastAPI ingress, policy, metadata, metrics, limits

`build_app(cfg)` builds the application; `build({"config": FILE, ...})` is the application builder
`serve deploy serve/hybrid.yaml` imports. The student is prompted exactly as it was trained
(jobs.formats: the train run's format, granularity and system text).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import time
import uuid
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from serve.config import ModelSpec, ServeConfig
from serve.policies import STUDENT, TEACHER, Decision, Signals, decide, rule_decision, signal_value, votes

# Serve writes what the "ray.serve" logger says in a replica to that replica's log file (and its stderr)
logger = logging.getLogger("ray.serve")
HYBRID, STUDENT_ID, TEACHER_ID = "cotd-hybrid", "cotd-student", "cotd-teacher"


def deployment_prefix(role: str) -> str:
    """The prefix of a model deployment's name in Serve (`student:cotd-student`), by which
    serve.main.deploy_error also finds which deployment failed."""
    return f"{role}:"


fastapi_app = FastAPI(title="cotd hybrid router")


# --- what the models are and how they are prompted ----------------------------------------------

def resolve_spec(spec: ModelSpec, log=lambda *_: None) -> dict[str, Any]:
    """A model spec as the app needs it: {path, prompt, served_model} (path None for an endpoint).
    A train `run` gives its merged model and the prompt it was trained with."""
    from jobs.common.errors import DataError
    from jobs.common.models import resolve
    from jobs.common.runs import MANIFEST, read_json

    prompt = {"format": spec.format or "pre", "granularity": spec.granularity or "coarse", "system": None}
    if spec.run:
        manifest = Path(spec.run) / MANIFEST
        if not manifest.is_file():
            raise DataError(f"student.run: {spec.run} has no {MANIFEST} (is it a finished `cotd train` run?)")
        m = read_json(manifest)
        merged = Path(m["outputs"]["merged"])
        if not (merged / "config.json").is_file():
            raise DataError(f"student.run: {merged} holds no exported model")
        trained = m.get("student_prompt") or {}
        prompt = {"format": spec.format or trained.get("format") or "pre",
                  "granularity": spec.granularity or trained.get("granularity") or "coarse",
                  "system": trained.get("system")}
        return {"path": str(merged), "prompt": prompt, "served_model": STUDENT_ID}
    if spec.base_url:
        return {"path": None, "prompt": prompt, "served_model": spec.served_model or spec.model}
    return {"path": resolve(spec.model, log=log), "prompt": prompt, "served_model": None}


def messages_for(messages: list[dict[str, str]], prompt: dict[str, Any]) -> list[dict[str, str]]:
    """The request's chat with the model's own instruction first (format and granularity, as in
    training); the client's system text, if any, goes before it."""
    from jobs.formats.prompts import build_messages

    system = " ".join(m["content"] for m in messages if m["role"] == "system").strip() or None
    rest = [m for m in messages if m["role"] != "system"]
    head = build_messages("", fmt=prompt["format"], difficulty="default", granularity=prompt["granularity"],
                          exemplars=[], system=" ".join(x for x in (prompt.get("system"), system) if x) or None)[0]
    return [head, *rest]


def engine_config(spec: ModelSpec, path: str):
    """The engine settings of a deployed model (jobs.common.engine.ModelConfig), with
    `gpu_memory_utilization: auto` sized from the model; and how the share was chosen."""
    from jobs.common.engine import ModelConfig, auto_memory_share, engine_dtype

    mc = ModelConfig(model=path, use_gpu=spec.scaling.gpus > 0, dtype=spec.dtype, max_model_len=spec.max_model_len,
                     engine_kwargs=dict(spec.engine_kwargs))
    if spec.gpu_memory_utilization != "auto":
        return dataclasses.replace(mc, gpu_memory_utilization=spec.gpu_memory_utilization), "set in the config"
    share, why = auto_memory_share(path, engine_dtype(mc), spec.max_model_len, spec.scaling.gpus)
    return dataclasses.replace(mc, gpu_memory_utilization=share), f"auto: {why}"


def llm_config(spec: ModelSpec, model_id: str, path: str):
    """ray.serve.llm's LLMConfig for a deployed model: cotd's engine settings for this machine
    (dtype, memory share, CPU binding), Serve autoscaling, and on CPU a CPU accelerator and bundle
    (without them the deployment waits for GPUs)."""
    from ray.serve.llm import LLMConfig

    from jobs.common.engine import cpu_binding_env, engine_kwargs

    mc, _ = engine_config(spec, path)
    gpu = mc.use_gpu
    kw: dict[str, Any] = {"model_loading_config": {"model_id": model_id, "model_source": path},
                          "engine_kwargs": engine_kwargs(mc), "deployment_config": spec.scaling.deployment_config()}
    env = cpu_binding_env(mc)
    if env:
        kw["runtime_env"] = {"env_vars": env}
    if not gpu:
        kw["accelerator_config"] = {"kind": "cpu"}
        kw["placement_group_config"] = {"bundles": [{"CPU": spec.scaling.cpus}]}
    return LLMConfig(**kw)


# --- the router ------------------------------------------------------------------------------------

class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def error_response(e: HTTPError) -> JSONResponse:
    return JSONResponse(status_code=e.status, content={"error": {"message": e.message, "type": e.kind, "code": e.status}})


@fastapi_app.exception_handler(HTTPError)
async def _http_error(request: Request, e: HTTPError) -> JSONResponse:
    return error_response(e)


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def given(body: dict[str, Any], key: str, default: Any = None) -> Any:
    """A request field, where an explicit null means the default (as OpenAI's API reads it)."""
    value = body.get(key)
    return default if value is None else value


def number(body: dict[str, Any], key: str, default: float, ok, what: str) -> float:
    """A numeric request field (null: the default), checked: HTTPError naming the field otherwise."""
    value = given(body, key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not ok(value):
        raise HTTPError(400, f"{key} must be {what}, got {value!r}")
    return float(value)


def message_text(i: int, m: Any) -> dict[str, str]:
    """A chat message as the models read it: {role, content} with text content. A list of text
    parts is joined by newlines; other parts, tool turns and tool calls are refused."""
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        role = m.get("role") if isinstance(m, dict) else None
        raise HTTPError(400, f"messages[{i}] must be an object with role system, developer, user or assistant"
                             + (f", got role {role!r} (the router answers without tools)" if role else ""))
    content = m.get("content")
    if m.get("tool_calls") or m.get("function_call"):
        raise HTTPError(400, f"messages[{i}] holds tool calls; the router answers without tools")
    if isinstance(content, list) and content:
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise HTTPError(400, f"messages[{i}].content[{j}] is a {kind!r} part; the models read text parts only")
            texts.append(part["text"])
        content = "\n".join(texts)
    if not isinstance(content, str):
        raise HTTPError(400, f"messages[{i}] content must be a string or a list of text parts, got {type(content).__name__}")
    return {"role": ROLES[m["role"]], "content": content}


def check_request(body: Any, limits, models: set[str]) -> dict[str, Any]:
    """The request's fields, checked: HTTPError (4xx) naming what is wrong. Read: model, messages
    (text, or text parts), max_tokens (or max_completion_tokens), temperature, top_p, stop, n (1),
    stream, stream_options.include_usage and the `cotd` extension; tools and non-text response
    formats are refused; other OpenAI fields (seed, user, penalties, logprobs) are ignored."""
    if not isinstance(body, dict):
        raise HTTPError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HTTPError(400, "'messages' must be a non-empty list of {role, content} objects")
    if len(messages) > limits.max_messages:
        raise HTTPError(400, f"'messages' holds {len(messages)} messages; at most {limits.max_messages} are accepted")
    messages = [message_text(i, m) for i, m in enumerate(messages)]
    if messages[-1]["role"] != "user":
        raise HTTPError(400, "the last message must be the user's")
    model = body.get("model") or HYBRID  # null or "" (some clients send one): the routed model
    if model not in models:
        raise HTTPError(404, f"model {model!r} is not served here; models: {', '.join(sorted(models))}", "not_found_error")
    for key in ("tools", "functions"):
        if given(body, key):
            raise HTTPError(400, f"'{key}' is not supported: the router answers with text, without tools")
    response_format = given(body, "response_format", {"type": "text"})
    if not isinstance(response_format, dict) or response_format.get("type", "text") != "text":
        raise HTTPError(400, f"response_format must be {{\"type\": \"text\"}}, got {body.get('response_format')!r}: "
                             "the router answers with text")
    max_tokens = given(body, "max_tokens", given(body, "max_completion_tokens", limits.max_tokens))
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= limits.max_tokens:
        raise HTTPError(400, f"max_tokens must be an integer from 1 to {limits.max_tokens}, got {max_tokens!r}")
    if given(body, "n", 1) != 1:
        raise HTTPError(400, "n must be 1: the router returns one chosen answer")
    temperature = number(body, "temperature", 0.0, lambda x: 0 <= x <= 2, "a number from 0 to 2")
    sampling: dict[str, Any] = {}
    top_p = number(body, "top_p", 1.0, lambda x: 0 < x <= 1, "a number above 0 and at most 1")
    if top_p < 1:
        sampling["top_p"] = float(top_p)
    stop = given(body, "stop", [])
    stop = ([stop] if stop else []) if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(x, str) and x for x in stop)):
        raise HTTPError(400, f"stop must be a string or a list of at most 4 non-empty strings, got {body.get('stop')!r}")
    if stop:
        sampling["stop"] = stop
    options = given(body, "stream_options", {})
    if not isinstance(options, dict):
        raise HTTPError(400, "stream_options must be an object such as {\"include_usage\": true}")
    ext = given(body, "cotd", {})
    if not isinstance(ext, dict):
        raise HTTPError(400, "'cotd' must be an object such as {\"high_stakes\": true, \"category\": \"math\"}")
    overrides = {k: ext[k] for k in ("policy", "fallback") if k in ext}
    return {"messages": messages, "model": model, "max_tokens": max_tokens, "temperature": float(temperature),
            "sampling": sampling, "stream": bool(given(body, "stream", False)),
            "include_usage": bool(options.get("include_usage")), "high_stakes": bool(ext.get("high_stakes", False)),
            "category": ext.get("category"), "question": messages[-1]["content"], "overrides": overrides}


def answer_groups(texts: list[str], fmt: str) -> tuple[list[str | None], list[int], int]:
    """The answers read from the student's samples, their equivalence groups (as votes group them)
    and the index of the answer the vote picks (the first of its group), as the evaluation grades it."""
    from jobs.formats.parse import extract_answer
    from jobs.tasks.verify import vote, vote_groups

    answers = [extract_answer(t, fmt)[0] for t in texts]
    groups = vote_groups([a if a is not None else f"\x00unread{i}" for i, a in enumerate(answers)], "math")
    return answers, groups, groups.index(vote(groups))


def mean_logprob(choice: dict[str, Any]) -> float | None:
    content = (choice.get("logprobs") or {}).get("content") or []
    values = [t["logprob"] for t in content if t.get("logprob") is not None and math.isfinite(t["logprob"])]
    return sum(values) / len(values) if values else None


class Drift:
    """Rolling student confidence and escalation rate per category, against the calibration's."""

    def __init__(self, cfg, calibration: dict[str, Any] | None, signal: str):
        self.cfg, self.signal = cfg, signal
        self.baseline = (calibration or {}).get("by_category", {})
        self.conf: dict[str, deque] = defaultdict(lambda: deque(maxlen=cfg.window))
        self.esc: dict[str, deque] = defaultdict(lambda: deque(maxlen=cfg.window))
        self.alarm: dict[str, bool] = {}

    def observe(self, category: str, confidence: float | None, escalated: bool) -> dict[str, Any]:
        if confidence is not None:
            self.conf[category].append(confidence)
        self.esc[category].append(escalated)
        conf = sum(self.conf[category]) / len(self.conf[category]) if self.conf[category] else None
        rate = sum(self.esc[category]) / len(self.esc[category])
        base = self.baseline.get(category) or {}
        base_conf = (base.get("confidence") or {}).get(self.signal)
        base_rate = (base.get("escalated") or {}).get(self.signal)
        drifted = len(self.esc[category]) >= min(20, self.cfg.window) and (
            (conf is not None and base_conf is not None and base_conf - conf > self.cfg.max_confidence_drop)
            or (base_rate is not None and rate - base_rate > self.cfg.max_escalation_rise))
        if drifted and not self.alarm.get(category):
            logger.warning("cotd drift: category %s: student confidence %.3f (calibrated %s), escalation rate %.3f "
                           "(calibrated %s) over the last %d queries", category, conf if conf is not None else float("nan"),
                           base_conf, rate, base_rate, len(self.esc[category]))
        self.alarm[category] = drifted
        return {"confidence": conf, "escalation_rate": rate, "drifted": drifted}


class HybridRouter:
    """The ingress deployment: checks each request, asks the student, decides, escalates, answers
    with OpenAI's response shape plus a `cotd` field saying who answered and why."""

    def __init__(self, cfg: dict[str, Any], student=None, teacher=None):
        from ray.serve.metrics import Counter, Gauge, Histogram
        from transformers import AutoTokenizer

        from jobs.common.config import build

        self.cfg = build(ServeConfig, cfg["serve"], source="serve config")
        self.student_prompt, self.teacher_prompt = cfg["student_prompt"], cfg["teacher_prompt"]
        self.teacher_endpoint = cfg.get("teacher_endpoint")
        self.student, self.teacher = student, teacher
        self.tokenizer = AutoTokenizer.from_pretrained(cfg["student_path"])
        self.template_tokens = template_overhead(self._prompt_tokens, messages_for([], self.student_prompt)[0])
        self.calibration = cfg.get("calibration")
        p = self.cfg.policy
        self.threshold = p.threshold if p.threshold is not None else (
            ((self.calibration or {}).get("thresholds", {}).get(p.signal) or {}).get("threshold"))
        if p.kind == "confidence" and self.threshold is None:
            raise ValueError(f"the calibration has no threshold for signal {p.signal!r}")
        self.api_key = os.environ.get(self.cfg.api_key_env) if self.cfg.api_key_env else None
        if self.cfg.api_key_env and not self.api_key:
            raise ValueError(f"api_key_env {self.cfg.api_key_env!r} is set but the variable is empty")
        self.drift = Drift(self.cfg.drift, self.calibration, p.signal)
        self.m_requests = Counter("cotd_requests_total", "requests by answering model and route",
                                  tag_keys=("model", "route"))
        self.m_escalations = Counter("cotd_escalations_total", "queries escalated to the teacher, by reason",
                                     tag_keys=("reason",))
        self.m_latency = Histogram("cotd_request_latency_ms", "request latency by path",
                                   boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000],
                                   tag_keys=("path",))
        self.m_tokens = Counter("cotd_tokens_total", "tokens by model and kind", tag_keys=("model", "kind"))
        self.m_cost = Counter("cotd_cost_usd_total", "estimated cost by model", tag_keys=("model",))
        self.m_errors = Counter("cotd_errors_total", "requests answered with an error, by status", tag_keys=("status",))
        self.g_conf = Gauge("cotd_student_confidence", "rolling mean student confidence", tag_keys=("category",))
        self.g_rate = Gauge("cotd_escalation_rate", "rolling escalation rate", tag_keys=("category",))
        self.g_drift = Gauge("cotd_drift", "1 when a category's confidence or escalation moved past its bound",
                             tag_keys=("category",))

    # -- endpoints --
    @fastapi_app.get("/health")
    async def health(self):
        return {"status": "ok"}

    @fastapi_app.get("/v1/models")
    async def models(self, request: Request):
        self._auth(request)
        now = int(time.time())
        return {"object": "list", "data": [{"id": m, "object": "model", "created": now, "owned_by": "cotd"}
                                           for m in (HYBRID, STUDENT_ID, TEACHER_ID)]}

    @fastapi_app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        started = time.perf_counter()
        try:
            self._auth(request)
            raw = await request.body()
            if len(raw) > self.cfg.limits.max_request_bytes:
                raise HTTPError(413, f"the request is {len(raw)} bytes; at most {self.cfg.limits.max_request_bytes} are accepted")
            try:
                body = json.loads(raw)
            except json.JSONDecodeError as e:
                raise HTTPError(400, f"the request body is not valid JSON: {e.msg} at character {e.pos}") from None
            req = check_request(body, self.cfg.limits, {HYBRID, STUDENT_ID, TEACHER_ID})
            req["policy"], req["fallback"], req["threshold"], req["warnings"] = self._overrides(req.pop("overrides"))
            req["student_messages"] = messages_for(req["messages"], self.student_prompt)
            req["model_seconds"] = 0.0
            limit = self.cfg.limits.max_prompt_tokens
            # counting tokens costs a chat template and a tokenizer pass per request: only done
            # when the bound from the prompt's bytes does not already prove the prompt fits
            if prompt_token_bound(req["student_messages"], self.template_tokens) > limit and \
                    (prompt_tokens := self._prompt_tokens(req["student_messages"])) > limit:
                raise HTTPError(400, f"the prompt is {prompt_tokens} tokens; at most {self.cfg.limits.max_prompt_tokens} "
                                     "are accepted")
            return await self._answer(req, started)
        except HTTPError as e:
            self.m_errors.inc(tags={"status": str(e.status)})
            return error_response(e)

    def _prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        return len(self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                      return_dict=False))

    def _overrides(self, overrides: dict[str, Any]):
        """The request's policy, fallback, threshold and warnings: the config's, or the request's own
        where `allow_request_overrides` lets it choose (400 otherwise, or when they do not check)."""
        if not overrides:
            return self.cfg.policy, self.cfg.fallback, self.threshold, []
        if not self.cfg.allow_request_overrides:
            raise HTTPError(400, "this server does not let requests choose their policy or fallback "
                                 "(allow_request_overrides is off)")
        from jobs.common.config import ConfigError, build, to_dict
        from serve.config import PolicyConfig

        try:
            policy = build(PolicyConfig, {**to_dict(self.cfg.policy), **(overrides.get("policy") or {})},
                           source="the request's cotd.policy")
        except (ConfigError, TypeError) as e:
            raise HTTPError(400, str(e)) from None
        fallback = overrides.get("fallback", self.cfg.fallback)
        if fallback not in ("student", "error"):
            raise HTTPError(400, f"cotd.fallback must be student or error, got {fallback!r}")
        threshold = policy.threshold if policy.threshold is not None else (
            ((self.calibration or {}).get("thresholds", {}).get(policy.signal) or {}).get("threshold"))
        return policy, fallback, threshold, [w for w in (samples_warning(policy, self.calibration),) if w]

    def _auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {self.api_key}":
            raise HTTPError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error")

    # -- routing --
    async def _answer(self, req: dict[str, Any], started: float) -> Any:
        p = req["policy"]
        decision: Decision | None = None
        if req["model"] == TEACHER_ID:
            decision = Decision(TEACHER, "requested", "direct")
        elif req["model"] == STUDENT_ID:
            decision = Decision(STUDENT, "requested", "direct")
        else:
            decision = rule_decision(req["question"], req["category"], req["high_stakes"], p.rules)
        if decision is not None and decision.target == TEACHER:
            # known before the student is asked: the teacher's answer can stream as it is written
            return await self._teacher_reply(req, decision, None, started)
        k = p.samples if decision is None and votes(p.kind, p.signal, (self.calibration or {}).get("learned")) else 1
        try:
            student = await self._student(req, k)
        except HTTPError as e:
            if req["model"] != HYBRID or e.status < 500 or req["fallback"] != "student":
                raise
            # the student is down or slow: the teacher answers in its place, once (if it fails too, a 503)
            logger.warning("cotd student unavailable: %s", e.message)
            req["fallback"] = "error"
            decision = Decision(TEACHER, "fallback:student_unavailable", p.kind, details={"error": e.message})
            return await self._teacher_reply(req, decision, None, started)
        signals = Signals(question=req["question"], category=req["category"], answers=tuple(student["answers"]),
                          agreement=student["agreement"], token_confidence=student["token_confidence"])
        if decision is None:
            decision = decide(p.kind, signals, signal=p.signal, threshold=req["threshold"],
                              learned=(self.calibration or {}).get("learned"))
        category = req["category"] or "?"
        drift = self.drift.observe(category, signal_value(signals, p.signal), decision.target == TEACHER)
        self.g_drift.set(1.0 if drift["drifted"] else 0.0, tags={"category": category})
        self.g_rate.set(drift["escalation_rate"], tags={"category": category})
        if drift["confidence"] is not None:
            self.g_conf.set(drift["confidence"], tags={"category": category})
        if decision.target == TEACHER:
            return await self._teacher_reply(req, decision, (student, signals), started)
        return self._reply(req, STUDENT, student, decision, signals, started)

    async def _student(self, req: dict[str, Any], k: int) -> dict[str, Any]:
        """The student's answer(s): one request with n=k (sampled when k > 1), log-probabilities on."""
        from ray.serve.llm.openai_api_models import ChatCompletionRequest

        from jobs.evaluate.metrics import agreement

        temperature = req["temperature"] if k == 1 else max(req["temperature"], 0.7)
        body = ChatCompletionRequest(model=STUDENT_ID, messages=req["student_messages"],
                                     max_tokens=req["max_tokens"], temperature=temperature, n=k, logprobs=True,
                                     stream=False, **req["sampling"])
        t0 = time.perf_counter()
        try:
            resp = await asyncio.wait_for(self._first(self.student, body), self.cfg.student.timeout_s)
        except asyncio.TimeoutError:
            raise HTTPError(503, f"the student did not answer within {self.cfg.student.timeout_s:g}s", "server_error") from None
        except (HTTPError, asyncio.CancelledError):
            raise
        except Exception as e:  # the replica died, the handle failed
            raise HTTPError(503, f"the student failed: {type(e).__name__}: {e}", "server_error") from None
        finally:
            req["model_seconds"] += time.perf_counter() - t0
        choices = resp["choices"]
        texts = [c["message"].get("content") or "" for c in choices]
        answers, groups, chosen = answer_groups(texts, self.student_prompt["format"])
        lp = mean_logprob(choices[chosen])
        return {"text": texts[chosen], "answers": [answers[chosen]] + [a for i, a in enumerate(answers) if i != chosen],
                "agreement": agreement(groups) if k > 1 else None,
                "token_confidence": math.exp(lp) if lp is not None else None, "usage": resp.get("usage") or {},
                "finish_reason": choices[chosen].get("finish_reason") or "stop"}

    @staticmethod
    async def _first(handle, body) -> dict[str, Any]:
        """The non-streaming response of an LLMServer deployment, as a dict; HTTPError on its errors."""
        async for out in handle.options(stream=True).chat.remote(body):
            data = out.model_dump() if hasattr(out, "model_dump") else out
            if isinstance(data, list):
                data = data[0]
            if error := model_error(data):
                raise error
            return data
        raise HTTPError(502, "the model returned nothing", "server_error")

    async def _teacher_reply(self, req, decision: Decision, student: tuple | None, started: float):
        """The teacher's answer (live-streamed when the decision came before the student), or on
        failure the configured fallback: the student's answer, marked, or a 503."""
        if decision.reason != "requested":
            self.m_escalations.inc(tags={"reason": decision.reason})
        messages = messages_for(req["messages"], self.teacher_prompt)
        try:
            if req["stream"] and student is None and self.teacher is not None:
                return await self._teacher_stream(req, messages, decision, started)
            t0 = time.perf_counter()
            try:
                resp = await asyncio.wait_for(self._teacher_call(req, messages), self.cfg.teacher.timeout_s)
            finally:
                req["model_seconds"] += time.perf_counter() - t0
            choice = resp["choices"][0]
            answer = {"text": choice["message"].get("content") or "", "usage": resp.get("usage") or {},
                      "finish_reason": choice.get("finish_reason") or "stop"}
            return self._reply(req, TEACHER, answer, decision, student[1] if student else None, started)
        except (asyncio.TimeoutError, HTTPError, OSError, RuntimeError) as e:
            why = f"the teacher did not answer within {self.cfg.teacher.timeout_s:g}s" if isinstance(e, asyncio.TimeoutError) \
                else f"the teacher failed: {getattr(e, 'message', None) or e}"
            logger.warning("cotd teacher unavailable: %s", why)
            if req["fallback"] == "student" and req["model"] == HYBRID:
                if student is None:
                    s = await self._student(req, 1)
                    signals = Signals(question=req["question"], category=req["category"], answers=tuple(s["answers"]),
                                      token_confidence=s["token_confidence"])
                    student = (s, signals)
                fallback = Decision(STUDENT, "fallback:teacher_unavailable", decision.policy, decision.confidence,
                                    decision.threshold, {"escalation_reason": decision.reason, "error": why})
                return self._reply(req, STUDENT, student[0], fallback, student[1], started)
            if decision.reason == "fallback:student_unavailable":
                raise HTTPError(503, f"{why}, and before it {decision.details['error']}", "server_error") from None
            raise HTTPError(503, f"{why}; no fallback is configured", "server_error") from None

    async def _teacher_call(self, req, messages) -> dict[str, Any]:
        if self.teacher is not None:
            from ray.serve.llm.openai_api_models import ChatCompletionRequest

            body = ChatCompletionRequest(model=TEACHER_ID, messages=messages, max_tokens=req["max_tokens"],
                                         temperature=req["temperature"], stream=False, **req["sampling"])
            return await self._first(self.teacher, body)
        return await endpoint_chat(self.teacher_endpoint, messages,
                                   {"max_tokens": req["max_tokens"], "temperature": req["temperature"], **req["sampling"]})

    async def _teacher_stream(self, req, messages, decision, started):
        """The teacher's answer streamed as it is written; its usage (asked for always) goes into the
        metadata, the metrics and, when the client asked for it, the usage chunk. The first chunk is
        awaited here, within the teacher's timeout, so that a teacher that is down or fails gets the
        fallback; a teacher that stalls later ends the stream with an error event, never a hang."""
        from ray.serve.llm.openai_api_models import ChatCompletionRequest

        body = ChatCompletionRequest(model=TEACHER_ID, messages=messages, max_tokens=req["max_tokens"],
                                     temperature=req["temperature"], stream=True,
                                     stream_options={"include_usage": True}, **req["sampling"])
        gen = self.teacher.options(stream=True).chat.remote(body)
        timeout = self.cfg.teacher.timeout_s

        async def following() -> list[dict[str, Any]]:
            try:
                return stream_events(await asyncio.wait_for(gen.__anext__(), timeout))
            except (asyncio.TimeoutError, HTTPError, StopAsyncIteration):
                raise
            except Exception as e:  # the replica died, the handle failed: what the fallback is for
                raise HTTPError(502, f"{type(e).__name__}: {e}", "server_error") from None

        try:
            first = await following()
            if first and (error := model_error(first[0])):
                raise error
        except StopAsyncIteration:
            raise HTTPError(502, "the model returned nothing", "server_error") from None
        except BaseException:
            gen.cancel()
            raise

        async def events():
            usage: dict[str, Any] = {}
            batch = first
            try:
                while True:
                    for data in batch:
                        if data.get("usage") and not data.get("choices"):
                            usage = data["usage"]
                            continue  # the usage chunk comes last, after the metadata
                        data["model"] = req["model"]
                        data.pop("usage", None)
                        yield f"data: {json.dumps(data)}\n\n"
                    try:
                        batch = await following()
                    except StopAsyncIteration:
                        break
            except (asyncio.TimeoutError, HTTPError) as e:
                gen.cancel()
                why = f"the teacher stopped answering for {timeout:g}s" if isinstance(e, asyncio.TimeoutError) \
                    else f"the teacher failed mid-answer: {e.message}"
                logger.warning("cotd teacher stream ended: %s", why)
                self.m_errors.inc(tags={"status": "504"})
                yield f"data: {json.dumps({'error': {'message': why, 'type': 'server_error', 'code': 504}})}\n\n"
                yield "data: [DONE]\n\n"
                return
            except (GeneratorExit, asyncio.CancelledError):  # the client went away: the teacher stops too
                gen.cancel()
                raise
            meta = self._meta(TEACHER, decision, None, usage, started, warnings=req["warnings"])
            self._record(req, meta)
            yield f"data: {json.dumps({'object': 'chat.completion.chunk', 'choices': [], 'cotd': meta})}\n\n"
            if req["include_usage"]:
                yield f"data: {json.dumps({'object': 'chat.completion.chunk', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # -- answers --
    def _meta(self, model: str, decision: Decision, signals: Signals | None, usage: dict, started: float,
              model_seconds: float | None = None, warnings: list[str] = ()) -> dict[str, Any]:
        """The response's `cotd` field. `router_ms`: the time spent in the router itself (the latency
        less the time waiting for models), where the models' answers are complete; `warnings`: what
        the request chose that its calibration does not back."""
        prices = self.cfg.prices.get(model) or {}
        elapsed = time.perf_counter() - started
        cost = ((usage.get("prompt_tokens") or 0) * prices.get("input", 0.0)
                + (usage.get("completion_tokens") or 0) * prices.get("output", 0.0)) / 1e6
        return {"answered_by": model, "reason": decision.reason, "policy": decision.policy,
                "confidence": decision.confidence, "threshold": decision.threshold,
                "signals": None if signals is None else {"agreement": signals.agreement,
                                                         "token_confidence": signals.token_confidence,
                                                         "answers": list(signals.answers)},
                "details": decision.details, "tokens": usage, "estimated_cost_usd": cost,
                "latency_ms": round(1000 * elapsed, 1),
                "router_ms": None if model_seconds is None else round(1000 * (elapsed - model_seconds), 2),
                "warnings": list(warnings)}

    def _record(self, req, meta: dict[str, Any]) -> None:
        """An answered request (its `cotd` metadata) in the metrics and, as one JSON line, in the
        router's log."""
        model, usage = meta["answered_by"], meta["tokens"]
        self.m_requests.inc(tags={"model": model, "route": meta["policy"]})
        self.m_latency.observe(meta["latency_ms"], tags={"path": model})
        for kind in ("prompt_tokens", "completion_tokens"):
            if usage.get(kind):
                self.m_tokens.inc(usage[kind], tags={"model": model, "kind": kind})
        if meta["estimated_cost_usd"]:
            self.m_cost.inc(meta["estimated_cost_usd"], tags={"model": model})
        logger.info(json.dumps({"event": "cotd.request", "model": req["model"], **{k: meta[k] for k in (
            "answered_by", "reason", "policy", "confidence", "threshold", "tokens", "estimated_cost_usd", "latency_ms")}}))

    def _reply(self, req, model: str, answer: dict[str, Any], decision: Decision, signals: Signals | None, started: float):
        """The chosen answer ({text, usage, finish_reason}) as a chat completion, or streamed in pieces
        with the metadata on the last chunk (and the usage after it when the client asked)."""
        text, usage, finish = answer["text"], answer["usage"], answer.get("finish_reason") or "stop"
        meta = self._meta(model, decision, signals, usage, started, req["model_seconds"], req["warnings"])
        self._record(req, meta)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": req["model"]}
        if req["stream"]:
            # the answer is chosen already: it streams now, in pieces, with the metadata last
            def chunk(choices, **extra) -> str:
                return f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': choices, **extra})}\n\n"

            async def events():
                for i in range(0, len(text), 16):
                    delta = ({"role": "assistant"} if i == 0 else {}) | {"content": text[i:i + 16]}
                    yield chunk([{"index": 0, "delta": delta, "finish_reason": None}])
                yield chunk([{"index": 0, "delta": {}, "finish_reason": finish}], cotd=meta)
                if req["include_usage"]:
                    yield chunk([], usage=usage)
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return JSONResponse({**head, "object": "chat.completion",
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                             "usage": usage, "cotd": meta})


def model_error(data: Any) -> HTTPError | None:
    """The error an LLMServer answered with instead of a completion, as an HTTPError; else None."""
    if isinstance(data, dict) and "error" in data and not data.get("choices"):
        err = data["error"] if isinstance(data["error"], dict) else {"message": data["error"]}
        return HTTPError(int(err.get("code") or 500), f"model error: {err.get('message')}", "server_error")
    return None


def stream_events(out: Any) -> list[dict[str, Any]]:
    """The JSON events in one item of an LLMServer's stream (SSE text, a response model, or a list)."""
    events = []
    for chunk in (out if isinstance(out, list) else [out]):
        text = chunk if isinstance(chunk, str) else f"data: {json.dumps(chunk.model_dump())}\n\n"
        events += [json.loads(line[len("data: "):]) for line in text.splitlines()
                   if line.startswith("data: ") and line != "data: [DONE]"]
    return events


def template_overhead(count, head: dict[str, str]) -> tuple[int, int, int]:
    """What the chat template adds around the messages' contents, measured once on the model's own
    template: (tokens of the instruction and generation prompt with one empty user turn, tokens
    each further empty turn adds, the instruction's bytes)."""
    one = count([head, {"role": "user", "content": ""}])
    three = count([head, {"role": "user", "content": ""}, {"role": "assistant", "content": ""},
                   {"role": "user", "content": ""}])
    return one, max(1, -(-(three - one) // 2)), len(head["content"].encode())


def prompt_token_bound(messages: list[dict[str, str]], overhead: tuple[int, int, int]) -> int:
    """An upper bound on the prompt's token count, without tokenizing: a byte-level or
    byte-fallback tokenizer never makes more tokens of a text than it has UTF-8 bytes, plus one
    for a word-start marker; the template adds `overhead` (the bare instruction counted exactly,
    a client's system text merged into it counted by its bytes)."""
    fixed, per, head_bytes = overhead
    head, *rest = messages
    system = max(0, len(head["content"].encode()) - head_bytes) + 1
    return fixed + system + sum(len(m["content"].encode()) + per + 1 for m in rest)


async def endpoint_chat(endpoint: dict[str, Any], messages, sampling: dict[str, Any]) -> dict[str, Any]:
    """A chat completion from an OpenAI-compatible endpoint, with retries on connection errors,
    429 and 5xx (the router's own timeout bounds the whole call)."""
    import httpx

    headers = {"Authorization": f"Bearer {endpoint['api_key']}"} if endpoint.get("api_key") else {}
    payload = {"model": endpoint["model"], "messages": messages, **sampling}
    last = "no attempt"
    async with httpx.AsyncClient(timeout=endpoint["timeout_s"]) as client:
        for attempt in range(endpoint["retries"] + 1):
            try:
                r = await client.post(endpoint["base_url"].rstrip("/") + "/chat/completions", json=payload, headers=headers)
                if r.status_code < 400:
                    return r.json()
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                if r.status_code not in (429,) and r.status_code < 500:
                    break
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
            await asyncio.sleep(min(2.0, 0.25 * 2 ** attempt))
    raise HTTPError(502, f"the teacher endpoint failed: {last}", "server_error")


# --- building the application ----------------------------------------------------------------------

def samples_warning(policy, calibration: dict[str, Any] | None) -> str | None:
    """What is wrong when a policy that votes asks for another k than its calibration was fitted on
    (agreement moves in steps of 1/k): said at start for the config, in the metadata for a request."""
    k = (calibration or {}).get("samples")
    if not k or k == policy.samples or not votes(policy.kind, policy.signal, calibration.get("learned")):
        return None
    return (f"policy.samples={policy.samples} but the router was calibrated on {k} samples per query: agreement moves "
            f"in steps of 1/k, so its threshold escalates another share of queries; set policy.samples={k}")


def build_app(cfg: ServeConfig, log=lambda *_: None):
    """The Serve application: the router bound to the student's (and the teacher's) deployment."""
    from ray import serve
    from ray.serve.llm import build_llm_deployment

    from jobs.common.runs import read_json

    student = resolve_spec(cfg.student, log)
    teacher = resolve_spec(cfg.teacher, log)
    calibration = read_json(cfg.policy.calibration) if cfg.policy.calibration else None
    if warning := samples_warning(cfg.policy, calibration):
        log(f"warning: {warning} ({cfg.policy.calibration})")
    from jobs.common.config import to_dict

    router_cfg = {"serve": to_dict(cfg), "student_prompt": student["prompt"], "teacher_prompt": teacher["prompt"],
                  "student_path": student["path"], "calibration": calibration}
    shares = {}
    for role, spec, resolved in (("student", cfg.student, student), ("teacher", cfg.teacher, teacher)):
        if resolved["path"] is not None:
            mc, why = engine_config(spec, resolved["path"])
            shares[role] = 0.0 if mc.use_gpu else mc.gpu_memory_utilization
            log(f"{role}: gpu_memory_utilization {mc.gpu_memory_utilization:g} ({why})")
    if sum(shares.values()) > 0.9:
        log(f"warning: on one machine the CPU engines' memory shares add up to {sum(shares.values()):.2f} of its RAM "
            "(student.gpu_memory_utilization + teacher.gpu_memory_utilization): both fit only on separate nodes")
    student_app = build_llm_deployment(llm_config(cfg.student, STUDENT_ID, student["path"]), name_prefix=deployment_prefix("student"))
    teacher_app = None
    if cfg.teacher.base_url:
        router_cfg["teacher_endpoint"] = {"base_url": cfg.teacher.base_url, "model": teacher["served_model"],
                                          "api_key": os.environ.get(cfg.teacher.api_key_env),
                                          "timeout_s": cfg.teacher.timeout_s, "retries": cfg.teacher.retries}
    else:
        teacher_app = build_llm_deployment(llm_config(cfg.teacher, TEACHER_ID, teacher["path"]), name_prefix=deployment_prefix("teacher"))
    s = cfg.router_scaling
    actor: dict[str, Any] = {"num_cpus": s.cpus}
    if cfg.api_key_env:
        # read here, where `cotd serve` runs, and handed to the router's replicas in their environment
        key = os.environ.get(cfg.api_key_env)
        if not key:
            from jobs.common.errors import CotdError

            raise CotdError(f"api_key_env: the variable {cfg.api_key_env} is not set (clients must send its value as "
                            "a Bearer token); set it, or leave api_key_env out for an open server")
        actor["runtime_env"] = {"env_vars": {cfg.api_key_env: key}}
    router = serve.deployment(serve.ingress(fastapi_app)(HybridRouter), name="router",
                              ray_actor_options=actor, **s.deployment_config())
    return router.bind(router_cfg, student_app, teacher_app)


def build(args: dict[str, Any]):
    """The application builder `serve deploy` imports: args {config: FILE, overrides: [key=value]}."""
    from jobs.common.config import load_config

    cfg = load_config(ServeConfig, args.get("config"), list(args.get("overrides") or []))
    return build_app(cfg)
