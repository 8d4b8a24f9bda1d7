"""Train and evaluate the variants of one distillation setup; tabulate each one's effect.

Run as:
    cotd experiment --config configs/experiments/structure.yaml
    python -m jobs.experiment --config configs/experiments/structure.yaml out_dir=runs/exp-structure

Every config is loaded and checked first. The teacher's chains are generated once (<out_dir>/generate,
resumed if partial); each variant is curated, trained and evaluated in <out_dir>/<variant>/, a stage
skipped when its manifest says it already ran under the same settings on the same inputs. All
variants share one predictions cache (<out_dir>/eval-cache), so the teacher and the base student are
evaluated once. The table compares each variant's student with the baseline's on the same problems
(paired bootstrap interval, McNemar) and states the recovery rate; report.md and report.json hold it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from jobs.common.config import to_dict
from jobs.common.progress import emit
from jobs.common.runs import read_dataset, write_json, write_manifest, write_text
from jobs.experiment.config import ExperimentConfig

STAGE = "experiment"


def plan(cfg: ExperimentConfig) -> dict[str, Any]:
    """Every variant's stages (jobs.pipeline.main.Stages), loaded and checked before anything runs."""
    from jobs.pipeline.main import plan_stages

    out = Path(cfg.out_dir)
    files = {"generate": cfg.generate, "curate": cfg.curate, "train": cfg.train, "eval": cfg.eval}
    generate_dir = Path(cfg.generate_dir) if cfg.generate_dir else out / "generate"
    cache = Path(cfg.eval_cache) if cfg.eval_cache else out / "eval-cache"
    variants_dir = Path(cfg.variants_dir) if cfg.variants_dir else out
    return {v.name: plan_stages(files, variants_dir / v.name, cfg.overrides.plus(v.overrides()), generate_dir, cache,
                                cfg.ray.address) for v in cfg.variants}


def main(cfg: ExperimentConfig, log=emit) -> dict[str, Any]:
    from jobs.pipeline.main import run_stages

    started = time.time()
    out = Path(cfg.out_dir)
    variants = plan(cfg)
    log(f"experiment {out}: {len(cfg.variants)} variants ({', '.join(v.name for v in cfg.variants)}), "
        f"baseline {cfg.baseline_name()}")
    reports = {}
    for v in cfg.variants:
        log(f"--- variant {v.name}: {v.description or 'as configured'}")
        run_stages(variants[v.name], log=log)
        reports[v.name] = Path(variants[v.name].eval.out_dir)

    result = compare(cfg, reports)
    write_json(out / "report.json", result)
    write_text(out / "report.md", markdown(result))
    manifest = write_manifest(out, STAGE, cfg, to_dict(cfg), started, variants=list(reports),
                              summary={"baseline": result["baseline"], "rows": result["rows"]},
                              outputs={"report.md": str(out / "report.md"), "report.json": str(out / "report.json")})
    log("\n" + markdown(result))
    return manifest


def compare(cfg: ExperimentConfig, eval_dirs: dict[str, Path]) -> dict[str, Any]:
    """Each variant's student against the baseline's on the same problems, per suite: accuracy with
    its interval, the change with a paired bootstrap interval and McNemar's test, the recovery rate."""
    import json

    from jobs.evaluate import metrics as M

    baseline = cfg.baseline_name()
    items = {name: read_dataset(d / "items").to_pylist() for name, d in eval_dirs.items()}
    boot = json.loads((eval_dirs[baseline] / "manifest.json").read_text())["config"]["bootstrap"]
    kw = {"samples": boot["samples"], "seed": boot["seed"], "confidence": boot["confidence"]}
    suites = list(dict.fromkeys((r["suite"], r["suite_kind"]) for r in items[baseline]))

    def correct(name: str, role: str, suite: str) -> dict[str, bool]:
        return {r["problem_id"]: r["correct"] for r in items[name] if r["role"] == role and r["suite"] == suite}

    rows = []
    for suite, kind in suites:
        base = correct(baseline, "student", suite)
        teacher = correct(baseline, "teacher", suite)
        for name in eval_dirs:
            mine = correct(name, "student", suite)
            ids = [p for p in mine if p in base]
            a, b = [mine[p] for p in ids], [base[p] for p in ids]
            t_ids = [p for p in mine if p in teacher]
            row = {"suite": suite, "kind": kind, "variant": name, "accuracy": M.accuracy(list(mine.values()), kw["confidence"])}
            if name != baseline:
                row["change"] = M.gain(a, b, **kw)
            if t_ids:
                row["recovery"] = M.recovery([mine[p] for p in t_ids], [teacher[p] for p in t_ids], **kw)
            rows.append(row)
    return {"claim": cfg.claim, "baseline": baseline, "variants": {v.name: v.description for v in cfg.variants},
            "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    from jobs.evaluate.report import fmt_ci, fmt_diff, fmt_pct, fmt_ratio

    lines = ["# Experiment", ""]
    if result["claim"]:
        lines += [f"Claim tested: {result['claim']}", ""]
    lines += [f"Baseline: `{result['baseline']}`. Student accuracy per variant; the change is against the baseline "
              "on the same problems (paired bootstrap 95% interval, McNemar's exact test).", "",
              "| suite | variant | what it changes | student accuracy | change vs baseline | recovery |",
              "| --- | --- | --- | ---: | --- | --- |"]
    for r in result["rows"]:
        acc = r["accuracy"]
        lines.append(f"| {r['suite']} ({r['kind']}) | {r['variant']} | {result['variants'].get(r['variant'], '')} | "
                     f"{fmt_pct(acc['accuracy'])}{fmt_ci(acc['ci'])} (n={acc['n']}) | "
                     f"{fmt_diff(r['change']) if 'change' in r else '(baseline)'} | "
                     f"{fmt_ratio(r['recovery']) if 'recovery' in r else '-'} |")
    return "\n".join(lines) + "\n"
