"""The numbers an evaluation reports, as pure functions over per-item results (numpy arrays of
correctness and confidence, one entry per problem): accuracy with Wilson intervals, paired
bootstrap intervals for recovery (student / teacher) and gains (student - base), McNemar's exact
test, pass@k and majority@k, calibration (reliability bins, expected calibration error) and the
accuracy a router reaches at each escalation rate. Tested on crafted inputs with hand-computed
expectations (tests/unit/test_eval_metrics.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

CONFIDENCE = 0.95
SHARES = (0.5, 0.8, 0.95)  # shares of the teacher's quality a router is asked to recover (RouteLLM's)


def wilson(correct: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Wilson score interval of a proportion (None without trials)."""
    if n <= 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(int(correct), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def accuracy(correct: Sequence[bool], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """{n, correct, accuracy, ci} of a list of per-item results."""
    c = np.asarray(correct, dtype=bool)
    n, k = int(c.size), int(c.sum())
    return {"n": n, "correct": k, "accuracy": k / n if n else None, "ci": wilson(k, n, confidence)}


def bootstrap_indices(n: int, samples: int, seed: int) -> np.ndarray:
    """`samples` resamplings (with replacement) of n items: shape (samples, n)."""
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def paired_bootstrap(a: Sequence[float], b: Sequence[float], stat: Callable[[np.ndarray, np.ndarray], np.ndarray],
                     samples: int = 2000, seed: int = 0, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """A statistic of two paired per-item arrays (the same problems, in the same order) with a
    percentile interval from resampling the problems. `stat(a, b)` takes arrays of shape
    (resamples, n) and returns one value per resample; resamples where it is not finite (a ratio
    over a zero) are left out and counted."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in length: {a.shape} vs {b.shape}")
    n = a.size
    if n == 0:
        return {"n": 0, "value": None, "ci": None, "dropped": 0}
    with np.errstate(divide="ignore", invalid="ignore"):
        value = float(stat(a[None, :], b[None, :])[0])
        idx = bootstrap_indices(n, samples, seed)
        values = stat(a[idx], b[idx])
    finite = values[np.isfinite(values)]
    alpha = (1 - confidence) / 2
    ci = (float(np.quantile(finite, alpha)), float(np.quantile(finite, 1 - alpha))) if finite.size else None
    return {"n": int(n), "value": value if math.isfinite(value) else None, "ci": ci,
            "dropped": int(values.size - finite.size)}


def ratio_of_means(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a.mean(axis=-1) / b.mean(axis=-1)


def difference_of_means(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a.mean(axis=-1) - b.mean(axis=-1)


def recovery(student: Sequence[bool], teacher: Sequence[bool], **kw: Any) -> dict[str, Any]:
    """Recovery rate: the student's accuracy over the teacher's on the same problems, with a paired
    bootstrap interval."""
    return paired_bootstrap(student, teacher, ratio_of_means, **kw)


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict[str, Any]:
    """McNemar's exact test of paired results: (a right, b wrong) against (a wrong, b right)."""
    from scipy.stats import binomtest

    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"only_a": only_a, "only_b": only_b, "p_value": float(p)}


def gain(new: Sequence[bool], old: Sequence[bool], **kw: Any) -> dict[str, Any]:
    """Accuracy of `new` minus `old` on the same problems: paired bootstrap interval and McNemar."""
    return {**paired_bootstrap(new, old, difference_of_means, **kw), "mcnemar": mcnemar(new, old)}


def unpaired_difference(a: Sequence[bool], b: Sequence[bool], samples: int = 2000, seed: int = 0,
                        confidence: float = CONFIDENCE) -> dict[str, Any]:
    """mean(a) - mean(b) over different problems, each resampled on its own."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if not a.size or not b.size:
        return {"value": None, "ci": None, "n": [int(a.size), int(b.size)]}
    rng = np.random.default_rng(seed)
    diffs = a[rng.integers(0, a.size, (samples, a.size))].mean(1) - b[rng.integers(0, b.size, (samples, b.size))].mean(1)
    alpha = (1 - confidence) / 2
    return {"value": float(a.mean() - b.mean()), "ci": (float(np.quantile(diffs, alpha)), float(np.quantile(diffs, 1 - alpha))),
            "n": [int(a.size), int(b.size)]}


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def agreement(groups: Sequence[int]) -> float:
    """Self-consistency confidence: the share of sampled answers in the largest group of
    equivalent answers (jobs.tasks.verify.vote_groups); 0 without answers."""
    if not groups:
        return 0.0
    return max(list(groups).count(g) for g in set(groups)) / len(groups)


def reliability(confidence: Sequence[float], correct: Sequence[bool], bins: int = 10) -> dict[str, Any]:
    """Equal-width reliability bins over [0, 1] and the expected calibration error: the
    item-weighted mean |accuracy - confidence| over the bins."""
    conf = np.clip(np.asarray(confidence, dtype=float), 0.0, 1.0)
    corr = np.asarray(correct, dtype=float)
    if conf.size == 0:
        return {"bins": [], "ece": None, "n": 0}
    which = np.minimum((conf * bins).astype(int), bins - 1)
    out, ece = [], 0.0
    for i in range(bins):
        sel = which == i
        if not sel.any():
            continue
        acc, mean_conf = float(corr[sel].mean()), float(conf[sel].mean())
        ece += sel.sum() / conf.size * abs(acc - mean_conf)
        out.append({"low": i / bins, "high": (i + 1) / bins, "n": int(sel.sum()), "accuracy": acc, "confidence": mean_conf})
    return {"bins": out, "ece": float(ece), "n": int(conf.size)}


def escalation_curve(confidence: Sequence[float], student: Sequence[bool], teacher: Sequence[bool],
                     rates: Sequence[float] | None = None) -> list[dict[str, float]]:
    """Accuracy of a router that sends the `rate` share of queries the student is least confident
    about to the teacher (paired: the same problems), at each escalation rate. Ties in confidence
    go to the teacher in problem order, so the curve is deterministic."""
    conf = np.asarray(confidence, dtype=float)
    s, t = np.asarray(student, dtype=bool), np.asarray(teacher, dtype=bool)
    n = conf.size
    order = np.lexsort((np.arange(n), conf))  # least confident first
    rates = np.linspace(0, 1, 21) if rates is None else rates
    out = []
    for r in rates:
        m = int(round(float(r) * n))
        answer = s.copy()
        answer[order[:m]] = t[order[:m]]
        out.append({"rate": float(r), "escalated": m, "accuracy": float(answer.mean()) if n else None})
    return out


def threshold_for(confidence: Sequence[float], student: Sequence[bool], teacher: Sequence[bool],
                  floor: float | None = None, budget: float | None = None) -> dict[str, Any] | None:
    """The confidence threshold a router should escalate below, calibrated to a stated target on
    these items: the lowest escalation rate whose accuracy reaches the accuracy `floor`, or the
    best accuracy within an escalation `budget` (a share of queries). Returns {threshold, rate,
    accuracy}; None when no rate reaches the floor."""
    conf = np.asarray(confidence, dtype=float)
    n = conf.size
    if n == 0:
        return None
    order = np.lexsort((np.arange(n), conf))
    sorted_conf = conf[order]
    # a threshold escalates everything below it: only cuts between two different confidences (or
    # none, or all) are thresholds a router can apply; a cut inside a run of equal values (agreement
    # of k samples takes k values) would promise escalations the threshold does not make
    cuts = [m for m in range(n + 1) if m in (0, n) or sorted_conf[m - 1] < sorted_conf[m]]
    curve = escalation_curve(conf, student, teacher, rates=[m / n for m in cuts])
    if budget is not None:
        curve = [c for c in curve if c["rate"] <= budget + 1e-12]
        best = max(curve, key=lambda c: (c["accuracy"], -c["rate"]))
    else:
        meets = [c for c in curve if c["accuracy"] >= floor - 1e-12]
        if not meets:
            return None
        best = meets[0]
    m = best["escalated"]
    # escalate items whose confidence is below the threshold: between the m-th and (m+1)-th least confident
    if m == 0:
        threshold = float(sorted_conf[0]) if n else 0.0
    elif m == n:
        threshold = float(np.nextafter(sorted_conf[-1], np.inf))
    else:
        threshold = float((sorted_conf[m - 1] + sorted_conf[m]) / 2)
    return {"threshold": threshold, "rate": best["rate"], "accuracy": best["accuracy"]}


def apgr(curve: list[dict[str, float]], weak: float, strong: float) -> float | None:
    """RouteLLM's average performance gap recovered: the area under (accuracy - weak) / (strong -
    weak) over escalation rates 0..1 (trapezoids); None when the two models are equally good."""
    if strong == weak or len(curve) < 2:
        return None
    xs = np.array([c["rate"] for c in curve])
    ys = (np.array([c["accuracy"] for c in curve]) - weak) / (strong - weak)
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2))


def best_point(curve: list[dict[str, float]]) -> dict[str, float] | None:
    """The router's best point on the curve: the highest accuracy, at the lowest escalation rate
    that reaches it. Above the teacher's accuracy where the two models are right on different
    problems and the signal tells which."""
    points = [c for c in curve if c["accuracy"] is not None]
    return max(points, key=lambda c: (c["accuracy"], -c["rate"])) if points else None


def router_summary(signal: Sequence[float], student: Sequence[bool], teacher: Sequence[bool],
                   shares: Sequence[float], **boot: Any) -> dict[str, Any]:
    """What a confidence `signal` buys a router on paired items: the escalation curve, RouteLLM's
    APGR and the escalation each share of the teacher's quality needs, the best point, and the
    teacher-minus-student gap with its paired interval. APGR divides by that gap: `apgr_reliable`
    is False when its interval reaches 0 (or the student is the better model), where APGR is no
    summary to act on and the best point is."""
    curve = escalation_curve(signal, student, teacher)
    weak, strong = float(np.mean(student)), float(np.mean(teacher))
    gap = gain(teacher, student, **boot)
    return {"escalation": curve, "apgr": apgr(curve, weak, strong),
            "escalation_for_share": {str(x): calls_for_share(curve, weak, strong, x) for x in shares},
            "best": best_point(curve), "gap": gap,
            "apgr_reliable": bool(gap["ci"] is not None and gap["ci"][0] > 0)}


def calls_for_share(curve: list[dict[str, float]], weak: float, strong: float, share: float) -> float | None:
    """The smallest escalation rate that recovers `share` of the weak-to-strong gap (RouteLLM's
    "calls to the strong model needed for X% of its quality"); None if no rate does."""
    if strong <= weak:
        return 0.0
    target = weak + share * (strong - weak)
    for c in curve:
        if c["accuracy"] >= target - 1e-12:
            return c["rate"]
    return None
