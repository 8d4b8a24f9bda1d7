"""Configuration of a pipeline (`cotd run`): the stage configs it chains and where their outputs go."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.common.config import doc
from jobs.common.raycluster import RayConfig


@dataclass(frozen=True)
class StageOverrides:
    generate: list[str] = doc("key=value overrides of the generate config", [])
    curate: list[str] = doc("key=value overrides of the curate config", [])
    train: list[str] = doc("key=value overrides of the train config", [])
    eval: list[str] = doc("key=value overrides of the eval config", [])

    def check(self) -> None:
        for item in (*self.generate, *self.curate, *self.train, *self.eval):
            if "=" not in item:
                raise ValueError(f"override {item!r} is not key=value")

    def plus(self, other: "StageOverrides") -> "StageOverrides":
        return StageOverrides(*(getattr(self, s) + getattr(other, s) for s in ("generate", "curate", "train", "eval")))


@dataclass(frozen=True)
class PipelineConfig:
    out_dir: str = doc("run directory: generate/ (the chains), curated/, student/, eval/, summary.md, manifest.json")
    generate: str = doc("the generate config file")
    curate: str = doc("the curate config file")
    train: str = doc("the train config file")
    eval: str | None = doc("the eval config file (null: stop after training)", None)
    overrides: StageOverrides = doc("key=value overrides per stage", StageOverrides())
    generate_dir: str | None = doc("where the teacher's chains go (null: <out_dir>/generate); pipelines that share "
                                   "it share their chains", None)
    eval_cache: str | None = doc("predictions cache shared with other evaluations (null: <out_dir>/eval/predictions)", None)
    ray: RayConfig = doc("where to run", RayConfig())
