"""Problem sources: reasoning-gym generators, JSONL/Parquet files, Hugging Face datasets.

Each source config has a `type` tag; `load_problems` turns a list of them into `Problem`s with
stable ids, checking the input as it goes and naming the file, line and field of any fault.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Union

from jobs.common.config import doc
from jobs.common.errors import CotdError
from jobs.tasks.problem import VERIFIERS, Problem, stable_id

# reasoning-gym task -> cotd reasoning category. Tasks not listed fall back to the name of the
# reasoning-gym package they live in (arithmetic -> math, logic -> logic, ...).
GYM_CATEGORIES = {
    "calendar_arithmetic": "temporal",
    "time_intervals": "temporal",
    "family_relationships": "logic",
}
GYM_PACKAGE_CATEGORIES = {"arithmetic": "math", "algebra": "math", "geometry": "math", "probability": "math"}


@dataclass(frozen=True)
class GymTask:
    name: str = doc("reasoning-gym task name, e.g. chain_sum, calendar_arithmetic, syllogism")
    size: int = doc("number of problems to draw", 10)
    seed: int = doc("reasoning-gym seed: the same seed gives the same problems", 42)
    category: str | None = doc("reasoning category; default: derived from the task", None)
    difficulty: str = doc("label stored with each problem (adaptive formats read it)", "default")
    config: dict[str, Any] = doc("extra keyword arguments for the task's generator (its difficulty knobs)", {})

    def check(self) -> None:
        if self.size < 1:
            raise ValueError(f"task {self.name!r}: size must be >= 1, got {self.size}")


@dataclass(frozen=True)
class GymSource:
    type: Literal["reasoning_gym"] = doc("source kind")
    tasks: list[GymTask] = doc("reasoning-gym tasks to draw problems from", [])

    def check(self) -> None:
        if not self.tasks:
            raise ValueError("reasoning_gym source: 'tasks' must list at least one task")


@dataclass(frozen=True)
class FieldMap:
    question: str = doc("field holding the question", "question")
    answer: str | None = doc("field holding the gold answer (null: no gold answers)", "answer")
    id: str | None = doc("field holding a stable id (null: derived from the question)", None)
    category: str | None = doc("field holding the category (null: the source's `category`)", None)
    difficulty: str | None = doc("field holding a difficulty label (null: 'default')", None)


@dataclass(frozen=True)
class FileSource:
    type: Literal["jsonl", "parquet"] = doc("source kind: a JSONL file or a Parquet file/folder")
    path: str = doc("path of the file (or Parquet folder)")
    fields: FieldMap = doc("which fields hold what", FieldMap())
    category: str = doc("category for rows without a category field", "general")
    verifier: str = doc("how answers are checked: math | exact | none", "math")
    limit: int | None = doc("read at most this many problems", None)

    def check(self) -> None:
        if self.verifier not in VERIFIERS:
            raise ValueError(f"{self.type} source {self.path}: verifier must be one of {VERIFIERS}, got {self.verifier!r}")


@dataclass(frozen=True)
class HFSource:
    type: Literal["hf"] = doc("source kind: a Hugging Face dataset (needs the hub or its local cache)")
    name: str = doc("dataset id, e.g. openai/gsm8k")
    subset: str | None = doc("configuration name, e.g. main", None)
    split: str = doc("split to read", "train")
    fields: FieldMap = doc("which fields hold what", FieldMap())
    category: str = doc("category for rows without a category field", "general")
    verifier: str = doc("how answers are checked: math | exact | none", "math")
    answer_after: str | None = doc("keep only the text after this marker in the gold answer (GSM8K: '####')", None)
    limit: int | None = doc("read at most this many problems", None)

    def check(self) -> None:
        if self.verifier not in VERIFIERS:
            raise ValueError(f"hf source {self.name}: verifier must be one of {VERIFIERS}, got {self.verifier!r}")


Source = Union[GymSource, FileSource, HFSource]


class SourceError(CotdError):
    """Bad problem input, phrased for the user (file, line, field)."""


def load_problems(sources: Iterable[Source]) -> list[Problem]:
    problems: list[Problem] = []
    for src in sources:
        if isinstance(src, GymSource):
            problems.extend(p for t in src.tasks for p in gym_problems(t))
        elif isinstance(src, FileSource):
            problems.extend(file_problems(src))
        else:
            problems.extend(hf_problems(src))
    seen: dict[str, str] = {}
    for p in problems:
        if p.id in seen:
            raise SourceError(f"problem id {p.id!r} appears twice ({seen[p.id]} and {p.source}); ids must be unique")
        seen[p.id] = p.source
    return problems


def gym_category(name: str) -> str:
    from reasoning_gym.factory import DATASETS

    if name in GYM_CATEGORIES:
        return GYM_CATEGORIES[name]
    package = DATASETS[name][0].__module__.split(".")[1]
    return GYM_PACKAGE_CATEGORIES.get(package, package)


def gym_problems(task: GymTask) -> list[Problem]:
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if task.name not in DATASETS:
        close = sorted(n for n in DATASETS if task.name[:4] in n)[:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise SourceError(f"unknown reasoning-gym task {task.name!r}{hint}; `cotd tasks` lists all {len(DATASETS)}")
    try:
        ds = reasoning_gym.create_dataset(task.name, size=task.size, seed=task.seed, **task.config)
    except (TypeError, ValueError, AssertionError) as e:
        raise SourceError(f"reasoning-gym task {task.name!r}: bad config {task.config}: {e}") from None
    category = task.category or gym_category(task.name)
    config_key = stable_id(task.config)
    out = []
    for i in range(task.size):
        entry = ds[i]
        out.append(Problem(
            id=f"{task.name}-{task.seed}-{config_key[:6]}-{i}",
            question=entry["question"],
            answer=str(entry["answer"]) if entry.get("answer") is not None else None,
            category=category,
            difficulty=task.difficulty,
            source=f"reasoning_gym:{task.name}",
            verifier=f"rg:{task.name}",
            metadata=json.dumps(entry, default=str),
        ))
    return out


def file_problems(src: FileSource) -> list[Problem]:
    path = Path(src.path)
    if not path.exists():
        raise SourceError(f"{src.type} source: {src.path} does not exist")
    if src.type == "jsonl":
        records = _read_jsonl(path)
    else:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise SourceError(f"{src.path}: not a readable Parquet file or folder: {e}") from None
        records = ((f"{src.path}: row {i}", r) for i, r in enumerate(table.to_pylist()))
    return _map_records(records, src, f"{src.type}:{src.path}")


def _read_jsonl(path: Path) -> Iterable[tuple[str, dict]]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise SourceError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            yield where, rec


def hf_problems(src: HFSource) -> list[Problem]:
    try:
        import datasets
    except ImportError:
        raise SourceError("hf source: the 'datasets' package is not installed (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(src.name, src.subset, split=src.split)
    except Exception as e:  # offline, unknown id, gated: all reach the user the same way
        raise SourceError(
            f"hf source {src.name!r}: could not load it ({type(e).__name__}: {' '.join(str(e).split())[:200]}). "
            "Is the Hugging Face hub reachable (or the dataset in the local cache)? "
            "Offline, export it to JSONL/Parquet and use a 'jsonl' or 'parquet' source.") from None
    records = ((f"{src.name}[{src.split}] row {i}", r) for i, r in enumerate(ds))
    return _map_records(records, src, f"hf:{src.name}")


def _map_records(records: Iterable[tuple[str, dict]], src: FileSource | HFSource, source: str) -> list[Problem]:
    fm = src.fields
    out = []
    for where, rec in records:
        if src.limit is not None and len(out) >= src.limit:
            break
        question = _field(rec, fm.question, where, "question")
        answer = _field(rec, fm.answer, where, "answer") if fm.answer else None
        if answer is not None and getattr(src, "answer_after", None):
            answer = str(answer).split(src.answer_after)[-1].strip()
        pid = str(_field(rec, fm.id, where, "id")) if fm.id else stable_id(source, question)
        extra = {k: v for k, v in rec.items() if k not in {fm.question, fm.answer, fm.id}}
        out.append(Problem(
            id=pid,
            question=str(question),
            answer=None if answer is None else str(answer),
            category=str(_field(rec, fm.category, where, "category")) if fm.category else src.category,
            difficulty=str(_field(rec, fm.difficulty, where, "difficulty")) if fm.difficulty else "default",
            source=source,
            verifier=src.verifier,  # kept without a gold answer too: votes compare answers by it
            metadata=json.dumps(extra, default=str),
        ))
    if not out:
        raise SourceError(f"{source}: holds no problems")
    return out


def _field(rec: dict, name: str, where: str, role: str) -> Any:
    if name not in rec or rec[name] is None:
        raise SourceError(f"{where}: missing field {name!r} (the {role}; set fields.{role} to map another field)")
    return rec[name]
