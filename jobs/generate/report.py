"""Summaries of a chains dataset: counts, per-category accuracy, throughput. Pure functions."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pyarrow as pa

from jobs.common.schemas import CHAIN_KEY, ERROR, OK, UNPARSED


def summarize(table: pa.Table) -> dict[str, Any]:
    rows = table.select(["problem_id", "path_index", "category", "status", "correct", "output_tokens"]).to_pylist()
    keys = [tuple(r[k] for k in CHAIN_KEY) for r in rows]
    by_cat: dict[str, dict[str, int]] = defaultdict(lambda: {"chains": 0, "graded": 0, "correct": 0, "parsed": 0})
    for r in rows:
        c = by_cat[r["category"]]
        c["chains"] += 1
        c["parsed"] += r["status"] == OK
        if r["correct"] is not None:
            c["graded"] += 1
            c["correct"] += bool(r["correct"])
    categories = {
        name: {**c, "accuracy": round(c["correct"] / c["graded"], 4) if c["graded"] else None,
               "answer_rate": round(c["parsed"] / c["chains"], 4) if c["chains"] else None}
        for name, c in sorted(by_cat.items())
    }
    graded = sum(c["graded"] for c in by_cat.values())
    correct = sum(c["correct"] for c in by_cat.values())
    return {
        "chains": len(rows),
        "problems": len({r["problem_id"] for r in rows}),
        "duplicates": len(keys) - len(set(keys)),
        "status": {s: sum(r["status"] == s for r in rows) for s in (OK, UNPARSED, ERROR)},
        "accuracy": round(correct / graded, 4) if graded else None,
        "output_tokens": sum(r["output_tokens"] or 0 for r in rows),
        "by_category": categories,
    }


def format_table(summary: dict[str, Any]) -> str:
    """The end-of-run table: one line per category, then the total."""
    head = f"{'category':<14}{'chains':>8}{'answered':>10}{'graded':>8}{'correct':>9}{'accuracy':>10}"
    lines = [head, "-" * len(head)]

    def fmt(x):
        return "-" if x is None else f"{x:.1%}"

    for name, c in summary["by_category"].items():
        lines.append(f"{name:<14}{c['chains']:>8}{fmt(c['answer_rate']):>10}{c['graded']:>8}{c['correct']:>9}{fmt(c['accuracy']):>10}")
    s = summary["status"]
    total_graded = sum(c["graded"] for c in summary["by_category"].values())
    total_correct = sum(c["correct"] for c in summary["by_category"].values())
    answered = s["ok"] / summary["chains"] if summary["chains"] else None
    lines.append("-" * len(head))
    lines.append(f"{'total':<14}{summary['chains']:>8}{fmt(answered):>10}{total_graded:>8}{total_correct:>9}{fmt(summary['accuracy']):>10}")
    lines.append(f"problems {summary['problems']} | unparsed {s['unparsed']} | errors {s['error']} | output tokens {summary['output_tokens']}")
    return "\n".join(lines)
