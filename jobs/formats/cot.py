"""CoT formats and step granularity: the one definition that generation, curation, training and
serving all use, so a student is trained on exactly the shape it is later prompted with.

  pre       rationale first, then the answer ("Step 1: ... Step n: ...", then "Answer: x")
  post      answer first, then the rationale ("Answer: x", then "Reasoning:" and the steps)
  adaptive  per problem: `post` for problems whose difficulty label is in ADAPTIVE_POST, else `pre`

Granularity is "coarse" (at most COARSE_STEPS steps), "fine" (one operation per step) or a
target number of steps.
"""

from __future__ import annotations

from typing import Literal, Union

CotFormat = Literal["pre", "post", "adaptive"]
Granularity = Union[Literal["coarse", "fine"], int]

COARSE_STEPS = 3
ADAPTIVE_POST = ("easy", "trivial")
ANSWER_MARKER = "Answer:"
REASONING_MARKER = "Reasoning:"


def resolve_format(fmt: str, difficulty: str) -> Literal["pre", "post"]:
    """The concrete format for one problem."""
    if fmt == "adaptive":
        return "post" if difficulty.lower() in ADAPTIVE_POST else "pre"
    if fmt not in ("pre", "post"):
        raise ValueError(f"unknown CoT format {fmt!r} (expected pre, post or adaptive)")
    return fmt  # type: ignore[return-value]


def check_granularity(value: object) -> None:
    if value in ("coarse", "fine"):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"granularity must be 'coarse', 'fine' or a number of steps >= 1, got {value!r}")


def target_steps(granularity: Granularity) -> int | None:
    """How many steps a chain should have at most (None: as many as it needs)."""
    check_granularity(granularity)
    if granularity == "fine":
        return None
    return COARSE_STEPS if granularity == "coarse" else int(granularity)


def instruction(fmt: Literal["pre", "post"], granularity: Granularity) -> str:
    """The system instruction that asks the teacher for this format and granularity."""
    n = target_steps(granularity)
    if granularity == "fine":
        steps = "Break the solution into many small steps, one operation or fact per step"
    elif granularity == "coarse":
        steps = f"Use at most {n} short, high-level steps"
    else:
        steps = f"Use exactly {n} steps"
    layout = ("Write each step on its own line as 'Step 1: ...', 'Step 2: ...'. "
              f"{steps}.")
    if fmt == "pre":
        return ("Solve the problem by reasoning step by step. " + layout +
                f" After the steps, end with a final line of the form '{ANSWER_MARKER} <final answer>'.")
    return (f"Give the final answer first, on a line of the form '{ANSWER_MARKER} <final answer>'. "
            f"Then write '{REASONING_MARKER}' and explain how you got it. " + layout)


def regroup_steps(steps: list[str], target: int | None) -> list[str]:
    """Merge adjacent steps into at most `target` groups of near-equal size (earlier groups take the
    extra step). Deterministic; never splits a step; `None` keeps the steps as they are."""
    steps = [s.strip() for s in steps if s.strip()]
    if target is None or len(steps) <= target:
        return steps
    size, extra = divmod(len(steps), target)
    out, i = [], 0
    for g in range(target):
        n = size + (1 if g < extra else 0)
        out.append(" ".join(steps[i:i + n]))
        i += n
    return out


def render_solution(steps: list[str], answer: str, fmt: Literal["pre", "post"]) -> str:
    """The assistant text for a chain in the given format: what the student is trained to write."""
    body = "\n".join(f"Step {i}: {s}" for i, s in enumerate(steps, 1))
    if fmt == "pre":
        return f"{body}\n{ANSWER_MARKER} {answer}" if body else f"{ANSWER_MARKER} {answer}"
    return f"{ANSWER_MARKER} {answer}\n{REASONING_MARKER}\n{body}" if body else f"{ANSWER_MARKER} {answer}"
