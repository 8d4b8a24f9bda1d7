"""From crafted predictions to items, the report's numbers and its files (no Ray, no model)."""

from __future__ import annotations

import json

import pytest

from jobs.common.schemas import ITEM_SCHEMA, PREDICTION_SCHEMA
from jobs.evaluate import report as R


def pred(target, pid, i, answer, correct, suite="held", kind="held_out", category="math", lp=-0.1, status="ok"):
    row = {name: None for name in PREDICTION_SCHEMA.names}
    row.update(target=target, target_key=f"k-{target}", role=target, suite=suite, suite_kind=kind, problem_id=pid,
               category=category, difficulty="default", question=f"q {pid}", gold_answer="4", verifier="math",
               metadata="{}", sample_index=i, answer=answer, correct=correct, format_failure=answer is None,
               status=status if answer is not None or status == "error" else "unparsed", output=f"... Answer: {answer}",
               output_tokens=10, prompt_tokens=50, mean_logprob=lp)
    return row


def crafted():
    rows = []
    # teacher right on p0-p3, wrong on p4; base right on p0 only; student right on p0-p2, unparsed on p4
    for pid, t, b, s in [("p0", 1, 1, 1), ("p1", 1, 0, 1), ("p2", 1, 0, 1), ("p3", 1, 0, 0), ("p4", 0, 0, None)]:
        rows.append(pred("teacher", pid, 0, "4" if t else "5", bool(t)))
        rows.append(pred("base", pid, 0, "4" if b else "7", bool(b), lp=-2.0))
        rows.append(pred("student", pid, 0, None if s is None else ("4" if s else "6"), bool(s), lp=-0.2 if s else -1.5))
        # the student's two samples: agree with each other on its right problems
        for i in (1, 2):
            right = bool(s) and (i == 1 or pid != "p2")
            rows.append(pred("student", pid, i, "4" if right else f"{i}9", right))
    rows.append(pred("student", "g0", 0, "x", False, suite="gen", kind="general", category="general"))
    rows.append(pred("base", "g0", 0, "x", True, suite="gen", kind="general", category="general"))
    rows.append(pred("teacher", "e0", 0, None, False, status="error"))  # a failed request makes no item
    return rows


TARGETS = [{"name": n, "role": n, "identity": n, "prompt": {}} for n in ("teacher", "base", "student")]


def test_items_hold_the_greedy_answer_and_what_the_samples_say():
    its = R.items(crafted())
    assert all(set(i) == set(ITEM_SCHEMA.names) for i in its)
    by = {(i["target"], i["problem_id"]): i for i in its}
    assert ("teacher", "e0") not in by  # the failed request
    s0, s2, s4 = by[("student", "p0")], by[("student", "p2")], by[("student", "p4")]
    assert (s0["samples"], s0["samples_correct"], s0["agreement"], s0["majority_correct"], s0["pass_at_k"]) == (2, 2, 1.0, True, 1.0)
    assert (s2["samples_correct"], s2["agreement"], s2["pass_at_k"]) == (1, 0.5, 1.0)
    assert s2["majority_correct"] is True  # a tie goes to the answer sampled first, as the router serves it
    assert s4["format_failure"] and not s4["correct"]
    assert by[("teacher", "p0")]["samples"] == 0 and by[("teacher", "p0")]["agreement"] is None


def test_report_numbers():
    rep = R.build_report(R.items(crafted()), TARGETS, {"samples": 1000, "seed": 0, "confidence": 0.95}, {}, examples=2)
    held = {n: rep["models"][n]["suites"]["held"]["overall"] for n in ("teacher", "base", "student")}
    assert [held[n]["accuracy"] for n in ("teacher", "base", "student")] == [0.8, 0.2, 0.6]
    assert held["student"]["format_failures"] == 1 and held["student"]["format_failure_rate"] == 0.2
    assert held["student"]["pass_at_k"] == pytest.approx(3 / 5) and held["student"]["k"] == 2
    comp = rep["comparisons"]["held"]
    assert comp["recovery"]["overall"]["value"] == pytest.approx(0.6 / 0.8)
    assert comp["gain_over_base"]["overall"]["value"] == pytest.approx(0.4)
    assert comp["gain_over_base"]["overall"]["mcnemar"]["only_a"] == 2
    f = rep["forgetting"]["gen"]
    assert f["base"]["accuracy"] == 1.0 and f["student"]["accuracy"] == 0.0 and f["change"]["value"] == -1.0
    # calibration: the logprob signal puts the student's right answers above its wrong ones
    cal = rep["calibration"]["logprob"]
    assert cal["n"] == 5 and cal["escalation"][0]["accuracy"] == 0.6 and cal["escalation"][-1]["accuracy"] == 0.8
    assert cal["apgr"] is not None and cal["apgr"] > 0.5
    assert cal["best"]["accuracy"] == 0.8 and cal["best"]["escalated"] == 1  # p3 to the teacher (wrong on p4 too)
    # 0.8 against 0.6 on five problems: the gap's interval reaches zero, so APGR is flagged in the report
    assert cal["gap"]["value"] == pytest.approx(0.2) and cal["gap"]["ci"][0] <= 0 and cal["apgr_reliable"] is False
    md = R.markdown(rep)
    assert "| logprob | 5 |" in md and "80.0% (" in md and "APGR divides by that gap" in md
    assert "agreement" in rep["calibration"]
    # two signals whose gaps differ (measured on different items): the footnote names each
    rep["calibration"]["agreement"].update(apgr=0.5, apgr_reliable=False, gap={"value": 0.1, "ci": [-0.2, 0.4]})
    md = R.markdown(rep)
    assert "+20.0 pts" in md and "+10.0 pts [-20.0, +40.0] on the items with agreement" in md
    # examples: where the student is right and its base wrong come first
    assert [e["problem_id"] for e in rep["examples"]] == ["p1", "p2"]
    assert set(rep["examples"][0]["answers"]) == {"teacher", "base", "student"}


def test_costs_and_files(tmp_path):
    costs = {"teacher": {"per_query": 0.004, "output_tokens": 100.0, "engine_seconds_per_query": 2.0},
             "student": {"per_query": 0.0005, "output_tokens": 80.0, "engine_seconds_per_query": 0.25}}
    rep = R.build_report(R.items(crafted()), TARGETS, {"samples": 500, "seed": 0, "confidence": 0.95}, costs)
    assert rep["cost"]["teacher"]["per_1k_queries"] == pytest.approx(4.0)
    assert rep["cost"]["student_saves"] == pytest.approx(1 - 0.0005 / 0.004)
    images = R.plots(rep)
    assert {"accuracy-held", "recovery-held", "calibration"} <= set(images)
    assert all(data[:8] == b"\x89PNG\r\n\x1a\n" for data in images.values())
    md = R.markdown(rep, {n: f"{n}.png" for n in images})
    assert "| student |" in md and "Recovery" in md and "![calibration](calibration.png)" in md and "saves" in md
    page = R.to_html(md, images)
    assert page.count("data:image/png;base64,") == len(images) and "<table>" in page
    json.dumps(rep)  # report.json holds plain data
