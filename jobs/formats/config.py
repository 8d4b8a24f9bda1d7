"""How a model is prompted (`prompt` in generate, `prompt` and `teacher_prompt` in eval): the one
config of jobs.formats' choices, so every stage names them alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from jobs.common.config import doc
from jobs.formats.cot import check_granularity


@dataclass(frozen=True)
class PromptConfig:
    format: Literal["pre", "post", "adaptive"] = doc("pre: rationale then answer; post: answer then rationale; adaptive: post for easy problems", "pre")
    granularity: int | str = doc("coarse (at most 3 steps), fine (one operation per step) or a number of steps", "coarse")
    few_shot: int = doc("exemplars per prompt, drawn deterministically, never the problem itself", 2)
    exemplars: str | None = doc("JSONL pool of worked exemplars (null: the built-in pool)", None)
    system: str | None = doc("text placed before the format instruction in the system message", None)

    def check(self) -> None:
        check_granularity(self.granularity)
        if self.few_shot < 0:
            raise ValueError(f"few_shot must be >= 0, got {self.few_shot}")
