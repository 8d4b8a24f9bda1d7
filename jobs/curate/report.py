"""The curation report: what was kept, what was dropped and why (by reason and category), the
examples written, and the distributions of steps and lengths, as numbers (manifest), a Markdown
table (report.md) and a plot (report.png)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from jobs.curate.filters import REASONS


def _quantiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    v = sorted(values)

    def q(p: float) -> float:
        return float(v[min(len(v) - 1, int(round(p * (len(v) - 1))))])

    return {"n": len(v), "min": float(v[0]), "p25": q(0.25), "median": q(0.5), "p75": q(0.75), "max": float(v[-1]),
            "mean": round(sum(v) / len(v), 2)}


def summarize(decisions: list[dict[str, Any]], examples: dict[str, Counter]) -> dict[str, Any]:
    """Counts and distributions from the decision rows and the example counts per split and kind."""
    reasons = Counter(d["reason"] for d in decisions if not d["kept"])
    by_cat: dict[str, dict[str, Any]] = {}
    for d in decisions:
        c = by_cat.setdefault(d["category"] or "?", {"chains": 0, "kept": 0, "dropped": Counter()})
        c["chains"] += 1
        if d["kept"]:
            c["kept"] += 1
        else:
            c["dropped"][d["reason"]] += 1
    dist = {}
    for metric in ("num_steps", "chars"):
        for group, kept in (("kept", True), ("dropped", False)):
            dist[f"{metric}/{group}"] = _quantiles([d[metric] for d in decisions if d["kept"] == kept and d[metric] is not None])
    scores = [d["judge_score"] for d in decisions if d["judge_score"] is not None]
    return {
        "chains": len(decisions), "kept": sum(d["kept"] for d in decisions),
        "problems": len({d["problem_id"] for d in decisions}),
        "problems_kept": len({d["problem_id"] for d in decisions if d["kept"]}),
        "dropped_by_reason": {r: reasons[r] for r in REASONS if reasons[r]},
        "by_category": {k: {"chains": v["chains"], "kept": v["kept"], "dropped": dict(v["dropped"])} for k, v in sorted(by_cat.items())},
        "examples": {split: dict(kinds) for split, kinds in sorted(examples.items())},
        "distributions": dist,
        "judge": {"readable": len(scores), "mean_score": round(sum(scores) / len(scores), 3) if scores else None},
    }


def markdown(s: dict[str, Any], plot: str | None) -> str:
    cats = list(s["by_category"])
    lines = ["# Curation report", "",
             f"{s['kept']} of {s['chains']} chains kept ({_pct(s['kept'], s['chains'])}), "
             f"from {s['problems_kept']} of {s['problems']} problems.", "",
             "## By category", "", "| category | chains | kept | kept % |", "| --- | ---: | ---: | ---: |"]
    for c, v in s["by_category"].items():
        lines.append(f"| {c} | {v['chains']} | {v['kept']} | {_pct(v['kept'], v['chains'])} |")
    lines += ["", "## Dropped, by reason and category", "",
              "| reason | total | " + " | ".join(cats) + " |", "| --- | ---: |" + " ---: |" * len(cats)]
    for r, n in s["dropped_by_reason"].items():
        lines.append(f"| {r} | {n} | " + " | ".join(str(s["by_category"][c]["dropped"].get(r, 0)) for c in cats) + " |")
    kinds = sorted({k for v in s["examples"].values() for k in v})
    lines += ["", "## Training examples", "", "| split | " + " | ".join(kinds) + " | total |",
              "| --- |" + " ---: |" * (len(kinds) + 1)]
    for split, v in s["examples"].items():
        lines.append(f"| {split} | " + " | ".join(str(v.get(k, 0)) for k in kinds) + f" | {sum(v.values())} |")
    lines += ["", "## Distributions", "", "| metric | chains | n | min | p25 | median | p75 | max | mean |",
              "| --- | --- |" + " ---: |" * 7]
    for key, q in s["distributions"].items():
        metric, group = key.split("/")
        if q:
            lines.append(f"| {metric} | {group} | {q['n']} | {q['min']:g} | {q['p25']:g} | {q['median']:g} | "
                         f"{q['p75']:g} | {q['max']:g} | {q['mean']:g} |")
    if s["judge"]["readable"]:
        lines += ["", f"Judge: {s['judge']['readable']} readable judgements, mean rating {s['judge']['mean_score']}."]
    if plot:
        lines += ["", f"![steps, lengths and drop reasons]({plot})"]
    return "\n".join(lines) + "\n"


def plot(decisions: list[dict[str, Any]], s: dict[str, Any], path: Path) -> None:
    """Three panels: drop reasons, steps per chain and characters per chain (kept vs dropped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    reasons = s["dropped_by_reason"]
    axes[0].barh(list(reasons)[::-1] or ["(none)"], list(reasons.values())[::-1] or [0], color="tab:red")
    axes[0].set_title(f"dropped chains by reason ({s['chains'] - s['kept']} of {s['chains']})")
    for ax, metric, label in ((axes[1], "num_steps", "steps per chain"), (axes[2], "chars", "characters per chain")):
        for kept, color in ((True, "tab:green"), (False, "tab:red")):
            vals = [d[metric] for d in decisions if d["kept"] == kept and d[metric] is not None]
            if vals:
                ax.hist(vals, bins=min(30, max(5, len(set(vals)))), alpha=0.6, color=color,
                        label=f"{'kept' if kept else 'dropped'} ({len(vals)})")
        ax.set_title(label)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"kept {s['kept']}/{s['chains']} chains ({_pct(s['kept'], s['chains'])}) from "
             f"{s['problems_kept']}/{s['problems']} problems"]
    for c, v in s["by_category"].items():
        top = ", ".join(f"{r} {n}" for r, n in Counter(v["dropped"]).most_common(3))
        lines.append(f"  {c:<12} {v['kept']:>5}/{v['chains']:<5} kept   dropped: {top or '-'}")
    for split, v in s["examples"].items():
        lines.append(f"  {split:<12} " + (", ".join(f"{k} {n}" for k, n in sorted(v.items())) or "no examples"))
    return "\n".join(lines)


def _pct(a: int, b: int) -> str:
    return f"{100.0 * a / b:.1f}%" if b else "-"
