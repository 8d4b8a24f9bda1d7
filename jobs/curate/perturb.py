"""Controlled damage to a chain's steps, for the structure experiments (`examples.perturb`): which
part of a rationale a student needs. Pure and deterministic: the same chain and seed give the same
steps. The final answer is never touched, so the example stays correct.

  delete_steps     drop `fraction` of the steps (at least one step stays)
  insert_noise     insert `fraction` x as many steps taken from unrelated worked problems
  corrupt_numbers  replace every number in the steps by another of the same size: wrong details,
                   the same structure
"""

from __future__ import annotations

import functools
import random
import re

from jobs.formats.prompts import load_exemplars
from jobs.tasks.problem import rank_key

PERTURBATIONS = ("none", "delete_steps", "insert_noise", "corrupt_numbers")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?")


def _rng(seed: int, ident: str) -> random.Random:
    return random.Random(rank_key(seed, ident))


def delete_steps(steps: list[str], fraction: float, rng: random.Random) -> list[str]:
    drop = min(len(steps) - 1, round(fraction * len(steps)))
    if drop <= 0:
        return list(steps)
    gone = set(rng.sample(range(len(steps)), drop))
    return [s for i, s in enumerate(steps) if i not in gone]


@functools.cache
def noise_pool() -> tuple[str, ...]:
    """Steps of the built-in worked exemplars: fluent reasoning about other problems."""
    return tuple(s for e in load_exemplars() for s in e.steps)


def insert_noise(steps: list[str], fraction: float, rng: random.Random, pool) -> list[str]:
    out = list(steps)
    for _ in range(round(fraction * len(steps))):
        out.insert(rng.randint(0, len(out)), rng.choice(pool))
    return out


def corrupt_numbers(steps: list[str], rng: random.Random) -> list[str]:
    def other(m: re.Match) -> str:
        text = m.group(0)
        whole, _, frac = text.partition(".")
        lo = 10 ** (len(whole) - 1) if len(whole) > 1 else 0
        value = text
        while value == text:
            value = str(rng.randint(lo, 10 ** len(whole) - 1)) + (("." + "".join(str(rng.randint(0, 9)) for _ in frac))
                                                                   if frac else "")
        return value

    return [_NUMBER.sub(other, s) for s in steps]


def perturb(steps: list[str], kind: str, fraction: float, seed: int, ident: str, pool: list[str] | None = None) -> list[str]:
    """`steps` damaged as `kind` says; `ident` (the chain's key) seeds the choice."""
    if kind == "none":
        return list(steps)
    rng = _rng(seed, ident)
    if kind == "delete_steps":
        return delete_steps(steps, fraction, rng)
    if kind == "insert_noise":
        return insert_noise(steps, fraction, rng, pool if pool is not None else noise_pool())
    if kind == "corrupt_numbers":
        return corrupt_numbers(steps, rng)
    raise ValueError(f"unknown perturbation {kind!r} (expected one of {', '.join(PERTURBATIONS)})")
