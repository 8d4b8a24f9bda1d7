"""Calibrating the router from an evaluation (`cotd serve calibrate`): the student's confidence and
correctness on held-out problems, and the teacher's correctness on the same ones, give each
policy's threshold for a stated target (a share of the teacher's accuracy, or an escalation
budget), the learned router's weights, and the per-category statistics drift is measured against.
Pure functions over the evaluation's items (jobs.common.schemas.ITEM_SCHEMA rows); no Ray.

    cotd serve calibrate --items runs/q1/eval/items --out runs/q1/router.json --target-share 0.95
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np

from jobs.evaluate import metrics as M
from jobs.evaluate.report import served_right
from serve.policies import Signals, decide, features, signal_value, votes

SIGNALS = ("agreement", "logprob")


def signals_of(item: dict[str, Any]) -> Signals:
    lp = item.get("mean_logprob")
    return Signals(question=item.get("question") or "", category=item.get("category"),
                   agreement=item.get("agreement"), token_confidence=None if lp is None else math.exp(lp))


def pairs(items: list[dict[str, Any]], student: str = "student", teacher: str = "teacher") -> list[tuple[dict, dict]]:
    """(student item, teacher item) on the same held-out problems."""
    held = [i for i in items if i.get("suite_kind") in (None, "held_out")]
    t = {(i["suite"], i["problem_id"]): i for i in held if i["target"] == teacher}
    return [(s, t[(s["suite"], s["problem_id"])]) for s in held if s["target"] == student and (s["suite"], s["problem_id"]) in t]


def samples_of(matched: list[tuple[dict, dict]]) -> int:
    """The student's sampled answers per problem in these items (k; 0 where any problem has none)."""
    return min((int(s.get("samples") or 0) for s, _ in matched), default=0)


def learned_votes(k: int) -> bool:
    """Whether a learned router fitted on items with k samples per problem serves their vote."""
    return votes("learned", "agreement", {"samples": k})


def served(matched: list[tuple[dict, dict]], voted: bool) -> np.ndarray:
    """Whether the student's answer a router serves is right on each pair (the vote, or the greedy answer)."""
    return np.array([served_right(s, voted) for s, _ in matched], dtype=bool)


def feature_matrix(sigs: list[Signals], categories: list[str]) -> np.ndarray:
    """The learned router's inputs (serve.policies.features), one row per query."""
    return np.array([features(s, categories) for s in sigs])


def predict(weights: np.ndarray | list[float], x: np.ndarray) -> np.ndarray:
    """The learned router's estimate that the student is right, for each row of `feature_matrix`."""
    return 1 / (1 + np.exp(-np.clip(x @ np.asarray(weights), -30, 30)))


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, iterations: int = 50) -> np.ndarray:
    """L2-regularized logistic regression by Newton's method (the bias, column 0, unpenalized)."""
    w = np.zeros(x.shape[1])
    penalty = np.full(x.shape[1], l2)
    penalty[0] = 0.0
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-np.clip(x @ w, -30, 30)))
        grad = x.T @ (p - y) + penalty * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(penalty) + 1e-9 * np.eye(x.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def _target(floor_share: float | None, budget: float | None, teacher_acc: float,
            accuracy: float | None = None) -> dict[str, float | None]:
    floor = accuracy if accuracy is not None else None if floor_share is None else floor_share * teacher_acc
    return {"floor": floor, "budget": budget}


def calibrate(items: list[dict[str, Any]], target_share: float | None = 0.95, budget: float | None = None,
              student: str = "student", teacher: str = "teacher", accuracy: float | None = None) -> dict[str, Any]:
    """Thresholds for each confidence signal and the learned router, calibrated on `items`, plus
    the statistics drift is measured against. `target_share`: the router must reach this share of
    the teacher's accuracy with as few escalations as it can; `accuracy`: the same for an absolute
    accuracy floor; `budget`: the best accuracy within this share of escalated queries (one of the
    three). A signal whose curve never reaches the floor gets no threshold and is listed in
    `unreached`."""
    if sum(t is not None for t in (target_share, budget, accuracy)) != 1:
        raise ValueError("calibrate to exactly one target: target_share, accuracy or budget")
    matched = pairs(items, student, teacher)
    if not matched:
        raise ValueError(f"no held-out problem was answered by both {student!r} and {teacher!r}")
    sc = np.array([bool(s["correct"]) for s, _ in matched])
    tc = np.array([bool(t["correct"]) for _, t in matched])
    target = _target(target_share, budget, float(tc.mean()), accuracy)
    out: dict[str, Any] = {"n": len(matched), "student_accuracy": float(sc.mean()), "teacher_accuracy": float(tc.mean()),
                           "target": {"share": target_share, "accuracy": accuracy, "budget": budget,
                                      "floor": target["floor"]},
                           "thresholds": {}, "learned": None, "unreached": []}
    k = samples_of(matched)
    out["samples"] = k
    ks = sorted({int(s.get("samples") or 0) for s, _ in matched})
    out["warnings"] = [] if len(ks) == 1 else [
        f"the student's items have {' or '.join(map(str, ks))} sampled answers per problem (evaluations pooled?): "
        f"calibrated as k={k}" + (", so neither the agreement threshold nor the learned router's vote is fitted"
                                 if k == 0 else ", the agreement of the others read on that scale")]
    sigs = [signals_of(s) for s, _ in matched]
    for signal in SIGNALS:
        conf = [signal_value(s, signal) for s in sigs]
        if any(c is None for c in conf):
            continue
        right = served(matched, votes("confidence", signal))
        t = M.threshold_for(conf, right, tc, floor=target["floor"], budget=budget)
        if t is not None:
            out["thresholds"][signal] = t
        else:
            out["unreached"].append(signal)
    # the learned router reads agreement where the items have samples, and then serves their vote
    right = served(matched, learned_votes(k))
    categories = sorted({s.category for s in sigs if s.category})
    x = feature_matrix(sigs, categories)
    weights = fit_logistic(x, right.astype(float))
    p = predict(weights, x)
    t = M.threshold_for(p, right, tc, floor=target["floor"], budget=budget)
    if t is not None:
        out["learned"] = {"weights": weights.tolist(), "categories": categories, "threshold": t["threshold"],
                          "rate": t["rate"], "accuracy": t["accuracy"], "samples": k,
                          "features": ["bias", "agreement", "token_confidence", "question_kchars"]
                          + [f"category={c}" for c in categories]}
    else:
        out["unreached"].append("learned")
    out["by_category"] = category_stats(matched, out)
    return out


def category_stats(matched: list[tuple[dict, dict]], calibration: dict[str, Any]) -> dict[str, Any]:
    """Per category: the student's mean confidence per signal, and the share each calibrated
    threshold escalates: what drift is measured against."""
    out: dict[str, Any] = {}
    for s, _ in matched:
        c = out.setdefault(s["category"] or "?", {"n": 0, "confidence": {}, "escalated": {}})
        c["n"] += 1
        sig = signals_of(s)
        for signal, t in calibration["thresholds"].items():
            v = signal_value(sig, signal)
            c["confidence"][signal] = c["confidence"].get(signal, 0.0) + v
            c["escalated"][signal] = c["escalated"].get(signal, 0) + (v < t["threshold"])
    for c in out.values():
        c["confidence"] = {k: v / c["n"] for k, v in c["confidence"].items()}
        c["escalated"] = {k: v / c["n"] for k, v in c["escalated"].items()}
    return out


def fold_of(pair: tuple[dict, dict], folds: int) -> int:
    """A problem's fold, by a hash of its ids: the same problem lands in the same fold every run."""
    key = f"{pair[0]['suite']}|{pair[0]['problem_id']}"
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % folds


def split(matched: list[tuple[dict, dict]]) -> tuple[list, list]:
    """Two halves of the problems: calibrate on one, measure on the other."""
    return [p for p in matched if fold_of(p, 2) == 0], [p for p in matched if fold_of(p, 2) == 1]


def crossfit_learned(matched: list[tuple[dict, dict]], folds: int = 5) -> np.ndarray | None:
    """The learned router's estimate for each pair from a model fitted on the other folds only: its
    curve (and APGR) out of sample, as the confidence signals' need no fitting. None when a fold
    leaves nothing to fit on."""
    k = samples_of(matched)
    sigs = [signals_of(s) for s, _ in matched]
    right = served(matched, learned_votes(k)).astype(float)
    x = feature_matrix(sigs, sorted({s.category for s in sigs if s.category}))
    which = np.array([fold_of(p, folds) for p in matched])
    out = np.zeros(len(matched))
    for f in range(folds):
        fit, held = which != f, which == f
        if not held.any():
            continue
        if not fit.any():
            return None
        out[held] = predict(fit_logistic(x[fit], right[fit]), x[held])
    return out


def route_all(calibration: dict[str, Any], matched: list[tuple[dict, dict]], kind: str, signal: str = "logprob") -> dict[str, Any]:
    """What a policy does on held-out pairs: accuracy, share escalated (student answers when not),
    and whether the answer it chose was right, per pair."""
    threshold = (calibration["thresholds"].get(signal) or {}).get("threshold") if kind == "confidence" else None
    if kind == "confidence" and threshold is None:
        return {"accuracy": None, "escalated": None, "n": len(matched), "right": []}
    voted = votes(kind, signal, calibration.get("learned"))
    right, escalated = [], 0
    for s, t in matched:
        d = decide(kind, signals_of(s), signal=signal, threshold=threshold, learned=calibration.get("learned"))
        escalated += d.target == "teacher"
        right.append(bool(t["correct"]) if d.target == "teacher" else served_right(s, voted))
    n = len(matched)
    return {"accuracy": sum(right) / n if n else None, "escalated": escalated / n if n else None, "n": n, "right": right}


def cost_quality(items: list[dict[str, Any]], target_share: float = 0.95, student: str = "student",
                 teacher: str = "teacher") -> dict[str, Any]:
    """Each policy calibrated on one half of the problems and measured on the other (both ways,
    pooled): accuracy and escalation share, the always-student and always-teacher points, and
    RouteLLM's summaries of each signal's full curve (APGR, escalation for 50/80/95% of the
    teacher's quality), the learned router's from estimates fitted on other folds."""
    matched = pairs(items, student, teacher)
    halves = split(matched)
    policies = {"always_student": ("always_student", None), "always_teacher": ("always_teacher", None),
                **{f"confidence:{s}": ("confidence", s) for s in SIGNALS}, "learned": ("learned", None)}
    results: dict[str, Any] = {}
    for name, (kind, signal) in policies.items():
        right, teacher_right, escalated = [], [], 0.0
        for fit_on, test_on in ((halves[0], halves[1]), (halves[1], halves[0])):
            if not fit_on or not test_on:
                continue
            try:
                cal = calibrate([x for pair in fit_on for x in pair], target_share, None, student, teacher)
            except ValueError:
                continue
            if kind == "learned" and cal["learned"] is None:
                continue
            r = route_all(cal, test_on, kind, signal or "logprob")
            if r["accuracy"] is None:
                continue
            right += r["right"]
            teacher_right += [bool(t["correct"]) for _, t in test_on]
            escalated += r["escalated"] * r["n"]
        n = len(right)
        # the share of the teacher's accuracy on the same problems, with its paired interval
        share = M.recovery(right, teacher_right) if n else {"value": None, "ci": None}
        results[name] = {"accuracy": sum(right) / n if n else None, "escalated": escalated / n if n else None, "n": n,
                         "share_of_teacher": share["value"], "share_ci": share["ci"]}
    tc = [bool(t["correct"]) for _, t in matched]
    k = samples_of(matched)
    if k:
        # the student alone, answering with the vote of its k samples: where the agreement policies start
        vote = served(matched, True).tolist()
        share = M.recovery(vote, tc)
        row = {"accuracy": float(np.mean(vote)), "escalated": 0.0, "n": len(vote), "share_of_teacher": share["value"],
               "share_ci": share["ci"]}
        results["always_student_vote"] = row
    weak, strong = (float(served(matched, False).mean()), float(np.mean(tc))) if matched else (0.0, 0.0)
    # each curve grades the answer its policy serves, and its APGR starts from that answer's accuracy
    scores: dict[str, tuple[Any, bool]] = {}
    sigs = [signals_of(s) for s, _ in matched]
    for signal in SIGNALS:
        conf = [signal_value(s, signal) for s in sigs]
        if matched and all(c is not None for c in conf):
            scores[signal] = (conf, votes("confidence", signal))
    learned = crossfit_learned(matched) if matched else None
    if learned is not None:
        scores["learned"] = (learned, learned_votes(k))
    curves = {}
    for name, (conf, voted) in scores.items():
        right = served(matched, voted)
        curves[name] = {**M.router_summary(conf, right, tc, M.SHARES), "student_answer": "vote" if voted else "greedy",
                        "student_accuracy": float(right.mean())}
    return {"n": len(matched), "student_accuracy": weak, "teacher_accuracy": strong, "target_share": target_share,
            "samples": k, "policies": results, "curves": curves}
