"""Configuration of the generate stage (`cotd generate`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jobs.common.config import doc, to_dict
from jobs.common.engine import ModelConfig, SamplingConfig
from jobs.common.raycluster import RayConfig
from jobs.formats.config import PromptConfig
from jobs.tasks.sources import Source


@dataclass(frozen=True)
class GenerateConfig:
    out_dir: str = doc("run directory; chains go to <out_dir>/chains, the manifest next to them")
    teacher: ModelConfig = doc("the teacher model and how it runs")
    sources: list[Source] = doc("where problems come from (reasoning_gym, jsonl, parquet, hf)")
    paths_per_problem: int = doc("reasoning chains sampled per problem", 4)
    seed: int = doc("seed for exemplar choice and per-chain seeds", 0)
    sampling: SamplingConfig = doc("sampling parameters", SamplingConfig())
    prompt: PromptConfig = doc("prompt format", PromptConfig())
    write_rows: int = doc("rows per Parquet part file (smaller: finer-grained resume)", 64)
    overwrite: bool = doc("delete chains already in out_dir instead of resuming", False)
    ray: RayConfig = doc("where to run", RayConfig())

    def check(self) -> None:
        if self.paths_per_problem < 1:
            raise ValueError(f"paths_per_problem must be >= 1, got {self.paths_per_problem}")
        if not self.sources:
            raise ValueError("sources must list at least one problem source")
        if self.write_rows < 1:
            raise ValueError(f"write_rows must be >= 1, got {self.write_rows}")
        if self.paths_per_problem > 1 and self.sampling.temperature == 0:
            raise ValueError("paths_per_problem > 1 with sampling.temperature 0 would give identical paths")

    def fingerprint(self) -> dict[str, Any]:
        """What makes chains comparable: a resumed run must match it."""
        return {"teacher": self.teacher.model, "served_model": self.teacher.served_model,
                "sampling": to_dict(self.sampling), "prompt": to_dict(self.prompt), "seed": self.seed}
