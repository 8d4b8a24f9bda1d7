"""Curate teacher chains into a training set: filter, judge, diversify, format, mix and split.

Run as:
    python -m jobs.curate --config configs/curate/quickstart.yaml chains=runs/quickstart/chains
    cotd curate --config configs/curate/quickstart.yaml chains=runs/q1/chains out_dir=runs/q1/curated

Reads generate's chains (Parquet), screens every problem's paths on Ray Data (structure,
correctness or self-consistency, near-duplicates), has a judge model rate the survivors
(ray.data.llm, like generation), applies the drop rule and the per-problem path cap, renders the
kept chains as training examples in the student's format and granularity, mixes in general data,
and splits by problem. Writes <out_dir>/{train,val,decisions}/ (Parquet), report.md, report.png and
manifest.json. Judgements are stored as they arrive, so an interrupted run resumes the judge pass
where it stopped; everything after it is recomputed (it is cheap and deterministic).
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa

from jobs.common.config import ConfigError
from jobs.common.progress import emit
from jobs.common.batch import run_llm
from jobs.common.engine import ModelConfig, load_tokenizer, model_path
from jobs.common.raycluster import init_ray_while
from jobs.common.errors import DataError
from jobs.common.runs import (PartWriter, check_dataset, clean_partial, dataset_digest, part_files, publish, read_dataset,
                              write_json, write_manifest, write_text)
from jobs.curate.config import CurateConfig
from jobs.common.schemas import (CURATE_READS, DECISION_SCHEMA, ERROR, EXAMPLE_SCHEMA, JUDGEMENT_SCHEMA, RATIONALE,
                                 UNPARSED)
from jobs.curate.examples import general_examples, val_ids
from jobs.curate.filters import judged_low
from jobs.curate.judge import (JUDGE_SYSTEM, chain_sha, finish_judgements, latest,
                               plan_judge_rows)
from jobs.curate.pipeline import decide_group, screen_group
from jobs.curate.report import format_summary, markdown, plot, summarize
from jobs.tasks.problem import stable_id
from jobs.tasks.sources import load_problems

STAGE = "curate"
OUTPUTS = ("train", "val", "decisions")


def main(cfg: CurateConfig, log=emit) -> dict[str, Any]:
    started = time.time()
    out = Path(cfg.out_dir)

    # validate: the chains, the general data and the judge model, before any work starts
    chains_dir, files, rows, teacher = check_chains(cfg.chains, out)
    general = load_problems(cfg.mix.sources) if cfg.mix.sources and cfg.mix.ratio > 0 else []
    judge_llm = _judge_llm(cfg, teacher)
    judge_path = model_path(judge_llm, log) if judge_llm is not None else None

    # set up; the judge's tokenizer, its last check, loads while Ray starts
    import ray

    judge_tok = init_ray_while(cfg.ray, partial(load_tokenizer, judge_path), log=log)
    chains = ray.data.read_parquet([str(f) for f in files]).select_columns(list(CURATE_READS))
    partitions = shuffle_partitions(rows)
    log(f"curating {chains_dir} ({len(files)} part files)")

    # screen + judge: the judge rates only chains that passed the cheap checks
    judgements, judge_attempt = None, None
    if judge_llm is not None:
        judgements, judge_attempt = _judge(cfg, chains, partitions, judge_llm, judge_path, judge_tok, out, log)

    # decide, format, split
    low = judged_low(list(judgements.values()), cfg.judge) if judgements is not None else set()
    decided = chains.groupby("problem_id", num_partitions=partitions).map_groups(
        decide_group, batch_format="pyarrow", fn_kwargs={"cfg": cfg, "judgements": judgements, "low": low})
    decisions: list[dict[str, Any]] = []
    found: list[dict[str, Any]] = []  # rationale and self-evaluation examples, in decision order
    for batch in decided.iter_batches(batch_size=4096, batch_format="pyarrow"):
        for r in batch.to_pylist():
            found.extend(json.loads(r[col]) for col in ("example", "self_eval") if r[col])
            decisions.append({k: r[k] for k in DECISION_SCHEMA.names})

    # split by problem, among the problems that kept a chain (so val is never empty by chance);
    # general data against forgetting is a share of the reasoning examples, split by its own ids
    val = val_ids({e["problem_id"] for e in found if e["kind"] == RATIONALE}, cfg.val_fraction, cfg.seed)
    for d in decisions:
        d["split"] = "val" if d["problem_id"] in val else "train"
    wanted = round(cfg.mix.ratio * sum(e["kind"] == RATIONALE for e in found))
    mixed = general_examples(general, wanted, cfg.seed) if wanted else []
    if len(mixed) < wanted:
        log(f"warning: mix.ratio {cfg.mix.ratio} asks for {wanted} general examples; the sources hold {len(mixed)}")
    val |= val_ids([e["problem_id"] for e in mixed], cfg.val_fraction, cfg.seed)
    splits = {"train": [e for e in found + mixed if e["problem_id"] not in val],
              "val": [e for e in found + mixed if e["problem_id"] in val]}
    counts = {split: Counter(e["kind"] for e in rows) for split, rows in splits.items()}

    staging = out / f".staging-{uuid.uuid4().hex[:8]}"
    try:
        PartWriter(staging / "decisions", DECISION_SCHEMA).write(pa.Table.from_pylist(decisions, schema=DECISION_SCHEMA))
        for split, rows in splits.items():
            PartWriter(staging / split, EXAMPLE_SCHEMA).write(pa.Table.from_pylist(rows, schema=EXAMPLE_SCHEMA))
        publish(staging, out, OUTPUTS)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    # report
    summary = summarize(decisions, counts)
    plot(decisions, summary, out / "report.png")
    write_text(out / "report.md", markdown(summary, "report.png"))
    manifest = write_manifest(
        out, STAGE, cfg, cfg.fingerprint(), started, inputs={"chains": dataset_digest(files)},
        chains=str(chains_dir), teacher=teacher,
        judge={"model": judge_llm.model if judge_llm else None, "last_attempt": judge_attempt},
        general_examples={"wanted": wanted, "written": len(mixed)},
        summary=summary, outputs={name: str(out / name) for name in OUTPUTS})
    log("\n" + format_summary(summary))
    log(f"train: {out / 'train'}\nval: {out / 'val'}\nreport: {out / 'report.md'}")
    return manifest


# chains per partition of the by-problem shuffle: each partition is an aggregator of its own (a
# worker process), which costs seconds to start on a small machine, so small inputs get one
ROWS_PER_PARTITION = 20_000


def shuffle_partitions(rows: int) -> int:
    """Partitions of the by-problem shuffle for `rows` chains: one per ROWS_PER_PARTITION, 1 to 64,
    however many part files hold them."""
    return max(1, min(64, -(-rows // ROWS_PER_PARTITION)))


def check_chains(path: str, out: Path) -> tuple[Path, list[Path], int, str | None]:
    """The chains folder (given, or <path>/chains), its part files, how many chains they hold, and
    the teacher that wrote them; DataError when it is missing, empty, unreadable or lacks columns
    curation needs."""
    import pyarrow.parquet as pq

    folder = Path(path)
    if (folder / "chains").is_dir() and not part_files(folder):
        folder = folder / "chains"
    if folder.exists() and (folder.resolve() == out.resolve() or out.resolve() in folder.resolve().parents):
        raise DataError(f"out_dir {out} would overwrite the chains in {folder}; choose another out_dir")
    files = check_dataset(folder, CURATE_READS, "chains", "cotd generate")
    columns = [pq.read_table(f, columns=["teacher_model"]).column("teacher_model") for f in files]
    teachers = {t for c in columns for t in c.to_pylist() if t}
    return folder, files, sum(len(c) for c in columns), (sorted(teachers)[0] if len(teachers) == 1 else None)


def _judge_llm(cfg: CurateConfig, teacher: str | None):
    """The judge's model config: the configured one, else the teacher judging its own chains."""
    if not cfg.judge.enabled:
        return None
    if cfg.judge.model is not None:
        return cfg.judge.model
    if teacher is None:
        raise ConfigError("judge.model is not set and the chains come from several teachers (or name none); "
                          "set judge.model.model to the judge to use")
    return ModelConfig(model=teacher)


def _judge(cfg: CurateConfig, chains, partitions: int, llm, model_path, tokenizer, out: Path, log):
    """Screen every problem on Ray Data, then judge the survivors not judged before (resume);
    returns the judgement of each survivor's current text and this attempt's numbers."""
    candidates = chains.groupby("problem_id", num_partitions=partitions).map_groups(
        screen_group, batch_format="pyarrow", fn_kwargs={"cfg": cfg})
    rows = [r for b in candidates.iter_batches(batch_size=4096, batch_format="pyarrow") for r in b.to_pylist()]
    shas = {(r["problem_id"], r["path_index"]): chain_sha(r["chain"]) for r in rows}

    fingerprint = {**cfg.judge_fingerprint(llm.model), "rubric": chain_sha(JUDGE_SYSTEM)}
    folder = out / "judgements" / stable_id(fingerprint)
    write_json(folder.parent / f"{folder.name}.json", fingerprint)
    removed = clean_partial(folder)
    done = {k: j for k, j in latest(read_dataset(folder), shas).items() if j["status"] != ERROR}
    todo = [r for r in rows if (r["problem_id"], r["path_index"]) not in done]
    log(f"judge {llm.model}: {len(rows)} chains passed the checks; {len(done)} already judged in {folder}"
        f"{f' ({removed} partial files removed)' if removed else ''}; {len(todo)} to judge")
    attempt = None
    if todo:
        def counts(batch) -> dict[str, int]:
            status = batch.column("status").to_pylist()
            return {"tokens": sum(batch.column("output_tokens").to_pylist()), "unparsed": status.count(UNPARSED),
                    "errors": status.count(ERROR)}

        attempt = run_llm(plan_judge_rows(todo, tokenizer, llm.model), llm=llm, sampling=cfg.judge.sampling,
                          model_path=model_path, finish=partial(finish_judgements, max_tokens=cfg.judge.sampling.max_tokens),
                          schema=JUDGEMENT_SCHEMA, folder=folder, ray_cfg=cfg.ray, label="judge",
                          write_rows=cfg.judge.write_rows, counts=counts, log=log,
                          memory_key="judge.model.gpu_memory_utilization")
    return latest(read_dataset(folder), shas), attempt
