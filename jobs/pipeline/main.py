"""Run the whole distillation pipeline: generate -> curate -> train -> evaluate.

Run as:
    cotd run configs/pipelines/quickstart.yaml
    python -m jobs.pipeline --config configs/pipelines/quickstart.yaml out_dir=runs/q2

Every stage's config is loaded and checked first, with its paths pointed into the run directory.
Then each stage runs in turn in one Ray session: generation always (it resumes and, with nothing
missing, starts nothing); curation and training only when their manifests do not already record
the same settings on the same inputs (dataset digests); evaluation always (every answer it has is
cached). Killing `cotd run` anywhere and running it again finishes the work with nothing lost or
done twice: each stage resumes from what it wrote. Ends with the summary: teacher, base and
student accuracy and recovery per category, the cost per 1,000 queries, and the report's path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.common.config import load_config, to_dict
from jobs.common.progress import emit
from jobs.common.runs import dataset_digest, is_current, part_files, read_json, write_manifest, write_text
from jobs.pipeline.config import PipelineConfig, StageOverrides

STAGE = "run"


@dataclass(frozen=True)
class Stages:
    """The checked configs of one pipeline's stages (eval None: stop after training)."""
    generate: Any
    curate: Any
    train: Any
    eval: Any | None


def plan_stages(files: dict[str, str | None], out: Path, overrides: StageOverrides, generate_dir: Path,
                eval_cache: Path | None, ray_address: str | None) -> Stages:
    """Load every stage's config from `files`, its overrides applied and its paths pointed into `out`."""
    from jobs.curate.config import CurateConfig
    from jobs.evaluate.config import EvalConfig
    from jobs.generate.config import GenerateConfig
    from jobs.train.config import TrainConfig

    ray = [f"ray.address={ray_address}"] if ray_address else []
    gen = load_config(GenerateConfig, files["generate"], [*overrides.generate, f"out_dir={generate_dir}", *ray])
    cur = load_config(CurateConfig, files["curate"], [*overrides.curate, f"chains={generate_dir / 'chains'}",
                                                      f"out_dir={out / 'curated'}", *ray])
    tr = load_config(TrainConfig, files["train"], [*overrides.train, f"data={out / 'curated'}",
                                                   f"out_dir={out / 'student'}", *ray])
    ev = None
    if files.get("eval"):
        ev = load_config(EvalConfig, files["eval"], [*overrides.eval, f"student={out / 'student'}", f"out_dir={out / 'eval'}",
                                                     *([f"cache={eval_cache}"] if eval_cache else []), *ray])
    return Stages(gen, cur, tr, ev)


def run_stages(stages: Stages, log=emit) -> dict[str, Any]:
    """Run the stages in turn, skipping curation and training where they are up to date; returns
    each stage's manifest."""
    from jobs.curate.main import main as curate
    from jobs.evaluate.main import main as evaluate
    from jobs.generate.main import main as generate
    from jobs.train.main import check_data, main as train

    done = {"generate": generate(stages.generate, log=log)}
    chains = Path(stages.generate.out_dir) / "chains"
    cur = stages.curate
    if is_current(Path(cur.out_dir), "curate", cur.fingerprint(), {"chains": dataset_digest(part_files(chains))}):
        log(f"curate: {cur.out_dir} is up to date with these chains and settings; skipped")
        done["curate"] = read_json(Path(cur.out_dir) / "manifest.json")
    else:
        done["curate"] = curate(cur, log=log)
    tr = stages.train
    if is_current(Path(tr.out_dir), "train", {**tr.fingerprint(), "data": dataset_digest(sum(check_data(tr.data), []))}):
        log(f"train: {tr.out_dir} is up to date with this data and these settings; skipped")
        done["train"] = read_json(Path(tr.out_dir) / "manifest.json")
    else:
        done["train"] = train(tr, log=log)
    if stages.eval is not None:
        done["eval"] = evaluate(stages.eval, log=log)
        done["router"] = calibrate_router(Path(stages.eval.out_dir), log)
    return done


def calibrate_router(eval_dir: Path, log=emit) -> dict[str, Any] | None:
    """The hybrid server's router fitted on the evaluation's held-out items (router.json beside
    the report, for `cotd serve ... policy.calibration=`), or None where it cannot be (no held-out
    problem answered by both teacher and student)."""
    from jobs.common.errors import DataError
    from serve.main import calibrate_items

    out = eval_dir / "router.json"
    try:
        cal = calibrate_items(eval_dir / "items", out, log=log)
    except DataError as e:
        log(f"router: not calibrated ({e})")
        return None
    return {"path": str(out), "n": cal["n"], "thresholds": cal["thresholds"]}


def pipeline_stages(cfg: PipelineConfig, ray_address: str | None = None) -> Stages:
    """A pipeline config's stages, planned into its run directory."""
    out = Path(cfg.out_dir)
    return plan_stages({"generate": cfg.generate, "curate": cfg.curate, "train": cfg.train, "eval": cfg.eval}, out,
                       cfg.overrides, Path(cfg.generate_dir) if cfg.generate_dir else out / "generate",
                       Path(cfg.eval_cache) if cfg.eval_cache else None, ray_address)


def main(cfg: PipelineConfig, log=emit) -> dict[str, Any]:
    started = time.time()
    out = Path(cfg.out_dir)
    stages = pipeline_stages(cfg, cfg.ray.address)
    log(f"pipeline {out}: generate -> curate -> train" + (" -> eval" if stages.eval else ""))
    done = run_stages(stages, log=log)
    text = summary(done)
    write_text(out / "summary.md", text)
    manifest = write_manifest(out, STAGE, cfg, to_dict(cfg), started,
                              stages={name: m.get("wall_seconds") for name, m in done.items() if name != "router"},
                              summary=done["eval"]["summary"] if "eval" in done else None,
                              outputs={"summary.md": str(out / "summary.md"),
                                       **({"report": str(Path(stages.eval.out_dir) / "report.html")} if stages.eval else {}),
                                       **({"router.json": done["router"]["path"]} if done.get("router") else {})})
    log("\n" + text)
    return manifest


def summary(done: dict[str, Any]) -> str:
    """What the run found: the chains, what curation kept, the training, and (with an evaluation)
    accuracy and recovery per category, the cost per 1,000 queries and where the report is."""
    from jobs.evaluate.report import fmt_pct

    g, c, t = done["generate"]["summary"], done["curate"]["summary"], done["train"]
    lines = ["# Pipeline summary", "",
             f"- generate: {g['chains']} chains of {g['problems']} problems, teacher accuracy "
             f"{fmt_pct(g['accuracy'])}",
             f"- curate: kept {c['kept']} of {c['chains']} chains from {c['problems_kept']} problems",
             f"- train: {t['steps']} steps in {t['precision']}, loss {t['first_loss']:.4f} -> {t['final']['loss']:.4f}"]
    if "eval" in done:
        report = read_json(Path(done["eval"]["outputs"]["report.json"]))
        from jobs.evaluate.main import summary_table

        lines += ["", "```", summary_table(report), "```", "", f"report: {done['eval']['outputs']['report.html']}"]
    if done.get("router"):
        router, student = done["router"]["path"], Path(done["train"]["outputs"]["metrics.jsonl"]).parent
        lines += [f"router: {router} (calibrated on {done['router']['n']} held-out problems); serve the student "
                  f"with it:", f"  cotd serve --config configs/serve/quickstart.yaml student.run={student} "
                  f"policy.calibration={router} policy.threshold=null"]
    return "\n".join(lines) + "\n"

