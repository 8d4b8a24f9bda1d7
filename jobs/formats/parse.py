"""Reading a model's chain: its final answer and its steps. Pure functions, no model needed."""

from __future__ import annotations

import re
from dataclasses import dataclass

from jobs.formats.cot import REASONING_MARKER

_ANSWER_LINE = re.compile(r"^\s*(?:\*\*)?(?:final\s+)?answer(?:\*\*)?\s*[:：](?:\*\*)?\s*(.*)$", re.IGNORECASE | re.MULTILINE)
_STEP_MARK = re.compile(r"^\s*(?:\*\*)?step\s*\d+\s*(?:\*\*)?\s*[:.)-]\s*(?:\*\*)?", re.IGNORECASE | re.MULTILINE)
_NUMBERED = re.compile(r"^\s*\d+[.)]\s+", re.MULTILINE)


@dataclass(frozen=True)
class Parsed:
    answer: str | None   # the extracted final answer; None when the chain states none
    answer_source: str   # "boxed" | "marker" | "none"
    steps: list[str]


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j].strip()
    return None


def _clean(answer: str) -> str:
    answer = answer.strip()
    boxed = last_boxed(answer)
    if boxed is not None:
        answer = boxed
    answer = answer.strip().strip("*").strip()
    if answer.startswith("$") and answer.endswith("$") and len(answer) > 1:
        answer = answer.strip("$").strip()
    return answer.rstrip(".").rstrip()


def extract_answer(text: str, fmt: str = "pre") -> tuple[str | None, str]:
    """The final answer and where it was found. `pre` chains end with the answer, so the last
    marker line wins; `post` chains open with it, so the first one does. A \\boxed{} answer wins
    in `pre` when it comes after the last marker line."""
    lines = [m for m in _ANSWER_LINE.finditer(text) if m.group(1).strip()]
    marker = (lines[0] if fmt == "post" else lines[-1]) if lines else None
    boxed = last_boxed(text)
    if boxed is not None and (marker is None or (fmt != "post" and text.rfind("\\boxed") > marker.start())):
        return _clean(boxed) or None, "boxed"
    if marker is not None:
        answer = _clean(marker.group(1))
        return (answer or None), "marker" if answer else "none"
    return None, "none"


def split_steps(text: str) -> list[str]:
    """The chain's reasoning steps, answer lines and the format's markers left out. 'Step n:'
    markers win; else a numbered list; else non-empty lines; a single paragraph splits into
    sentences."""
    body = _ANSWER_LINE.sub("", text)
    body = body.replace(REASONING_MARKER, "")
    if len(_STEP_MARK.findall(body)) >= 1:
        parts = _STEP_MARK.split(body)[1:]
    elif len(_NUMBERED.findall(body)) >= 2:
        parts = _NUMBERED.split(body)[1:]
    else:
        parts = [ln for ln in body.splitlines() if ln.strip()]
        if len(parts) == 1:
            parts = re.split(r"(?<=[.!?])\s+(?=[A-Z0-9])", parts[0])
    return [" ".join(p.split()) for p in parts if p.strip()]


def first_answer_line(text: str) -> tuple[int, int] | None:
    """(start, end) of the first answer-marker line that states an answer, if any."""
    for m in _ANSWER_LINE.finditer(text):
        if m.group(1).strip():
            return m.start(), m.end()
    return None


def parse_chain(text: str, fmt: str = "pre") -> Parsed:
    answer, source = extract_answer(text, fmt)
    return Parsed(answer=answer, answer_source=source, steps=split_steps(text))

