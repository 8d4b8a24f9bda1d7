"""What an evaluation runs: the models (targets) with their engines and prompts, resolved from the
student's lineage (train run -> curated set -> chains -> the teacher that wrote them), and the
check that no suite overlaps the data the student was trained on. Reads manifests only; no Ray."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from jobs.common.config import build, to_dict
from jobs.common.engine import ModelConfig
from jobs.common.errors import DataError
from jobs.common.runs import MANIFEST, part_files, read_json
from jobs.evaluate.config import EvalConfig, ModelEntry, Price, PromptConfig
from jobs.tasks.problem import Problem


@dataclass(frozen=True)
class Target:
    """One model under evaluation."""
    name: str
    role: str                 # teacher | base | student | other
    engine: ModelConfig       # the engine it runs on (base and a LoRA student share one)
    adapter: str | None       # a LoRA adapter served on that engine
    prompt: PromptConfig
    price: Price
    identity: str             # what the model is (reference, folder digest), for the cache key

    def key(self, cfg: EvalConfig) -> str:
        """The cache key of this target's predictions: model, prompt and sampling setup."""
        spec = {"identity": self.identity, "adapter": self.adapter and folder_digest(self.adapter),
                "prompt": to_dict(self.prompt), "sampling": to_dict(cfg.sampling), "logprobs": cfg.logprobs,
                "seed": cfg.seed, "max_model_len": self.engine.max_model_len}
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def folder_digest(path: str | Path) -> str:
    """A folder's files (names, sizes, modification times): a retrained model gets a new digest."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def model_identity(ref: str, path: str | None) -> str:
    """A packaged or hub reference names fixed weights; a local folder is known by its files."""
    if path and Path(ref).exists():
        return f"{ref}@{folder_digest(path)}"
    return ref


def _manifest(folder: Path, what: str, made_by: str) -> dict[str, Any]:
    m = folder / MANIFEST
    if not m.is_file():
        raise DataError(f"{what}: {folder} has no {MANIFEST} (is it a finished `{made_by}` run?)")
    return read_json(m)


@dataclass(frozen=True)
class Lineage:
    """Where a trained student came from."""
    train: dict[str, Any]            # the train manifest
    curated: Path | None             # its curated set
    chains: Path | None              # the chains curation read
    generate: dict[str, Any] | None  # the generate manifest of those chains


def lineage(student_dir: str) -> Lineage:
    folder = Path(student_dir)
    train = _manifest(folder, "student", "cotd train")
    if train.get("stage") != "train":
        raise DataError(f"student: {folder} is a {train.get('stage')} run, not a `cotd train` run")
    curated = Path(train["config"]["data"])
    chains = gen = None
    if (curated / MANIFEST).is_file():
        chains = Path(read_json(curated / MANIFEST)["chains"])
        if (chains.parent / MANIFEST).is_file():
            gen = read_json(chains.parent / MANIFEST)
    return Lineage(train=train, curated=curated if curated.is_dir() else None, chains=chains, generate=gen)


def _engine(cfg: EvalConfig, model: str, base: dict[str, Any] | None = None) -> ModelConfig:
    """A ModelConfig for `model`: `base` settings (a lineage's), the eval's `engine` settings over them."""
    data = {**(base or {}), **cfg.engine, "model": model}
    return build(ModelConfig, data, source="eval engine settings")


def _price(cfg: EvalConfig, name: str, entry: Price | None = None) -> Price:
    return cfg.prices.get(name) or entry or Price()


def student_targets(cfg: EvalConfig, lin: Lineage, resolve) -> list[Target]:
    """teacher (unless the eval sets none and the lineage names none), base and student from a train run."""
    train = lin.train
    sp = train.get("student_prompt") or {}
    prompt = PromptConfig(format=sp.get("format") or "pre", granularity=sp.get("granularity") or "coarse",
                        few_shot=0, system=sp.get("system"))
    base_path = train["model_path"]
    base = _engine(cfg, base_path)
    targets = []
    teacher = cfg.teacher
    teacher_prompt = cfg.teacher_prompt
    if lin.generate is not None:
        gen_cfg = lin.generate["config"]
        if teacher is None:
            teacher = _engine(cfg, gen_cfg["teacher"]["model"],
                              {k: v for k, v in gen_cfg["teacher"].items() if k != "model"})
        if teacher_prompt is None:
            teacher_prompt = build(PromptConfig, gen_cfg["prompt"], source="the generate manifest's prompt")
    if teacher is not None:
        path = resolve(teacher.model) if teacher.backend == "vllm" else None
        targets.append(Target("teacher", "teacher", replace(teacher, model=path) if path else teacher, None,
                              teacher_prompt or cfg.prompt, _price(cfg, "teacher"), model_identity(teacher.model, path)))
    targets.append(Target("base", "base", base, None, prompt, _price(cfg, "base"), model_identity(train["model"], base_path)))
    out = Path(train["config"]["out_dir"])
    adapter = out / "adapter"
    merged_dir = out / "merged"
    as_adapter = cfg.lora_student == "adapter" or (cfg.lora_student == "auto" and base.use_gpu)
    if cfg.lora_student == "auto" and not (merged_dir / "config.json").is_file():
        as_adapter = True  # a run without an exported model: its adapter is all there is
    if train.get("method") == "lora" and adapter.is_dir() and as_adapter:
        targets.append(Target("student", "student", base, str(adapter), prompt, _price(cfg, "student"),
                              model_identity(train["model"], base_path)))
    else:
        if not (merged_dir / "config.json").is_file():
            raise DataError(f"student: {out} has no exported model in merged/ (lora_student: merged needs one; "
                            "lora_student: adapter serves its adapter instead)")
        merged = str(merged_dir)
        targets.append(Target("student", "student", _engine(cfg, merged), None, prompt, _price(cfg, "student"),
                              model_identity(merged, merged)))
    return targets


def entry_targets(cfg: EvalConfig, entries: list[ModelEntry], resolve) -> list[Target]:
    out = []
    for e in entries:
        if e.run is not None:
            lin = lineage(e.run)
            student = next(t for t in student_targets(cfg, lin, resolve) if t.role == "student")
            out.append(replace(student, name=e.name, role=e.role, prompt=e.prompt or student.prompt,
                               price=_price(cfg, e.name, e.price)))
            continue
        m = e.model
        path = resolve(m.model) if m.backend == "vllm" else None
        engine = replace(m, model=path) if path else m
        out.append(Target(e.name, e.role, engine, e.adapter, e.prompt or cfg.prompt, _price(cfg, e.name, e.price),
                          model_identity(m.model, path)))
    return out


# --- disjointness: held-out means not in the training data, by question content ----------------

def normalize_question(text: str) -> str:
    return " ".join(re.sub(r"\s+", " ", text).strip().lower().split())


def training_questions(folders: list[Path]) -> dict[str, str]:
    """Normalized question -> the folder it was found in, from chains datasets (`question`) and
    curated example sets (the last user turn of `messages`)."""
    import pyarrow.parquet as pq

    seen: dict[str, str] = {}
    for folder in folders:
        for split in ([folder] if part_files(folder) else [folder / "train", folder / "val"]):
            for f in part_files(split):
                names = pq.read_schema(f).names
                if "question" in names:
                    qs = pq.read_table(f, columns=["question"]).column("question").to_pylist()
                elif "messages" in names:
                    qs = [next((m["content"] for m in reversed(json.loads(x)[:-1]) if m["role"] == "user"), "")
                          for x in pq.read_table(f, columns=["messages"]).column("messages").to_pylist()]
                else:
                    continue
                for q in qs:
                    if q:
                        seen.setdefault(normalize_question(q), str(split))
    return seen


def check_disjoint(suites: dict[str, list[Problem]], folders: list[Path], mode: str = "fail",
                   log=lambda *_: None) -> tuple[dict[str, list[Problem]], int]:
    """The suites without problems found in the training data, and how many training questions
    were compared against. `mode` fail: DataError on any overlap; drop: such problems leave their
    suite (each dropped count logged; DataError if a suite is left empty); allow: nothing checked."""
    if mode == "allow":
        return suites, 0
    seen = training_questions([f for f in folders if f.exists()])
    kept: dict[str, list[Problem]] = {}
    for name, problems in suites.items():
        hits = [(p, seen[normalize_question(p.question)]) for p in problems if normalize_question(p.question) in seen]
        if hits and mode == "fail":
            p, where = hits[0]
            raise DataError(
                f"suite {name!r}: {len(hits)} of {len(problems)} problems are in the training data ({where}), e.g. "
                f"{p.id}: {p.question[:80]!r}. Held-out problems must be unseen: use other seeds, sizes or sources "
                "(or overlap: drop to leave those problems out, overlap: allow to evaluate anyway).")
        hit_ids = {p.id for p, _ in hits}
        kept[name] = [p for p in problems if p.id not in hit_ids]
        if hits:
            log(f"suite {name!r}: {len(hits)} of {len(problems)} problems are in the training data; left out (overlap: drop)")
            if not kept[name]:
                raise DataError(f"suite {name!r}: every one of its {len(problems)} problems is in the training data")
    return kept, len(seen)
