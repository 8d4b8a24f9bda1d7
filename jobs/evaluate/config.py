"""Configuration of the evaluate stage (`cotd eval`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from jobs.common.config import doc, to_dict
from jobs.common.engine import ModelConfig, SamplingConfig
from jobs.common.raycluster import RayConfig
from jobs.formats.config import PromptConfig
from jobs.tasks.sources import Source

SUITE_KINDS = ("held_out", "general", "shifted")


@dataclass(frozen=True)
class Price:
    per_hour: float | None = doc("self-hosted: price of one device-hour (GPU, or a CPU machine)", None)
    devices: int = doc("self-hosted: devices one replica holds", 1)
    input_per_million: float | None = doc("hosted: price per million prompt tokens", None)
    output_per_million: float | None = doc("hosted: price per million output tokens", None)

    def check(self) -> None:
        hosted = self.input_per_million is not None or self.output_per_million is not None
        if hosted and self.per_hour is not None:
            raise ValueError("a price is either per hour (self-hosted) or per token (hosted), not both")
        for name in ("per_hour", "input_per_million", "output_per_million"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.devices < 1:
            raise ValueError(f"devices must be >= 1, got {self.devices}")


@dataclass(frozen=True)
class ModelEntry:
    name: str = doc("the model's label in the report")
    role: Literal["teacher", "base", "student", "other"] = doc("what it is: recovery is student / teacher, gain is student - base", "other")
    model: ModelConfig | None = doc("the engine (same keys as generate's teacher); null with `run`", None)
    run: str | None = doc("a `cotd train` run directory: the student it trained (merged, or base + adapter), "
                          "prompted as it was trained", None)
    adapter: str | None = doc("a PEFT LoRA adapter folder served on `model`'s engine (which also serves the base)", None)
    prompt: PromptConfig | None = doc("how it is prompted (null: as trained for a student, else the eval's `prompt`)", None)
    price: Price = doc("what a query costs", Price())

    def check(self) -> None:
        if (self.model is None) == (self.run is None):
            raise ValueError(f"model {self.name!r}: set exactly one of `model` and `run`")
        if self.adapter and self.run:
            raise ValueError(f"model {self.name!r}: `adapter` goes with `model` (a train `run` brings its own)")


@dataclass(frozen=True)
class Suite:
    name: str = doc("the suite's label in the report")
    sources: list[Source] = doc("where its problems come from (as in generate)")
    kind: Literal["held_out", "general", "shifted"] = doc(
        "held_out: the trained tasks on unseen problems; general: tasks outside the training mix (forgetting); "
        "shifted: the trained tasks under other templates or difficulty (template overfitting)", "held_out")

    def check(self) -> None:
        if not self.sources:
            raise ValueError(f"suite {self.name!r}: sources must list at least one problem source")


@dataclass(frozen=True)
class BootstrapConfig:
    samples: int = doc("bootstrap resamples for paired intervals", 2000)
    seed: int = doc("seed of the resampling", 0)
    confidence: float = doc("confidence level of every interval", 0.95)

    def check(self) -> None:
        if self.samples < 100:
            raise ValueError(f"samples must be >= 100, got {self.samples}")
        if not 0.5 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0.5, 1), got {self.confidence}")


@dataclass(frozen=True)
class EvalConfig:
    out_dir: str = doc("evaluation run directory: predictions/, items/, report.md, report.html, report.json, manifest.json")
    suites: list[Suite] = doc("problem suites: held-out problems of the trained tasks, general tasks, shifted templates")
    student: str | None = doc("a `cotd train` run directory: adds `student` (as trained), `base` (its base model, "
                              "prompted the same way) and, unless `teacher` is set, the teacher that wrote its chains", None)
    teacher: ModelConfig | None = doc("the teacher (null: from the student's lineage)", None)
    teacher_prompt: PromptConfig | None = doc("how the teacher is prompted (null: as in generation, from the lineage)", None)
    models: list[ModelEntry] = doc("further models, or all of them without `student`", [])
    prices: dict[str, Price] = doc("price by model name (teacher, base, student, ...)", {})
    engine: dict[str, Any] = doc("engine settings for models cotd derives (teacher, base, student): ModelConfig keys "
                                 "such as max_model_len, batch_size, use_gpu, dtype", {})
    prompt: PromptConfig = doc("how other models are prompted", PromptConfig(few_shot=0))
    sampling: SamplingConfig = doc("generation settings (temperature is 0 for the greedy answer)",
                                   SamplingConfig(temperature=0.8, top_p=0.95, max_tokens=512))
    lora_student: Literal["auto", "adapter", "merged"] = doc(
        "how a LoRA student runs: adapter (on its base model's engine, which also serves the base: one engine "
        "start), merged (its exported merged/ model on an engine of its own), auto: adapter on GPU engines, merged "
        "on CPU ones (vLLM's CPU build computes an unmerged adapter several times slower)", "auto")
    samples: int = doc("sampled answers per problem and model besides the greedy one, at sampling.temperature: "
                       "pass@k, majority@k and the agreement confidence (0: greedy only)", 0)
    sampled: list[str] | None = doc("the models (teacher, base, student or a `models` name) that get the `samples`; "
                                    "the others answer greedily only (a router reads only the student's agreement). "
                                    "null: all", None)
    logprobs: bool = doc("record each greedy answer's mean token log-probability (a confidence the router can use)", True)
    exclude: list[str] = doc("more datasets (chains or curated folders) the suites must not overlap", [])
    overlap: Literal["fail", "drop", "allow"] = doc(
        "a suite's questions found in the training data: fail (stop before anything runs), drop (leave them out of "
        "the suite, counted in the log; for tasks with few distinct problems), allow (evaluate them; not recommended)",
        "fail")
    bootstrap: BootstrapConfig = doc("intervals", BootstrapConfig())
    examples: int = doc("example chains shown side by side in the report", 3)
    cache: str | None = doc("predictions folder shared across evaluations (null: <out_dir>/predictions); "
                            "a model, prompt and sampling setup evaluated before is not evaluated again", None)
    seed: int = doc("seed of exemplar choice and sampled answers", 0)
    ray: RayConfig = doc("where to run", RayConfig())

    def check(self) -> None:
        if not self.suites:
            raise ValueError("suites must list at least one suite")
        names = [s.name for s in self.suites]
        if len(set(names)) != len(names):
            raise ValueError(f"suite names must be unique, got {names}")
        if self.student is None and not self.models:
            raise ValueError("nothing to evaluate: set `student` (a train run) or list `models`")
        labels = [m.name for m in self.models]
        if len(set(labels)) != len(labels):
            raise ValueError(f"model names must be unique, got {labels}")
        if self.samples < 0:
            raise ValueError(f"samples must be >= 0, got {self.samples}")
        if self.sampled is not None and not self.samples:
            raise ValueError(f"sampled lists {self.sampled} but samples is 0: set samples (k) too")
        if self.samples and self.sampling.temperature == 0:
            raise ValueError("samples > 0 with sampling.temperature 0 would repeat the greedy answer")
        if "model" in self.engine:
            raise ValueError("engine: the model comes from the lineage or the `models` list, not from engine settings")

    def samples_for(self, name: str) -> int:
        """The sampled answers model `name` gets besides its greedy one."""
        return self.samples if self.sampled is None or name in self.sampled else 0

    def fingerprint(self) -> dict[str, Any]:
        return {k: v for k, v in to_dict(self).items() if k not in ("out_dir", "ray", "cache")}
