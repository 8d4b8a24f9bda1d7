"""Configuration of the hybrid server (`cotd serve`): the two models, how queries are routed
between them, limits, security and scaling. Loaded and checked like every cotd config."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from jobs.common.config import doc
from jobs.common.engine import MEMORY_SHARE_DOC
from jobs.common.raycluster import RayConfig


@dataclass(frozen=True)
class Scaling:
    min_replicas: int = doc("fewest replicas Serve keeps", 1)
    max_replicas: int = doc("most replicas Serve starts under load", 1)
    target_ongoing_requests: float = doc("requests per replica Serve's autoscaler aims at", 8.0)
    cpus: float = doc("CPUs each replica reserves (the engine's bundle on CPU)", 1.0)
    gpus: float = doc("GPUs each replica reserves (0: CPU)", 0.0)

    def check(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                             f"{self.min_replicas}, {self.max_replicas}")
        if self.target_ongoing_requests <= 0:
            raise ValueError(f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests}")

    def deployment_config(self) -> dict[str, Any]:
        """Ray Serve's autoscaling settings for a deployment."""
        return {"autoscaling_config": {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                       "initial_replicas": max(1, self.min_replicas),
                                       "target_ongoing_requests": self.target_ongoing_requests}}


@dataclass(frozen=True)
class ModelSpec:
    model: str | None = doc("packaged model name, local folder or hub id (vLLM inside Serve); null with `run` "
                            "or `base_url`", None)
    run: str | None = doc("a `cotd train` run directory: its merged student, prompted as it was trained", None)
    base_url: str | None = doc("an OpenAI-compatible endpoint instead of a deployment (a hosted large model)", None)
    served_model: str | None = doc("the model name requests to `base_url` carry (default: `model`)", None)
    api_key_env: str = doc("environment variable holding the endpoint's API key (unset: none)", "OPENAI_API_KEY")
    timeout_s: float = doc("longest wait for an answer before the router gives up on this model", 60.0)
    retries: int = doc("endpoint: retries on connection errors, 429 and 5xx", 2)
    max_model_len: int = doc("engine context length (prompt + output)", 2048)
    dtype: str = doc("engine dtype; auto: as for generation's teacher", "auto")
    gpu_memory_utilization: float | Literal["auto"] = doc(
        MEMORY_SHARE_DOC + "; auto: sized from the model (CPU: its weights, vLLM's runtime and a KV cache for 8 "
        "sequences of max_model_len, as a share of the machine's RAM; GPU: 0.9 of the GPU share)", "auto")
    engine_kwargs: dict[str, Any] = doc("further vLLM engine arguments", {})
    scaling: Scaling = doc("replicas and their resources", Scaling())
    format: Literal["pre", "post", "adaptive"] | None = doc("the CoT format it is prompted for (null: as trained, else pre)", None)
    granularity: int | str | None = doc("step granularity it is prompted for (null: as trained, else coarse)", None)

    def check(self) -> None:
        if sum(x is not None for x in (self.model, self.run, self.base_url)) != 1:
            raise ValueError("set exactly one of model, run and base_url")
        if self.base_url and not (self.model or self.served_model):
            raise ValueError("an endpoint (base_url) needs the model name it serves: set model or served_model")
        if self.timeout_s <= 0 or self.retries < 0:
            raise ValueError(f"timeout_s must be > 0 and retries >= 0, got {self.timeout_s}, {self.retries}")
        if self.gpu_memory_utilization != "auto" and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be auto or in (0, 1], got {self.gpu_memory_utilization}")


@dataclass(frozen=True)
class RuleConfig:
    teacher_categories: list[str] = doc("categories always answered by the teacher (the request's or a keyword's)", [])
    keywords: list[str] = doc("case-insensitive words or phrases that send a query to the teacher (high stakes)", [])
    honor_flag: bool = doc("a request with \"cotd\": {\"high_stakes\": true} goes to the teacher", True)


@dataclass(frozen=True)
class PolicyConfig:
    kind: Literal["confidence", "learned", "always_student", "always_teacher"] = doc(
        "confidence: escalate when the student's confidence is under a threshold; learned: a model fitted on the "
        "evaluation's items predicts whether the student is right; always_*: baselines", "confidence")
    signal: Literal["agreement", "logprob"] = doc(
        "confidence policy: agreement of k sampled student answers (one request with n=k) or the geometric mean "
        "probability of the greedy answer's tokens", "logprob")
    samples: int = doc("sampled student answers per query (n) where the policy reads their agreement (the agreement "
                       "signal, a learned router fitted on sampled answers), which then serves their vote; set it to "
                       "the k router.json was calibrated on", 4)
    threshold: float | None = doc("escalate below this confidence (null: from the calibration file)", None)
    calibration: str | None = doc("router.json written by `cotd serve calibrate` (thresholds, learned weights)", None)
    rules: RuleConfig = doc("queries that always go to the teacher, before the policy", RuleConfig())

    def check(self) -> None:
        if self.kind == "learned" and not self.calibration:
            raise ValueError("policy kind learned needs calibration: the router.json of `cotd serve calibrate`")
        if self.kind == "confidence" and self.threshold is None and not self.calibration:
            raise ValueError("policy kind confidence needs a threshold or a calibration file (`cotd serve calibrate`)")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")


@dataclass(frozen=True)
class LimitsConfig:
    max_request_bytes: int = doc("largest request body accepted", 1 << 20)
    max_tokens: int = doc("largest max_tokens a request may ask for (and the default)", 512)
    max_prompt_tokens: int = doc("longest prompt accepted, in the student's tokens (longer: 400 before any engine)", 1536)
    max_messages: int = doc("most chat messages in a request", 64)


@dataclass(frozen=True)
class DriftConfig:
    window: int = doc("queries per category in the rolling window", 200)
    max_confidence_drop: float = doc("warn (and set the drift gauge) when a category's mean student confidence "
                                     "falls this far below its calibration mean", 0.1)
    max_escalation_rise: float = doc("... or its escalation rate rises this far above the calibrated rate", 0.15)


def spec_of(value: "ModelSpec | str") -> "ModelSpec":
    """A model given as a plain string on the command line: a train run directory (its student),
    else a model reference."""
    if not isinstance(value, str):
        return value
    manifest = Path(value) / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("stage") == "train":
        return ModelSpec(run=value)
    return ModelSpec(model=value)


@dataclass(frozen=True)
class ServeConfig:
    student: ModelSpec | str = doc("the student: a `cotd train` run directory (its merged model, prompted as trained), "
                                   "or a spec")
    teacher: ModelSpec | str = doc("the teacher: a model reference to deploy, or a spec (an endpoint: base_url)")
    policy: PolicyConfig = doc("how queries are routed", PolicyConfig(threshold=0.5))
    fallback: Literal["student", "error"] = doc(
        "when the teacher fails or times out: answer with the student's answer (marked fallback) or a 503; with "
        "student, a routed query whose student fails or times out is answered by the teacher (marked)", "student")
    limits: LimitsConfig = doc("request limits", LimitsConfig())
    api_key_env: str | None = doc("environment variable holding the API key clients must send as Bearer (unset: open)",
                                  None)
    prices: dict[str, dict[str, float]] = doc("per-model price per million tokens for the cost estimate: "
                                              "{student: {input: .., output: ..}, teacher: {...}}", {})
    allow_request_overrides: bool = doc(
        "let a request choose its policy and fallback (\"cotd\": {\"policy\": {...}, \"fallback\": ...}): for comparing "
        "policies on one running deployment; keep it off where clients are not trusted", False)
    router_scaling: Scaling = doc("replicas of the router itself", Scaling(cpus=0.2))
    drift: DriftConfig = doc("drift monitoring against the calibration", DriftConfig())
    host: str = doc("HTTP host", "127.0.0.1")
    port: int = doc("HTTP port", 8000)
    name: str = doc("the Serve application's name (and route prefix /)", "cotd-hybrid")
    ray: RayConfig = doc("where to run", RayConfig())

    def __post_init__(self) -> None:
        object.__setattr__(self, "student", spec_of(self.student))
        object.__setattr__(self, "teacher", spec_of(self.teacher))

    def check(self) -> None:
        if self.student.base_url:
            raise ValueError("student: the student runs inside Serve (model or run), not behind base_url")
        if self.limits.max_tokens < 1 or self.limits.max_prompt_tokens < 1:
            raise ValueError("limits: max_tokens and max_prompt_tokens must be >= 1")
