"""From graded predictions to what a person reads in a minute: per-item results (`items`), every
number with its interval (`build_report`, the content of report.json), and report.md / report.html
with the plots embedded. Pure functions over plain rows; no Ray, no model."""

from __future__ import annotations

import base64
import html
import io
import math
from collections import defaultdict
from typing import Any

import numpy as np

from jobs.common.schemas import ERROR, ITEM_SCHEMA
from jobs.evaluate import metrics as M
from jobs.tasks.verify import vote, vote_groups

SHARES = M.SHARES


# --- items: one per (model, suite, problem) ------------------------------------------------------

def items(predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each (target, suite, problem)'s greedy answer and what its k samples say (agreement,
    majority@k, pass@k). A problem whose greedy request failed (status error) has no item."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for p in predictions:
        groups[(p["target"], p["suite"], p["problem_id"])].append(p)
    out = []
    for (target, suite, pid), rows in sorted(groups.items()):
        greedy = next((r for r in rows if r["sample_index"] == 0), None)
        if greedy is None or greedy["status"] == ERROR:
            continue
        sampled = sorted((r for r in rows if r["sample_index"] > 0 and r["status"] != ERROR), key=lambda r: r["sample_index"])
        k = len(sampled)
        item = {name: greedy.get(name) for name in ITEM_SCHEMA.names}
        item.update(correct=bool(greedy["correct"]), format_failure=bool(greedy["format_failure"]), samples=k,
                    samples_correct=sum(bool(r["correct"]) for r in sampled) if k else None,
                    agreement=None, majority_correct=None, pass_at_k=None)
        if k:
            # an unread answer agrees with nothing: it gets a group of its own
            answers = [r["answer"] if r["answer"] is not None else f"\x00unread{i}" for i, r in enumerate(sampled)]
            groups_k = vote_groups(answers, greedy["verifier"] or "exact", greedy["metadata"] or "{}")
            item["agreement"] = M.agreement(groups_k)
            item["majority_correct"] = bool(sampled[groups_k.index(vote(groups_k))]["correct"])
            item["pass_at_k"] = M.pass_at_k(k, item["samples_correct"], k)
        out.append(item)
    return out


def served_right(item: dict[str, Any], voted: bool) -> bool:
    """Whether the student's answer a router serves is right: the vote of its k samples where the
    router reads their agreement (serve.policies.votes), else its greedy answer."""
    return bool(item["majority_correct"] if voted else item["correct"])


def confidence(item: dict[str, Any], signal: str) -> float | None:
    """A student's confidence, in [0, 1]: `agreement` of its k samples (in their vote, the answer a
    router reading it serves), or `logprob`, the geometric mean probability of its greedy answer's
    tokens (exp of the mean log-probability)."""
    if signal == "agreement":
        return item["agreement"]
    lp = item["mean_logprob"]
    return None if lp is None else math.exp(lp)


# --- the report's numbers --------------------------------------------------------------------------

def _summary(rows: list[dict[str, Any]], conf: float) -> dict[str, Any]:
    out = M.accuracy([r["correct"] for r in rows], conf)
    out["format_failures"] = sum(r["format_failure"] for r in rows)
    out["format_failure_rate"] = out["format_failures"] / len(rows) if rows else None
    sampled = [r for r in rows if r["samples"]]
    if sampled:
        out["k"] = min(r["samples"] for r in sampled)
        out["pass_at_k"] = float(np.mean([r["pass_at_k"] for r in sampled]))
        out["majority_at_k"] = M.accuracy([bool(r["majority_correct"]) for r in sampled], conf)
    out["output_tokens"] = float(np.mean([r["output_tokens"] or 0 for r in rows])) if rows else None
    return out


def _by(rows: list[dict[str, Any]], key: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[r[key] or "?"].append(r)
    return dict(sorted(out.items()))


def _paired(a_rows: list[dict[str, Any]], b_rows: list[dict[str, Any]]) -> tuple[list[bool], list[bool], list[str]]:
    """Correctness of two models on the problems both answered, in one order."""
    b = {r["problem_id"]: r for r in b_rows}
    ids = [r["problem_id"] for r in a_rows if r["problem_id"] in b]
    a = {r["problem_id"]: r for r in a_rows}
    return [a[i]["correct"] for i in ids], [b[i]["correct"] for i in ids], ids


def _per_category(a_rows, b_rows, fn) -> dict[str, Any]:
    out = {"overall": fn(*_paired(a_rows, b_rows)[:2])}
    a_cat, b_cat = _by(a_rows, "category"), _by(b_rows, "category")
    out["by_category"] = {c: fn(*_paired(a_cat[c], b_cat.get(c, []))[:2]) for c in a_cat}
    return out


def build_report(all_items: list[dict[str, Any]], targets: list[dict[str, Any]], cfg_bootstrap: dict[str, Any],
                 costs: dict[str, dict[str, Any]], examples: int = 3, outputs: dict[tuple, str] | None = None,
                 suite_order: list[str] | None = None) -> dict[str, Any]:
    """Every number of the evaluation. `targets`: [{name, role, identity, prompt}]; `costs`: per
    target name (cost_per_query); `outputs`: (target, suite, problem) -> greedy output, for examples;
    `suite_order`: the suites as configured (else by name)."""
    conf = cfg_bootstrap["confidence"]
    boot = {"samples": cfg_bootstrap["samples"], "seed": cfg_bootstrap["seed"], "confidence": conf}
    by_target = _by(all_items, "target")
    roles = {t["name"]: t["role"] for t in targets}
    name_of = {role: next((t["name"] for t in targets if t["role"] == role), None) for role in ("teacher", "base", "student")}
    kinds = {r["suite"]: r["suite_kind"] for r in all_items}
    suites = [(s, kinds[s]) for s in (suite_order or sorted(kinds)) if s in kinds]

    report: dict[str, Any] = {"models": {}, "suites": [{"name": s, "kind": k} for s, k in suites], "comparisons": {},
                              "forgetting": {}, "template_gap": {}, "calibration": {}, "cost": {}, "examples": []}
    for t in targets:
        rows = by_target.get(t["name"], [])
        per_suite = {}
        for suite, suite_rows in _by(rows, "suite").items():
            per_suite[suite] = {"overall": _summary(suite_rows, conf),
                                "by_category": {c: _summary(v, conf) for c, v in _by(suite_rows, "category").items()},
                                "by_difficulty": {d: _summary(v, conf) for d, v in _by(suite_rows, "difficulty").items()}}
        report["models"][t["name"]] = {"role": t["role"], "model": t["identity"], "prompt": t["prompt"],
                                       "suites": per_suite, "cost": costs.get(t["name"])}

    def suite_rows(name: str | None, suite: str) -> list[dict[str, Any]]:
        return [r for r in by_target.get(name, []) if r["suite"] == suite] if name else []

    student, teacher, base = name_of["student"], name_of["teacher"], name_of["base"]
    for suite, kind in suites:
        comp: dict[str, Any] = {}
        s_rows, t_rows, b_rows = suite_rows(student, suite), suite_rows(teacher, suite), suite_rows(base, suite)
        if s_rows and t_rows:
            comp["recovery"] = _per_category(s_rows, t_rows, lambda a, b: M.recovery(a, b, **boot))
        if s_rows and b_rows:
            comp["gain_over_base"] = _per_category(s_rows, b_rows, lambda a, b: M.gain(a, b, **boot))
        if comp:
            report["comparisons"][suite] = comp
        if kind == "general" and s_rows and b_rows:
            a, b, _ = _paired(s_rows, b_rows)
            report["forgetting"][suite] = {"base": M.accuracy(b, conf), "student": M.accuracy(a, conf),
                                           "change": M.gain(a, b, **boot)}
        if kind == "shifted" and s_rows:
            held = [r for r in by_target.get(student, []) if r["suite_kind"] == "held_out"]
            report["template_gap"][suite] = {
                "in_distribution": M.accuracy([r["correct"] for r in held], conf),
                "shifted": M.accuracy([r["correct"] for r in s_rows], conf),
                "gap": M.unpaired_difference([r["correct"] for r in held], [r["correct"] for r in s_rows],
                                             samples=boot["samples"], seed=boot["seed"], confidence=conf)}

    # calibration of the student's confidence, and the router it implies, on the held-out suites
    if student and teacher:
        s_held = [r for r in by_target.get(student, []) if r["suite_kind"] == "held_out"]
        t_held = {(r["suite"], r["problem_id"]): r for r in by_target.get(teacher, []) if r["suite_kind"] == "held_out"}
        pairs = [(r, t_held[(r["suite"], r["problem_id"])]) for r in s_held if (r["suite"], r["problem_id"]) in t_held]
        for signal in ("agreement", "logprob"):
            usable = [(s, t) for s, t in pairs if confidence(s, signal) is not None]
            if not usable:
                continue
            c = [confidence(s, signal) for s, _ in usable]
            # under agreement the router serves the vote of the k samples: that answer is graded
            sc, tc = [served_right(s, signal == "agreement") for s, _ in usable], [t["correct"] for _, t in usable]
            report["calibration"][signal] = {"n": len(usable), "reliability": M.reliability(c, sc),
                                             **M.router_summary(c, sc, tc, SHARES, **boot)}

    # cost: per query and per 1,000 queries, and what answering with the student saves
    for name, c in costs.items():
        if c and c.get("per_query") is not None:
            report["cost"][name] = {"per_1k_queries": c["per_query"] * 1000, **c}
    if student in report["cost"] and teacher in report["cost"] and report["cost"][teacher]["per_1k_queries"]:
        s_cost, t_cost = report["cost"][student]["per_1k_queries"], report["cost"][teacher]["per_1k_queries"]
        report["cost"]["student_saves"] = 1 - s_cost / t_cost

    report["examples"] = pick_examples(all_items, name_of, outputs or {}, examples)
    report["roles"] = roles
    return report


def pick_examples(all_items: list[dict[str, Any]], name_of: dict[str, str | None], outputs: dict[tuple, str],
                  n: int) -> list[dict[str, Any]]:
    """Held-out problems shown side by side: where the student is right and its base wrong first,
    then where the teacher is right and the student wrong, then the rest (in problem order)."""
    student, base, teacher = name_of["student"], name_of["base"], name_of["teacher"]
    if not student or not n:
        return []
    index = {(r["target"], r["suite"], r["problem_id"]): r for r in all_items}
    held = [r for r in all_items if r["target"] == student and r["suite_kind"] == "held_out"]

    def rank(r):
        b = index.get((base, r["suite"], r["problem_id"]))
        t = index.get((teacher, r["suite"], r["problem_id"]))
        if r["correct"] and b is not None and not b["correct"]:
            return 0
        if not r["correct"] and t is not None and t["correct"]:
            return 1
        return 2

    out = []
    for r in sorted(held, key=lambda r: (rank(r), r["suite"], r["problem_id"]))[:n]:
        answers = {}
        for name in (teacher, base, student):
            other = index.get((name, r["suite"], r["problem_id"])) if name else None
            if other is not None:
                answers[name] = {"output": outputs.get((name, r["suite"], r["problem_id"])), "answer": other["answer"],
                                 "correct": other["correct"]}
        out.append({"suite": r["suite"], "problem_id": r["problem_id"], "category": r["category"],
                    "question": r["question"], "gold_answer": r["gold_answer"], "answers": answers})
    return out


# --- rendering ---------------------------------------------------------------------------------------

def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def fmt_ci(ci) -> str:
    return "" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def fmt_ratio(v: dict[str, Any]) -> str:
    if v.get("value") is None:
        return "-"
    ci = v.get("ci")
    return f"{v['value']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def fmt_diff(v: dict[str, Any]) -> str:
    if v.get("value") is None:
        return "-"
    ci = v.get("ci")
    out = f"{100 * v['value']:+.1f} pts" + (f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "")
    if "mcnemar" in v:
        out += f", McNemar p={v['mcnemar']['p_value']:.3g}"
    return out


def _table(header: list[str], align: str, rows: list[list[str]]) -> list[str]:
    """A markdown table and the blank line after it; `align` holds l or r per column."""
    return (["| " + " | ".join(header) + " |", "|" + "".join(" --- |" if a == "l" else " ---: |" for a in align)]
            + ["| " + " | ".join(r) + " |" for r in rows] + [""])


def markdown(report: dict[str, Any], plots: dict[str, str] | None = None) -> str:
    """report.md: the tables; `plots` maps a plot's name to its file (embedded by name)."""
    lines = ["# Evaluation report", ""]
    models = report["models"]
    for s in report["suites"]:
        suite = s["name"]
        cats = sorted({c for m in models.values() for c in m["suites"].get(suite, {}).get("by_category", {})})
        rows = []
        for name, m in models.items():
            res = m["suites"].get(suite)
            if not res:
                continue
            cells = [(fmt_pct(res["by_category"][c]["accuracy"]) + fmt_ci(res["by_category"][c]["ci"])) if c in res["by_category"] else "-"
                     for c in cats]
            o = res["overall"]
            rows.append([name, *cells, f"{fmt_pct(o['accuracy'])}{fmt_ci(o['ci'])} (n={o['n']})",
                         f"{o['format_failures']} ({fmt_pct(o['format_failure_rate'])})"])
        lines += [f"## Suite `{suite}` ({s['kind']})", ""]
        lines += _table(["model", *cats, "overall", "format failures"], "l" + "r" * (len(cats) + 2), rows)[:-1]
        comp = report["comparisons"].get(suite, {})
        if "recovery" in comp:
            r = comp["recovery"]
            lines += ["", "Recovery (student / teacher accuracy, paired bootstrap 95% interval): overall "
                      f"{fmt_ratio(r['overall'])}; " + "; ".join(f"{c} {fmt_ratio(v)}" for c, v in r["by_category"].items())]
        if "gain_over_base" in comp:
            g = comp["gain_over_base"]
            lines += ["", f"Gain over the base student: overall {fmt_diff(g['overall'])}; "
                      + "; ".join(f"{c} {fmt_diff(v)}" for c, v in g["by_category"].items())]
        lines.append("")
    if report["forgetting"]:
        lines += ["## Forgetting (general tasks outside the training mix)", ""]
        lines += _table(["suite", "base", "student", "change"], "lrrl",
                        [[suite, f"{fmt_pct(f['base']['accuracy'])}{fmt_ci(f['base']['ci'])}",
                          f"{fmt_pct(f['student']['accuracy'])}{fmt_ci(f['student']['ci'])}", fmt_diff(f["change"])]
                         for suite, f in report["forgetting"].items()])
    if report["template_gap"]:
        lines += ["## Template overfitting (trained tasks under other templates or difficulty)", ""]
        lines += _table(["suite", "in distribution", "shifted", "gap"], "lrrl",
                        [[suite, fmt_pct(g["in_distribution"]["accuracy"]), fmt_pct(g["shifted"]["accuracy"]), fmt_diff(g["gap"])]
                         for suite, g in report["template_gap"].items()])
    if report["calibration"]:
        lines += ["## The student's confidence and a router built on it (held-out suites)", ""]
        cal = report["calibration"]
        unreliable = {s: fmt_diff(c["gap"]) for s, c in cal.items()
                      if c["apgr"] is not None and not c.get("apgr_reliable", True)}
        if "agreement" in cal:
            lines += ["The agreement row grades the answer a router reading agreement serves, the vote of the "
                      "student's samples; the logprob row grades the greedy answer.", ""]
        lines += _table(["signal", "items", "ECE", "APGR", "escalation for 50% / 80% / 95% of the gap",
                         "best router: accuracy (escalated)"], "lrrrlr",
                        [[signal, str(c["n"]), f"{c['reliability']['ece']:.3f}",
                          "-" if c["apgr"] is None else f"{c['apgr']:.2f}" + ("" if c.get("apgr_reliable", True) else " *"),
                          " / ".join(fmt_pct(c["escalation_for_share"][str(x)]) for x in SHARES),
                          "-" if not c.get("best") else f"{fmt_pct(c['best']['accuracy'])} ({fmt_pct(c['best']['rate'])})"]
                         for signal, c in cal.items()])
        if unreliable:
            gaps = (next(iter(unreliable.values())) if len(set(unreliable.values())) == 1
                    else "; ".join(f"{gap} on the items with {s}" for s, gap in unreliable.items()))
            lines[-1:-1] = ["", f"\\* The teacher is ahead of the student by {gaps}: an interval "
                            "that reaches zero. APGR divides by that gap, so here it says little; read the best "
                            "router's point instead, and calibrate the router to an accuracy floor at or above the "
                            "teacher's (`cotd serve calibrate`)."]
    cost = {k: v for k, v in report["cost"].items() if isinstance(v, dict)}
    if cost:
        lines += ["## Cost", ""]
        lines += _table(["model", "tokens per answer", "engine-seconds per query", "per 1,000 queries"], "lrrr",
                        [[name, f"{c['output_tokens']:.0f}",
                          "-" if c.get("engine_seconds_per_query") is None else f"{c['engine_seconds_per_query']:.3f}",
                          f"${c['per_1k_queries']:.4f}"] for name, c in cost.items()])[:-1]
        if "student_saves" in report["cost"]:
            lines += ["", f"Answering with the student instead of the teacher saves {fmt_pct(report['cost']['student_saves'])} "
                      "of the cost per query."]
        lines.append("")
    for name, path in (plots or {}).items():
        lines += [f"![{name}]({path})", ""]
    if report["examples"]:
        lines += ["## Examples", ""]
        for e in report["examples"]:
            lines += [f"### {e['problem_id']} ({e['category']}, suite {e['suite']}): gold `{e['gold_answer']}`", "",
                      "> " + e["question"].strip().replace("\n", "\n> "), ""]
            for name, a in e["answers"].items():
                lines += [f"**{name}** ({'right' if a['correct'] else 'wrong'}, answer `{a['answer']}`):", "", "```",
                          (a["output"] or "").strip(), "```", ""]
    return "\n".join(lines) + "\n"


def plots(report: dict[str, Any]) -> dict[str, bytes]:
    """PNG plots: accuracy per category with intervals (one per suite), recovery per category, the
    reliability diagram and the escalation curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}

    def png(fig) -> bytes:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        return buf.getvalue()

    models = report["models"]
    for s in report["suites"]:
        suite = s["name"]
        cats = sorted({c for m in models.values() for c in m["suites"].get(suite, {}).get("by_category", {})}) + ["overall"]
        names = [n for n, m in models.items() if suite in m["suites"]]
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cats)), 4))
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            res = models[name]["suites"][suite]
            vals, lo, hi = [], [], []
            for c in cats:
                r = res["overall"] if c == "overall" else res["by_category"].get(c)
                acc = r["accuracy"] if r and r["accuracy"] is not None else 0.0
                ci = r["ci"] if r and r["ci"] else (acc, acc)
                vals.append(acc)
                lo.append(acc - ci[0])
                hi.append(ci[1] - acc)
            x = np.arange(len(cats)) + (i - (len(names) - 1) / 2) * width
            ax.bar(x, vals, width, yerr=[lo, hi], capsize=3, label=name)
        ax.set_xticks(np.arange(len(cats)), cats)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy (95% interval)")
        ax.set_title(f"suite {suite} ({s['kind']})")
        ax.legend()
        out[f"accuracy-{suite}"] = png(fig)
        rec = report["comparisons"].get(suite, {}).get("recovery")
        if rec:
            fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(rec["by_category"]) + 1.4), 3.6))
            items = list(rec["by_category"].items()) + [("overall", rec["overall"])]
            vals = [v["value"] or 0.0 for _, v in items]
            err = [[(v["value"] or 0) - v["ci"][0] if v["ci"] else 0 for _, v in items],
                   [v["ci"][1] - (v["value"] or 0) if v["ci"] else 0 for _, v in items]]
            ax.bar([c for c, _ in items], vals, yerr=np.clip(err, 0, None), capsize=3, color="tab:purple")
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
            ax.set_ylabel("student / teacher accuracy")
            ax.set_title(f"recovery rate, suite {suite}")
            out[f"recovery-{suite}"] = png(fig)
    if report["calibration"]:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for signal, c in report["calibration"].items():
            bins = c["reliability"]["bins"]
            axes[0].plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-",
                         label=f"{signal} (ECE {c['reliability']['ece']:.3f})")
            axes[1].plot([p["rate"] for p in c["escalation"]], [p["accuracy"] for p in c["escalation"]], "-",
                         label=f"{signal}" + (f" (APGR {c['apgr']:.2f})" if c["apgr"] is not None else ""))
        axes[0].plot([0, 1], [0, 1], color="gray", lw=0.8, ls="--")
        axes[0].set(xlabel="student confidence", ylabel="student accuracy", title="reliability", xlim=(0, 1), ylim=(0, 1))
        axes[1].set(xlabel="share of queries escalated to the teacher", ylabel="accuracy", title="router: accuracy by escalation rate")
        axes[0].legend()
        axes[1].legend()
        out["calibration"] = png(fig)
    return out


def to_html(md_text: str, images: dict[str, bytes]) -> str:
    """A self-contained HTML page: the Markdown report's tables and text, the plots embedded."""
    body, in_table, in_code = [], False, False
    for line in md_text.splitlines():
        if line.startswith("```"):
            body.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            body.append(html.escape(line))
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= set("-: ") for c in cells):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                body.append("<table>")
                in_table = True
            body.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("!["):
            name = line[2:line.index("]")]
            if name in images:
                data = base64.b64encode(images[name]).decode()
                body.append(f'<p><img alt="{html.escape(name)}" src="data:image/png;base64,{data}"></p>')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("> "):
            body.append(f"<blockquote>{html.escape(line[2:])}</blockquote>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        body.append("</table>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
             "pre{background:#f6f6f6;padding:6px;white-space:pre-wrap}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>cotd evaluation</title><style>{style}</style></head><body>\n" \
           + "\n".join(body) + "\n</body></html>\n"
