"""The evaluation's numbers on crafted predictions, against hand-computed expectations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jobs.evaluate import metrics as M


def test_wilson_interval_matches_the_formula():
    # 7 of 10 at 95%: (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), z = 1.959964
    z, n, p = 1.959964, 10, 0.7
    centre, half = (p + z * z / (2 * n)), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = M.wilson(7, 10)
    assert lo == pytest.approx((centre - half) / (1 + z * z / n), abs=1e-4)
    assert hi == pytest.approx((centre + half) / (1 + z * z / n), abs=1e-4)
    assert M.wilson(0, 0) is None
    lo, hi = M.wilson(0, 20)
    assert lo == pytest.approx(0.0, abs=1e-12) and 0.1 < hi < 0.2  # never a zero-width interval at 0
    assert M.accuracy([True, False, True, True]) == {"n": 4, "correct": 3, "accuracy": 0.75, "ci": M.wilson(3, 4)}


def test_mcnemar_counts_discordant_pairs_and_tests_them_exactly():
    a = [True] * 8 + [False] * 2 + [True] * 5
    b = [False] * 8 + [True] * 2 + [True] * 5
    out = M.mcnemar(a, b)
    assert (out["only_a"], out["only_b"]) == (8, 2)
    # two-sided exact binomial: 2 * P(X <= 2 | n=10, p=.5) = 2 * (1 + 10 + 45) / 1024
    assert out["p_value"] == pytest.approx(2 * 56 / 1024)
    assert M.mcnemar([True, False], [True, False])["p_value"] == 1.0


def test_recovery_is_a_ratio_of_paired_accuracies_with_a_bootstrap_interval():
    teacher = [True] * 8 + [False] * 2
    student = [True] * 4 + [False] * 4 + [True, False]
    r = M.recovery(student, teacher, samples=4000, seed=1)
    assert r["value"] == pytest.approx(5 / 8) and r["n"] == 10
    lo, hi = r["ci"]
    assert lo < 5 / 8 < hi and 0 <= lo and hi <= 1.5
    # the same seed gives the same interval; a resample where the teacher got nothing right is dropped
    assert M.recovery(student, teacher, samples=4000, seed=1)["ci"] == r["ci"]
    tiny = M.recovery([True, False], [False, True], samples=500, seed=0)
    assert tiny["value"] == 1.0 and tiny["dropped"] > 0


def test_gain_interval_excludes_zero_for_a_clear_paired_improvement():
    base = [False] * 30 + [True] * 10
    student = [True] * 25 + [False] * 5 + [True] * 10
    g = M.gain(student, base, samples=4000, seed=0)
    assert g["value"] == pytest.approx(25 / 40)
    assert g["ci"][0] > 0 and g["mcnemar"]["only_a"] == 25 and g["mcnemar"]["p_value"] < 1e-6
    with pytest.raises(ValueError, match="differ in length"):
        M.gain([True], [True, False])


def test_unpaired_difference():
    d = M.unpaired_difference([True] * 9 + [False], [True] * 5 + [False] * 5, samples=3000, seed=2)
    assert d["value"] == pytest.approx(0.4) and d["ci"][0] < 0.4 < d["ci"][1] and d["n"] == [10, 10]


@pytest.mark.parametrize("n, c, k, expected", [
    (4, 0, 1, 0.0), (4, 4, 4, 1.0), (4, 1, 1, 0.25), (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (5, 2, 3, 1 - 1 / 10),  # 1 - C(3,3)/C(5,3)
    (4, 2, 3, 1.0),  # fewer wrong samples than k: certain
])
def test_pass_at_k(n, c, k, expected):
    assert M.pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_needs_enough_samples():
    with pytest.raises(ValueError, match="at least 3 samples"):
        M.pass_at_k(2, 1, 3)


def test_agreement_is_the_largest_groups_share():
    assert M.agreement([0, 0, 1, 0]) == 0.75
    assert M.agreement([0, 1, 2, 3]) == 0.25
    assert M.agreement([]) == 0.0


def test_reliability_bins_and_ece():
    conf = [0.05, 0.15, 0.95, 0.95, 0.55, 0.55]
    correct = [False, False, True, False, True, True]
    r = M.reliability(conf, correct, bins=10)
    by_low = {round(b["low"], 1): b for b in r["bins"]}
    assert set(by_low) == {0.0, 0.1, 0.5, 0.9}
    assert by_low[0.9]["accuracy"] == 0.5 and by_low[0.9]["n"] == 2
    # ECE = sum_b (n_b / N) |acc_b - conf_b| = (1*.05 + 1*.15 + 2*.45 + 2*.45) / 6
    assert r["ece"] == pytest.approx((0.05 + 0.15 + 0.9 + 0.9) / 6)
    assert M.reliability([], [])["ece"] is None
    assert M.reliability([1.0], [True], bins=10)["bins"][0]["high"] == 1.0  # confidence 1 lands in the last bin


def test_escalation_curve_sends_the_least_confident_to_the_teacher():
    conf = [0.9, 0.1, 0.5, 0.3]
    student = [True, False, True, False]
    teacher = [True, True, False, True]
    curve = M.escalation_curve(conf, student, teacher, rates=[0, 0.25, 0.5, 0.75, 1.0])
    # order by confidence: item1 (0.1), item3 (0.3), item2 (0.5), item0 (0.9)
    assert [c["accuracy"] for c in curve] == [0.5, 0.75, 1.0, 0.75, 0.75]
    assert [c["escalated"] for c in curve] == [0, 1, 2, 3, 4]


def test_threshold_is_calibrated_to_a_floor_or_a_budget():
    conf = [0.9, 0.1, 0.5, 0.3]
    student = [True, False, True, False]
    teacher = [True, True, False, True]
    t = M.threshold_for(conf, student, teacher, floor=1.0)
    assert t["rate"] == 0.5 and t["accuracy"] == 1.0 and 0.3 < t["threshold"] < 0.5
    # escalating below the threshold sends exactly the two least confident items
    assert sum(c < t["threshold"] for c in conf) == 2
    b = M.threshold_for(conf, student, teacher, budget=0.25)
    assert b["rate"] == 0.25 and b["accuracy"] == 0.75
    assert M.threshold_for(conf, student, [False] * 4, floor=0.9) is None


def test_a_threshold_never_cuts_inside_a_run_of_equal_confidences():
    """Agreement of k samples takes k values: a threshold escalates all of a value or none of it,
    and the rate and accuracy it reports are the ones it gives. Escalating two of the four 0.25s
    (7/8 right) is no threshold's doing; all four (6/8) or none (5/8) are."""
    conf = [0.25] * 4 + [1.0] * 4
    student = [False, False, False, True] + [True] * 4
    teacher = [True, True, False, False] + [True] * 4

    def applied(t):
        escalated = [c < t["threshold"] for c in conf]
        right = sum(te if e else s for e, s, te in zip(escalated, student, teacher))
        return sum(escalated) / 8, right / 8

    t = M.threshold_for(conf, student, teacher, floor=0.75)
    assert (t["rate"], t["accuracy"]) == applied(t) == (0.5, 0.75)
    assert M.threshold_for(conf, student, teacher, floor=0.8) is None
    b = M.threshold_for(conf, student, teacher, budget=0.25)
    assert (b["rate"], b["accuracy"]) == applied(b) == (0.0, 0.625)


def test_apgr_and_calls_for_share():
    # a perfect router: the gap closes linearly from weak (0.5) to strong (1.0) at half the calls, then flat
    curve = [{"rate": 0.0, "accuracy": 0.5}, {"rate": 0.5, "accuracy": 1.0}, {"rate": 1.0, "accuracy": 1.0}]
    assert M.apgr(curve, 0.5, 1.0) == pytest.approx(0.75)  # 0.5*0.5 + 0.5*1
    assert M.calls_for_share(curve, 0.5, 1.0, 0.95) == 0.5
    assert M.calls_for_share(curve, 0.5, 1.0, 0.0) == 0.0
    assert M.apgr(curve, 0.7, 0.7) is None
    random = [{"rate": r, "accuracy": 0.5 + 0.5 * r} for r in np.linspace(0, 1, 11)]
    assert M.apgr(random, 0.5, 1.0) == pytest.approx(0.5)  # a random router recovers half on average


def test_overlap_with_the_training_data_fails_or_is_dropped_as_configured(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.common.errors import DataError
    from jobs.evaluate.targets import check_disjoint
    from jobs.tasks.problem import Problem

    chains = tmp_path / "chains"
    chains.mkdir()
    pq.write_table(pa.table({"question": ["Find the GCD of 90, 57.", "Find the GCD of 8, 12."]}), chains / "part-0.parquet")
    mk = lambda i, q: Problem(f"p{i}", q, "1", "math", "default", "jsonl:x", "numeric", "{}")
    suites = {"held_out": [mk(0, "find the GCD   of 90, 57."), mk(1, "Find the GCD of 7, 21.")]}
    with pytest.raises(DataError, match=r"suite 'held_out': 1 of 2 problems are in the training data"):
        check_disjoint(suites, [chains], "fail")
    said = []
    kept, compared = check_disjoint(suites, [chains], "drop", log=said.append)
    assert [p.id for p in kept["held_out"]] == ["p1"] and compared == 2 and "1 of 2" in said[0]
    assert check_disjoint(suites, [chains], "allow")[0] == suites
    with pytest.raises(DataError, match="every one of its 1 problems"):
        check_disjoint({"all": [mk(0, "Find the GCD of 8, 12.")]}, [chains], "drop")


def test_base_rows_beside_a_lora_adapter_go_through_an_identity_adapter(tmp_path):
    """vLLM's CPU build gives a base request batched beside LoRA requests their LoRA weights; the
    evaluation asks the base through an adapter of the same shapes whose lora_B weights are zero
    (it adds nothing), written once; an adapter holding other weights is refused by name."""
    import torch
    from safetensors.torch import load_file, save_file

    from jobs.common.errors import DataError
    from jobs.evaluate.main import identity_adapter, lora_engine_kwargs
    from jobs.evaluate.pipeline import route_base_rows

    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8, "peft_type": "LORA"}')
    weights = {"m.q_proj.lora_A.weight": torch.randn(4, 6), "m.q_proj.lora_B.weight": torch.randn(6, 4)}
    save_file(weights, str(src / "adapter_model.safetensors"))
    out = identity_adapter(src, tmp_path / "ids")
    got = load_file(str(out / "adapter_model.safetensors"))
    assert torch.equal(got["m.q_proj.lora_A.weight"], weights["m.q_proj.lora_A.weight"])
    assert not got["m.q_proj.lora_B.weight"].any()
    assert (out / "adapter_config.json").read_text() == (src / "adapter_config.json").read_text()
    assert lora_engine_kwargs([str(src), str(out)]) == {"enable_lora": True, "max_lora_rank": 8, "max_loras": 2}
    assert identity_adapter(src, tmp_path / "ids") == out and [p.name for p in (tmp_path / "ids").iterdir()] == [out.name]

    rows = [{"model": "/m/base", "i": 0}, {"model": str(src), "i": 1}, {"model": "/m/base", "i": 2}]
    routed = route_base_rows(rows, "/m/base", str(out))
    assert [r["model"] for r in routed] == [str(out), str(src), str(out)] and [r["i"] for r in routed] == [0, 1, 2]
    assert rows[0]["model"] == "/m/base"  # the planned rows are left as they were

    full = tmp_path / "full"
    full.mkdir()
    (full / "adapter_config.json").write_text('{"r": 4}')
    save_file({**weights, "m.lm_head.weight": torch.randn(3, 6)}, str(full / "adapter_model.safetensors"))
    with pytest.raises(DataError, match=r"adapter .*full: holds weights other than LoRA's \(m.lm_head.weight"):
        identity_adapter(full, tmp_path / "ids")


def test_a_lora_student_runs_merged_on_cpu_and_as_its_adapter_on_gpu_or_when_asked(tmp_path):
    import json

    from jobs.common.config import build
    from jobs.common.errors import DataError
    from jobs.evaluate.config import EvalConfig
    from jobs.evaluate.targets import lineage, student_targets

    run = tmp_path / "student"
    (run / "adapter").mkdir(parents=True)
    (run / "merged").mkdir()
    (run / "merged" / "config.json").write_text("{}")
    (run / "manifest.json").write_text(json.dumps({
        "stage": "train", "method": "lora", "model": "base-model", "model_path": str(tmp_path / "base"),
        "config": {"out_dir": str(run), "data": str(tmp_path / "curated")}}))

    def student(**over):
        cfg = build(EvalConfig, {"out_dir": str(tmp_path / "eval"), "student": str(run),
                                 "suites": [{"name": "s", "sources": [{"type": "jsonl", "path": "x.jsonl"}]}], **over})
        t = next(t for t in student_targets(cfg, lineage(str(run)), lambda m: m) if t.role == "student")
        return t.engine.model, t.adapter

    assert student() == (str(run / "merged"), None)                                   # auto on a CPU engine
    assert student(engine={"use_gpu": True}) == (str(tmp_path / "base"), str(run / "adapter"))   # auto on GPUs
    assert student(lora_student="adapter") == (str(tmp_path / "base"), str(run / "adapter"))
    assert student(lora_student="merged", engine={"use_gpu": True}) == (str(run / "merged"), None)
    (run / "merged" / "config.json").unlink()
    assert student() == (str(tmp_path / "base"), str(run / "adapter"))              # nothing exported: the adapter
    with pytest.raises(DataError, match="has no exported model in merged/"):
        student(lora_student="merged")


def test_sampled_limits_the_k_samples_to_the_models_it_names():
    from jobs.common.config import ConfigError, build
    from jobs.evaluate.config import EvalConfig

    def cfg(**over):
        return build(EvalConfig, {"out_dir": "e", "student": "s",
                                  "suites": [{"name": "s", "sources": [{"type": "jsonl", "path": "x.jsonl"}]}], **over})

    every = cfg(samples=4)
    assert [every.samples_for(n) for n in ("teacher", "base", "student")] == [4, 4, 4]
    some = cfg(samples=4, sampled=["student"])
    assert [some.samples_for(n) for n in ("teacher", "base", "student")] == [0, 0, 4]
    assert cfg().samples_for("student") == 0
    with pytest.raises(ConfigError, match="sampled lists .'student'. but samples is 0"):
        cfg(sampled=["student"])
