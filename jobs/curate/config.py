"""Configuration of the curate stage (`cotd curate`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from jobs.common.config import doc, to_dict
from jobs.common.engine import ModelConfig, SamplingConfig
from jobs.common.raycluster import RayConfig
from jobs.formats.cot import check_granularity
from jobs.tasks.sources import GymSource, GymTask, Source


@dataclass(frozen=True)
class StructureConfig:
    min_steps: int = doc("fewest reasoning steps a chain may have", 1)
    max_steps: int = doc("most reasoning steps a chain may have (before any coarsening)", 40)
    min_chars: int = doc("shortest chain, in characters", 20)
    max_chars: int = doc("longest chain, in characters", 8000)
    max_repeat_fraction: float = doc("drop chains whose word 4-grams repeat more than this fraction (loops)", 0.35)
    min_alnum_fraction: float = doc("drop chains whose non-space characters are less than this fraction letters or digits (garbage)", 0.5)
    drop_truncated: bool = doc("drop chains the engine cut off at max_tokens", True)

    def check(self) -> None:
        if not 0 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 0 <= min_steps <= max_steps, got {self.min_steps} and {self.max_steps}")
        if not 0 <= self.min_chars <= self.max_chars:
            raise ValueError(f"need 0 <= min_chars <= max_chars, got {self.min_chars} and {self.max_chars}")
        for name in ("max_repeat_fraction", "min_alnum_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class CorrectnessConfig:
    mode: Literal["auto", "gold", "consistency", "off"] = doc(
        "auto: the gold answer where a problem has one, else self-consistency; gold: only problems with a "
        "gold answer; consistency: majority answer across paths; off: keep wrong chains too", "auto")
    min_agreement: float = doc("self-consistency: share of a problem's answered paths that must agree with the majority", 0.5)
    min_votes: int = doc("self-consistency: fewest answered paths needed to call a majority", 2)

    def check(self) -> None:
        if not 0 < self.min_agreement <= 1:
            raise ValueError(f"min_agreement must be in (0, 1], got {self.min_agreement}")
        if self.min_votes < 1:
            raise ValueError(f"min_votes must be >= 1, got {self.min_votes}")


@dataclass(frozen=True)
class DiversityConfig:
    near_duplicate: float = doc("chains of one problem whose word 3-gram Jaccard similarity reaches this collapse to one (1.0: exact duplicates only)", 0.8)
    max_paths: int = doc("distinct paths kept per problem (best judged first)", 4)

    def check(self) -> None:
        if not 0 < self.near_duplicate <= 1:
            raise ValueError(f"near_duplicate must be in (0, 1], got {self.near_duplicate}")
        if self.max_paths < 1:
            raise ValueError(f"max_paths must be >= 1, got {self.max_paths}")


@dataclass(frozen=True)
class JudgeConfig:
    enabled: bool = doc("rate each surviving chain with a judge model", True)
    model: ModelConfig | None = doc("the judge (same keys as generate's teacher); null: the teacher that wrote the chains, judging itself", None)
    sampling: SamplingConfig = doc("judge sampling", SamplingConfig(temperature=0.0, top_p=1.0, max_tokens=160))
    rule: Literal["threshold", "fraction"] = doc("threshold: drop chains rated below min_score; fraction: drop the lowest-rated drop_fraction", "threshold")
    min_score: float = doc("threshold rule: lowest overall rating kept (1-10)", 6.0)
    drop_fraction: float = doc("fraction rule: share of judged chains dropped, lowest first", 0.3)
    unparsed: Literal["drop", "keep"] = doc("what to do with a chain whose judgement cannot be read (unclear self-evaluations)", "drop")
    write_rows: int = doc("judgements per Parquet part file", 64)

    def check(self) -> None:
        if not 1 <= self.min_score <= 10:
            raise ValueError(f"min_score must be in [1, 10], got {self.min_score}")
        if not 0 <= self.drop_fraction < 1:
            raise ValueError(f"drop_fraction must be in [0, 1), got {self.drop_fraction}")
        if self.write_rows < 1:
            raise ValueError(f"write_rows must be >= 1, got {self.write_rows}")


@dataclass(frozen=True)
class PerturbConfig:
    kind: Literal["none", "delete_steps", "insert_noise", "corrupt_numbers"] = doc(
        "damage the teacher's steps before they become targets (structure experiments): drop a fraction of them, "
        "insert unrelated steps, or replace every number (the answer is kept)", "none")
    fraction: float = doc("delete_steps: share of steps dropped; insert_noise: noise steps per step", 0.67)
    seed: int = doc("seed of which steps and numbers are chosen", 0)

    def check(self) -> None:
        if not 0 <= self.fraction <= 10:
            raise ValueError(f"fraction must be in [0, 10], got {self.fraction}")


@dataclass(frozen=True)
class ExampleConfig:
    format: Literal["pre", "post", "adaptive"] = doc("pre: rationale then answer; post: answer then rationale; adaptive: post for easy problems", "pre")
    granularity: int | str = doc("student steps: coarse (merge to at most 3, for students under ~3B), fine (keep the teacher's), or a number", "coarse")
    system: str | None = doc("text placed before the format instruction in the student's system message", None)
    self_eval: bool = doc("also emit the judge's readable ratings as examples, so the student learns to evaluate reasoning", True)
    perturb: PerturbConfig = doc("controlled damage to the steps (experiments)", PerturbConfig())

    def check(self) -> None:
        check_granularity(self.granularity)


# The offline default of general data: reasoning-gym tasks outside the reasoning categories,
# answered directly (no chain), so the student keeps answering plain requests plainly.
GENERAL_DEFAULT = [GymSource(type="reasoning_gym", tasks=[
    GymTask(name="spell_backward", size=200, seed=7, category="general"),
    GymTask(name="word_sorting", size=200, seed=7, category="general")])]


@dataclass(frozen=True)
class MixConfig:
    sources: list[Source] = doc("general (non-reasoning) data mixed in against forgetting: question -> response pairs "
                                "(default: reasoning-gym word tasks, offline)", GENERAL_DEFAULT)
    ratio: float = doc("general examples per reasoning example", 0.2)

    def check(self) -> None:
        if self.ratio < 0:
            raise ValueError(f"ratio must be >= 0, got {self.ratio}")
        if self.ratio > 0 and not self.sources:
            raise ValueError("ratio > 0 needs at least one source (or set ratio: 0)")


@dataclass(frozen=True)
class CurateConfig:
    chains: str = doc("the chains dataset: generate's <out_dir>/chains folder (or its out_dir)")
    out_dir: str = doc("curation run directory: train/, val/, decisions/, judgements/, report.md, report.png, manifest.json")
    structure: StructureConfig = doc("structural checks", StructureConfig())
    correctness: CorrectnessConfig = doc("correctness filter", CorrectnessConfig())
    diversity: DiversityConfig = doc("duplicate collapse and paths per problem", DiversityConfig())
    judge: JudgeConfig = doc("teacher self-evaluation pass", JudgeConfig())
    examples: ExampleConfig = doc("training example format", ExampleConfig())
    mix: MixConfig = doc("general data against forgetting", MixConfig())
    val_fraction: float = doc("share of problems (with all their paths) in the validation split", 0.1)
    seed: int = doc("seed of the split and of the general-data sample", 0)
    ray: RayConfig = doc("where to run", RayConfig())

    def check(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    def fingerprint(self) -> dict[str, Any]:
        """What decides the curated outputs besides the chains themselves (whose digest the
        manifest records): every setting but where it runs and where files go."""
        return {k: v for k, v in to_dict(self).items() if k not in ("chains", "out_dir", "ray")}

    def judge_fingerprint(self, judge_model: str | None) -> dict[str, Any]:
        """What makes stored judgements reusable (with the rubric's text): judgements made under
        another judge or sampling go to another folder, never mixed into a resumed run."""
        return {"judge": judge_model, "sampling": to_dict(self.judge.sampling)}
