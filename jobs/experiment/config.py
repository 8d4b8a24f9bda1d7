"""Configuration of an experiment (`cotd experiment`): one setup, its variants, what to compare."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.common.config import doc
from jobs.common.raycluster import RayConfig
from jobs.pipeline.config import StageOverrides


@dataclass(frozen=True)
class Variant:
    name: str = doc("the variant's label in the table")
    description: str = doc("what the variant changes, in words", "")
    curate: list[str] = doc("key=value overrides of the curate config for this variant", [])
    train: list[str] = doc("key=value overrides of the train config for this variant", [])
    eval: list[str] = doc("key=value overrides of the eval config for this variant", [])

    def check(self) -> None:
        for item in (*self.curate, *self.train, *self.eval):
            if "=" not in item:
                raise ValueError(f"variant {self.name!r}: override {item!r} is not key=value")

    def overrides(self) -> StageOverrides:
        return StageOverrides(curate=list(self.curate), train=list(self.train), eval=list(self.eval))


@dataclass(frozen=True)
class ExperimentConfig:
    out_dir: str = doc("experiment directory: <variant>/{curated,student,eval}, report.md, report.json (and "
                       "generate/, eval-cache/ unless shared)")
    generate: str = doc("the generate config file: the teacher's chains, made once for every variant")
    curate: str = doc("the curate config file every variant starts from")
    train: str = doc("the train config file every variant starts from")
    eval: str = doc("the eval config file every variant is evaluated with")
    variants: list[Variant] = doc("the variants, each a set of overrides")
    overrides: StageOverrides = doc("overrides for every variant", StageOverrides())
    generate_dir: str | None = doc("where the teacher's chains go (null: <out_dir>/generate); experiments that share "
                                   "it share their chains", None)
    variants_dir: str | None = doc("where the variants' run directories go (null: out_dir); experiments that share it "
                                   "and name a variant alike (with the same settings) train it once", None)
    eval_cache: str | None = doc("the predictions cache of every variant's evaluation (null: <out_dir>/eval-cache); "
                                 "experiments that share it evaluate the teacher and the base once", None)
    baseline: str | None = doc("the variant the others are compared with (default: the first)", None)
    claim: str = doc("the published claim the experiment tests, quoted in the report", "")
    ray: RayConfig = doc("where to run", RayConfig())

    def check(self) -> None:
        names = [v.name for v in self.variants]
        if len(names) < 2:
            raise ValueError("variants: an experiment compares at least two variants")
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        if any(not n.replace("_", "").replace("-", "").isalnum() for n in names):
            raise ValueError(f"variant names are folder names: letters, digits, - and _ only, got {names}")
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"baseline {self.baseline!r} is not a variant ({', '.join(names)})")

    def baseline_name(self) -> str:
        return self.baseline or self.variants[0].name
