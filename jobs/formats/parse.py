"""Reading a model's chain: its final answer and its steps. Pure functions, no model needed.

An answer is stated on a marker line (`Answer: x`, `**Final answer:** x`, `### Answer: x`), on the
line after an empty marker (`Answer:` then `x`), or in a `\\boxed{x}`. Whatever wraps it (bold,
`$...$`, `\\(...\\)`, `\\boxed{}`, `\\text{}`, quotes) and whatever sentence punctuation ends it is
peeled off in any order (`clean_answer`), so `**12**.`, `$7$.` and `\\boxed{$12$}` all read as 12.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from jobs.formats.cot import REASONING_MARKER

# A marker line, matched within one line: `[ \t]` never crosses a line end, so an empty `Answer:`
# does not take the next line's text as its own (that is `_answer_spans`' decision, made knowingly).
# Groups: the bold opening the line (`**Answer:** x` closes it after the colon), the text after it.
_ANSWER_LINE = re.compile(
    r"^[ \t>#-]*(\*\*|__)?[ \t]*(?:final[ \t]+)?answer(?:[ \t]+is)?[ \t]*(?:\*\*|__)?[ \t]*[:：](.*)$",
    re.IGNORECASE | re.MULTILINE)
_STEP_MARK = re.compile(r"^\s*(?:\*\*)?step\s*\d+\s*(?:\*\*)?\s*[:.)-]\s*(?:\*\*)?", re.IGNORECASE | re.MULTILINE)
_NUMBERED = re.compile(r"^\s*\d+[.)]\s+", re.MULTILINE)
# a line that belongs to the chain's structure, never an answer on its own line
_STRUCTURE_LINE = re.compile(rf"^\s*(?:\*\*)?(?:step\s*\d+|{re.escape(REASONING_MARKER.rstrip(':'))}\s*[:：])",
                             re.IGNORECASE)

_TRAILING_PUNCT = ".,;:!?。"
_PAIRS = (("**", "**"), ("__", "__"), ("*", "*"), ("_", "_"), ("`", "`"), ("$$", "$$"), ("$", "$"),
          ("\\(", "\\)"), ("\\[", "\\]"), ('"', '"'), ("'", "'"), ("“", "”"))
_LATEX_WRAPPERS = re.compile(r"^\\(?:boxed|fbox|text|textbf|mathrm|mbox)\s*\{(.*)\}$", re.DOTALL)


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


def _balanced(inner: str) -> bool:
    depth = 0
    for ch in inner:
        depth += ch == "{"
        depth -= ch == "}"
        if depth < 0:
            return False
    return depth == 0


def clean_answer(answer: str) -> str:
    """The answer without what wraps it or ends it: whitespace, sentence punctuation, markdown
    emphasis, math delimiters, \\boxed/\\text, quotes; peeled from the outside in, in any order,
    until nothing changes. A leading dot or sign is part of the number and stays (`.5`, `-4`)."""
    a = answer.strip()
    while True:
        before = a
        a = a.rstrip(_TRAILING_PUNCT).strip()
        for left, right in _PAIRS:
            inner = a[len(left):len(a) - len(right)]
            # `$x$ + $y$` is not one wrapped answer: the inner text must not hold the delimiters
            if len(a) >= len(left) + len(right) and a.startswith(left) and a.endswith(right) \
                    and left not in inner and right not in inner:
                a = inner.strip()
                break
        m = _LATEX_WRAPPERS.match(a)
        if m and _balanced(m.group(1)):
            a = m.group(1).strip()
        if a == before:
            return a


def _marker_text(m: re.Match) -> str:
    """A marker line's answer text; a bold that opened the line closes after the colon."""
    value = m.group(2).strip()
    if m.group(1) and not m.group(0).split(":", 1)[0].rstrip().endswith(m.group(1)) and value.startswith(m.group(1)):
        value = value[len(m.group(1)):].strip()
    return value


def _answer_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, answer) of every stated answer: a marker line with its text, or an empty marker
    line together with the next non-empty line when that line is not part of the chain's structure
    (a step or the reasoning marker)."""
    spans = []
    for m in _ANSWER_LINE.finditer(text):
        value = _marker_text(m)
        if value:
            spans.append((m.start(), m.end(), value))
            continue
        rest = text[m.end():]
        nxt = re.match(r"\s*\n([^\n]*)", rest)
        if nxt and nxt.group(1).strip() and not _STRUCTURE_LINE.match(nxt.group(1)) \
                and not _ANSWER_LINE.match(nxt.group(1)):
            spans.append((m.start(), m.end() + nxt.end(), nxt.group(1).strip()))
        else:
            spans.append((m.start(), m.end(), ""))  # an empty marker: removed from the steps, states nothing
    return spans


def extract_answer(text: str, fmt: str = "pre") -> tuple[str | None, str]:
    """The final answer and where it was found. `pre` chains end with the answer, so the last
    stated answer wins; `post` chains open with it, so the first one does. A \\boxed{} answer wins
    in `pre` when it comes after the last marker line."""
    stated = [s for s in _answer_spans(text) if clean_answer(s[2])]
    marker = (stated[0] if fmt == "post" else stated[-1]) if stated else None
    boxed = last_boxed(text)
    if boxed is not None and (marker is None or (fmt != "post" and text.rfind("\\boxed") > marker[0])):
        answer = clean_answer(boxed)
        if answer:
            return answer, "boxed"
    if marker is not None:
        return clean_answer(marker[2]), "marker"
    return None, "none"


def split_steps(text: str) -> list[str]:
    """The chain's reasoning steps, answer lines and the format's markers left out. 'Step n:'
    markers win; else a numbered list; else non-empty lines; a single paragraph splits into
    sentences."""
    body, last = [], 0
    for start, end, _ in _answer_spans(text):
        body.append(text[last:start])
        last = end
    body = "".join(body + [text[last:]]).replace(REASONING_MARKER, "")
    if _STEP_MARK.search(body):
        parts = _STEP_MARK.split(body)[1:]
    elif len(_NUMBERED.findall(body)) >= 2:
        parts = _NUMBERED.split(body)[1:]
    else:
        parts = [ln for ln in body.splitlines() if ln.strip()]
        if len(parts) == 1:
            parts = re.split(r"(?<=[.!?])\s+(?=[A-Z0-9])", parts[0])
    return [" ".join(p.split()) for p in parts if p.strip()]


def first_answer_line(text: str) -> tuple[int, int] | None:
    """(start, end) of the first stated answer (its marker line, and its own line if it has one)."""
    for start, end, value in _answer_spans(text):
        if clean_answer(value):
            return start, end
    return None


def parse_chain(text: str, fmt: str = "pre") -> Parsed:
    answer, source = extract_answer(text, fmt)
    return Parsed(answer=answer, answer_source=source, steps=split_steps(text))
