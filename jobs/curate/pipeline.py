"""The curate stage's per-problem passes, applied with Ray Data's `groupby("problem_id").map_groups`
so every path of a problem is decided together, on as many workers as the cluster has.

  screen_group   structure, correctness and duplicates: the chains worth judging
  decide_group   the same screen, then the judge's verdict and the path cap; one decision row per chain,
           with the training examples of the kept ones
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from jobs.common.schemas import DECISION_SCHEMA, OK
from jobs.curate.config import CurateConfig
from jobs.curate.examples import rationale_example, self_eval_example
from jobs.curate.filters import screen, select

CANDIDATE_SCHEMA = pa.schema([("problem_id", pa.string()), ("path_index", pa.int32()), ("question", pa.string()),
                              ("chain", pa.string())])
# a decision row with the examples of a kept chain riding along (JSON), split off by the driver
DECIDED_SCHEMA = DECISION_SCHEMA.append(pa.field("example", pa.string())).append(pa.field("self_eval", pa.string()))


def _rows(group: pa.Table) -> list[dict[str, Any]]:
    return sorted(group.to_pylist(), key=lambda r: r["path_index"])


def _screen(rows: list[dict[str, Any]], cfg: CurateConfig) -> list[str | None]:
    return screen(rows, cfg.structure, cfg.correctness, cfg.diversity.near_duplicate)


def screen_group(group: pa.Table, cfg: CurateConfig) -> pa.Table:
    """map_groups: one problem's chains -> those that pass the checks needing no judge."""
    rows = _rows(group)
    keep = [r for r, reason in zip(rows, _screen(rows, cfg)) if reason is None]
    return pa.Table.from_pylist([{k: r[k] for k in CANDIDATE_SCHEMA.names} for r in keep], schema=CANDIDATE_SCHEMA)


def decide_group(group: pa.Table, cfg: CurateConfig, judgements: dict | None, low: set) -> pa.Table:
    """map_groups: one problem's chains -> one decision row each, examples attached to the kept
    (the split is chosen afterwards, among problems with kept chains). `judgements` maps
    (problem_id, path_index) to the judgement of the chain's current text (None: no judge pass);
    `low` holds the keys the judge's drop rule removes."""
    rows = _rows(group)
    reasons = select(rows, _screen(rows, cfg), judgements, low, cfg.judge, cfg.diversity.max_paths)
    out = []
    for r, reason in zip(rows, reasons):
        j = (judgements or {}).get((r["problem_id"], r["path_index"]))
        readable = j is not None and j["status"] == OK
        out.append({
            "problem_id": r["problem_id"], "path_index": r["path_index"], "category": r["category"],
            "split": None, "kept": reason is None, "reason": reason,
            "num_steps": r["num_steps"], "chars": len(r["chain"] or ""), "output_tokens": r["output_tokens"],
            "correct": r["correct"], "judge_score": j["score"] if readable else None,
            "example": json.dumps(rationale_example(r, cfg.examples)) if reason is None else None,
            "self_eval": json.dumps(self_eval_example(r, j)) if readable and cfg.examples.self_eval else None,
        })
    return pa.Table.from_pylist(out, schema=DECIDED_SCHEMA)
