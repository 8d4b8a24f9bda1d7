"""Generate graded reasoning chains from a teacher model.

Run as:
    python -m jobs.generate --config configs/generate/quickstart.yaml out_dir=runs/q1 paths_per_problem=4
    cotd generate --config configs/generate/quickstart.yaml --address ray://head:10001

Reads problems, builds one prompt per problem and `paths_per_problem` requests per prompt, streams
them through ray.data.llm teacher replicas, parses and grades every chain, and writes
<out_dir>/chains/part-*.parquet plus <out_dir>/manifest.json. Re-running the same command after an
interruption generates only the chains that are missing.
"""

from __future__ import annotations

import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any

from jobs.common.progress import emit
from jobs.common.runs import (check_run_dir, claim_run_dir, clean_partial, drop_rows, existing_keys, read_dataset,
                              write_manifest)
from jobs.generate.config import GenerateConfig
from jobs.common.schemas import CHAIN_KEY, CHAIN_SCHEMA, ERROR, UNPARSED

STAGE = "generate"


def main(cfg: GenerateConfig, log=emit) -> dict[str, Any]:
    started = time.time()
    run_dir, chains_dir = Path(cfg.out_dir), Path(cfg.out_dir) / "chains"

    # validate: every input is read and checked before anything is written, and all but the
    # tokenizer before Ray or a model starts
    from jobs.common.engine import load_tokenizer, model_path as resolve_model
    from jobs.common.raycluster import init_ray_while
    from jobs.formats.prompts import load_exemplars
    from jobs.tasks.sources import load_problems

    problems = load_problems(cfg.sources)
    pool = load_exemplars(cfg.prompt.exemplars)
    model_path = resolve_model(cfg.teacher, log)
    check_run_dir(run_dir, STAGE, cfg.fingerprint(), has_outputs=chains_dir.exists(), overwrite=cfg.overwrite)
    done = set() if cfg.overwrite else existing_keys(chains_dir, CHAIN_KEY, ERROR)
    unfinished = any((p.id, k) not in done for p in problems for k in range(cfg.paths_per_problem))
    # the tokenizer, the last and slowest check, loads while Ray starts; a finished run needs neither
    tokenizer = init_ray_while(cfg.ray, partial(load_tokenizer, model_path), log) if unfinished else None
    if cfg.overwrite and chains_dir.exists():
        log(f"overwrite=true: deleting {chains_dir}")
        shutil.rmtree(chains_dir)
    claim_run_dir(run_dir, STAGE, cfg.fingerprint())

    # plan: only what the run directory does not hold yet
    from jobs.generate.pipeline import plan_rows

    removed = clean_partial(chains_dir)
    # chains that failed (the engine or the server, not the model) are generated again
    retried = 0 if cfg.overwrite else drop_rows(chains_dir, "status", ERROR)
    if retried:
        log(f"{retried} chains that failed in an earlier run (status {ERROR!r}) are generated again")
    rows = plan_rows(problems, cfg, pool, tokenizer, skip=done)
    total = len(problems) * cfg.paths_per_problem
    log(f"{len(problems)} problems x {cfg.paths_per_problem} paths = {total} chains; "
        f"{total - len(rows)} already in {chains_dir}{f' ({removed} partial files removed)' if removed else ''}; "
        f"{len(rows)} to generate")

    # run
    attempt: dict[str, Any] = {"rows": 0, "output_tokens": 0, "seconds": 0.0}
    if rows:
        attempt = _generate(cfg, model_path, rows, chains_dir, log)

    # summarize: over the whole dataset, this attempt's throughput alongside
    from jobs.generate.report import format_table, summarize

    summary = summarize(read_dataset(chains_dir))
    manifest = write_manifest(
        run_dir, STAGE, cfg, cfg.fingerprint(), started,
        teacher={"model": cfg.teacher.model, "path": model_path, "backend": cfg.teacher.backend},
        dataset=str(chains_dir), outputs={"chains": str(chains_dir)}, summary=summary,
        last_attempt={**attempt, "resumed_from": len(done),
                      "tokens_per_s": round(attempt["output_tokens"] / attempt["seconds"], 2) if attempt["seconds"] else None,
                      "chains_per_s": round(attempt["rows"] / attempt["seconds"], 3) if attempt["seconds"] else None})
    log("\n" + format_table(summary))
    if attempt["seconds"]:
        log(f"this run: {attempt['rows']} chains, {attempt['output_tokens']} output tokens in {attempt['seconds']:.1f}s "
            f"({manifest['last_attempt']['tokens_per_s']} tok/s)")
    log(f"chains: {chains_dir}\nmanifest: {run_dir / 'manifest.json'}")
    return manifest


def _generate(cfg: GenerateConfig, model_path: str | None, rows: list[dict], chains_dir: Path, log) -> dict[str, Any]:
    from jobs.common.batch import run_llm
    from jobs.generate.pipeline import finish_rows
    from jobs.tasks.verify import warm

    def counts(batch) -> dict[str, int]:
        status = batch.column("status").to_pylist()
        return {"tokens": sum(batch.column("output_tokens").to_pylist()),
                "correct": sum(1 for c in batch.column("correct").to_pylist() if c),
                "unparsed": status.count(UNPARSED), "errors": status.count(ERROR)}

    return run_llm(rows, llm=cfg.teacher, sampling=cfg.sampling, model_path=model_path,
                   finish=partial(finish_rows, max_tokens=cfg.sampling.max_tokens), schema=CHAIN_SCHEMA,
                   folder=chains_dir, ray_cfg=cfg.ray, label=STAGE, write_rows=cfg.write_rows,
                   counts=counts, log=log, warm=partial(warm, sorted({r["verifier"] for r in rows})),
                   memory_key="teacher.gpu_memory_utilization")
