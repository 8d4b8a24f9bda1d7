"""The router's pure parts: rules, policies, calibration to a stated target, request checks."""

from __future__ import annotations

import math

import pytest

from jobs.common.config import ConfigError, build
from serve.calibrate import calibrate, cost_quality, fit_logistic, pairs
from serve.config import LimitsConfig, ModelSpec, PolicyConfig, RuleConfig, ServeConfig
from serve.policies import STUDENT, TEACHER, Signals, decide, features, predict_correct, rule_decision


def test_rules_send_high_stakes_queries_to_the_teacher_before_the_student_is_asked():
    rules = RuleConfig(teacher_categories=["legal"], keywords=["contract", "dosage"])
    assert rule_decision("What is 2+2?", None, False, rules) is None
    assert rule_decision("What is 2+2?", None, True, rules).reason == "rule:high_stakes_flag"
    assert rule_decision("Is this fine?", "legal", False, rules).reason == "rule:category"
    d = rule_decision("Review this CONTRACT clause", None, False, rules)
    assert d.target == TEACHER and d.details == {"keyword": "contract"}
    assert rule_decision("contractual?", None, False, rules) is None  # whole words only
    assert rule_decision("x", None, True, RuleConfig(honor_flag=False)) is None


def test_confidence_policies_compare_the_chosen_signal_with_the_threshold():
    s = Signals(question="q", agreement=0.75, token_confidence=0.4)
    assert decide("confidence", s, signal="agreement", threshold=0.6).target == STUDENT
    d = decide("confidence", s, signal="logprob", threshold=0.6)
    assert (d.target, d.reason, d.confidence, d.threshold) == (TEACHER, "below_threshold", 0.4, 0.6)
    assert decide("confidence", Signals(question="q"), signal="agreement", threshold=0.5).target == TEACHER
    assert decide("always_student", s).target == STUDENT and decide("always_teacher", s).target == TEACHER
    with pytest.raises(ValueError, match="unknown policy"):
        decide("coin_flip", s)


def test_learned_policy_thresholds_its_predicted_probability():
    learned = {"weights": [0.0, 0.0, 4.0, 0.0, 0.0], "categories": ["math"], "threshold": 0.6}
    right = Signals(question="q", category="math", token_confidence=0.9)
    wrong = Signals(question="q", category="math", token_confidence=0.0)
    assert predict_correct(learned["weights"], features(right, ["math"])) == pytest.approx(1 / (1 + math.exp(-3.6)))
    assert decide("learned", right, learned=learned).target == STUDENT
    assert decide("learned", wrong, learned=learned).reason == "predicted_wrong"


def items(n=40):
    """Crafted evaluation items: the student is right exactly when its token confidence is high,
    the teacher is right on 90% of the problems."""
    out = []
    for i in range(n):
        conf = (i + 0.5) / n
        s_right = conf > 0.5
        t_right = i % 10 != 0
        for target, right, lp in (("student", s_right, math.log(conf)), ("teacher", t_right, -0.1)):
            out.append({"target": target, "suite": "held", "suite_kind": "held_out", "problem_id": f"p{i}",
                        "category": "math" if i % 2 else "logic", "question": f"question {i}", "correct": right,
                        "mean_logprob": lp, "agreement": conf, "samples": 4, "majority_correct": right})
    return out


def test_calibration_reaches_a_stated_share_of_the_teacher_with_the_fewest_escalations():
    cal = calibrate(items(), target_share=0.95)
    assert cal["n"] == 40 and cal["student_accuracy"] == 0.5 and cal["teacher_accuracy"] == 0.9
    t = cal["thresholds"]["logprob"]
    # the 20 least confident go to the teacher (right on 18 of them), the rest the student gets right:
    # 38/40 = 0.95 >= 0.95 * 0.9; escalating fewer than 20 would leave wrong student answers
    assert t["accuracy"] >= 0.95 * 0.9 and t["rate"] <= 0.5
    assert sum(math.exp(i["mean_logprob"]) < t["threshold"] for i in items() if i["target"] == "student") == round(t["rate"] * 40)
    assert cal["learned"] is not None and cal["learned"]["accuracy"] >= 0.95 * 0.9
    assert set(cal["by_category"]) == {"math", "logic"}
    budget = calibrate(items(), target_share=None, budget=0.25)
    assert budget["thresholds"]["logprob"]["rate"] <= 0.25
    # an absolute floor: 18 escalated (the teacher right on 16 of them) + the 20 the student gets right
    floor = calibrate(items(), target_share=None, accuracy=0.9)["thresholds"]["logprob"]
    assert (floor["rate"], floor["accuracy"]) == (0.45, 0.9)
    unreachable = calibrate(items(), target_share=None, accuracy=0.99)
    assert unreachable["thresholds"] == {} and unreachable["unreached"] == ["agreement", "logprob", "learned"]
    # a signal the items do not carry is not "unreached": without samples there is no agreement
    greedy = calibrate([dict(i, agreement=None, samples=0) for i in items()], target_share=None, accuracy=0.99)
    assert greedy["unreached"] == ["logprob", "learned"]
    with pytest.raises(ValueError, match="exactly one target"):
        calibrate(items(), target_share=0.9, budget=0.2)
    with pytest.raises(ValueError, match="no held-out problem was answered by both"):
        calibrate([i for i in items() if i["target"] == "student"])


def test_cost_quality_is_measured_on_problems_the_thresholds_were_not_fitted_on():
    cq = cost_quality(items(80), target_share=0.95)
    pol = cq["policies"]
    assert {k: pol["always_student"][k] for k in ("accuracy", "escalated", "n")} == {"accuracy": 0.5, "escalated": 0.0, "n": 80}
    lo, hi = pol["always_student"]["share_ci"]  # of the teacher's accuracy, on the same problems
    assert pol["always_student"]["share_of_teacher"] == pytest.approx(0.5 / 0.9) and lo < 0.5 / 0.9 < hi
    assert pol["always_teacher"]["escalated"] == 1.0 and pol["always_teacher"]["accuracy"] == 0.9
    assert pol["confidence:logprob"]["accuracy"] >= 0.75 and pol["confidence:logprob"]["escalated"] < 0.7
    assert cq["curves"]["logprob"]["apgr"] > 0.75  # a perfectly informative signal (0.81 in the limit here)
    assert len(pairs(items(80))) == 80


def complementary(n=80):
    """Student and teacher equally good (50%) on different problems; the student's confidence
    tells its right answers from its wrong ones."""
    out = []
    for i in range(n):
        s_right = i % 2 == 0
        conf = 0.9 if s_right else 0.2
        for target, right, lp in (("student", s_right, math.log(conf)), ("teacher", not s_right, -0.1)):
            out.append({"target": target, "suite": "held", "suite_kind": "held_out", "problem_id": f"p{i}",
                        "category": "math", "question": f"question {i}", "correct": right, "mean_logprob": lp,
                        "agreement": conf, "samples": 4, "majority_correct": right})
    return out


def write_items(path, rows) -> None:
    """Crafted items as `cotd eval` writes them (items/), for the calibration command."""
    import pyarrow as pa

    from jobs.common.runs import PartWriter
    from jobs.common.schemas import ITEM_SCHEMA

    rows = [{k: r.get(k) for k in ITEM_SCHEMA.names} | {"role": r["target"], "difficulty": "default", "gold_answer": "1"}
            for r in rows]
    PartWriter(path, ITEM_SCHEMA).write(pa.Table.from_pylist(rows, schema=ITEM_SCHEMA))


def voting(n=40):
    """The student's greedy answer is wrong on every problem, the vote of its samples right where
    they agree (agreement 0.75), wrong where they scatter (0.25); the teacher is always right."""
    out = []
    for i in range(n):
        agrees = i % 2 == 0
        for target, right, vote in (("student", False, agrees), ("teacher", True, None)):
            out.append({"target": target, "suite": "held", "suite_kind": "held_out", "problem_id": f"p{i}",
                        "category": "math", "question": f"question {i}", "correct": right, "mean_logprob": -0.5,
                        "agreement": (0.75 if agrees else 0.25) if vote is not None else None,
                        "samples": 4 if vote is not None else 0, "majority_correct": vote})
    return out


def test_policies_that_read_agreement_are_graded_on_the_vote_they_serve():
    """Under agreement the router serves the vote of the k samples (serve/app.py), so calibration and
    the cost-quality curve grade that answer, not the greedy one; a learned router fitted on
    items with samples reads agreement, and so asks for samples and serves their vote too."""
    from serve.calibrate import crossfit_learned
    from serve.policies import votes

    cal = calibrate(voting(), target_share=0.95)
    assert cal["samples"] == 4 and cal["learned"]["samples"] == 4
    # escalating the scattered half reaches the teacher: the vote is right on the other half
    assert (cal["thresholds"]["agreement"]["rate"], cal["thresholds"]["agreement"]["accuracy"]) == (0.5, 1.0)
    assert votes("confidence", "agreement") and not votes("confidence", "logprob")
    assert votes("learned", "logprob", cal["learned"]) and not votes("learned", "logprob", {"samples": 0})
    from serve.app import samples_warning
    assert samples_warning(PolicyConfig(signal="agreement", samples=4), cal) is None
    assert "calibrated on 4 samples per query" in samples_warning(PolicyConfig(signal="agreement", samples=8), cal)
    assert samples_warning(PolicyConfig(signal="logprob", samples=8), cal) is None  # one greedy answer: k unused
    cq = cost_quality(voting(80), target_share=0.95)
    assert cq["policies"]["always_student"]["accuracy"] == 0.0
    assert cq["policies"]["always_student_vote"]["accuracy"] == 0.5
    agree = cq["curves"]["agreement"]
    assert (agree["student_answer"], agree["student_accuracy"]) == ("vote", 0.5)
    assert agree["escalation"][0]["accuracy"] == 0.5 and agree["best"] == {"rate": 0.5, "escalated": 40, "accuracy": 1.0}
    assert cq["curves"]["logprob"]["student_answer"] == "greedy" and cq["curves"]["logprob"]["escalation"][0]["accuracy"] == 0.0
    assert cq["curves"]["learned"]["student_answer"] == "vote" and cq["curves"]["learned"]["apgr"] > 0.7
    assert cq["policies"]["confidence:agreement"]["accuracy"] == 1.0

    # the learned curve is out of sample: a problem's estimate does not move with its own label
    base = crossfit_learned(pairs(voting(80)))
    flipped = [dict(i, majority_correct=not i["majority_correct"]) if i["target"] == "student" and i["problem_id"] == "p0"
               else i for i in voting(80)]
    again = crossfit_learned(pairs(flipped))
    assert again[0] == pytest.approx(base[0]) and not (again == pytest.approx(base))

    # items of two evaluations pooled, one without samples: nothing is fitted to vote, and it is said
    assert cal["warnings"] == []
    mixed = [dict(i, samples=0, agreement=None) if i["target"] == "student" and i["problem_id"] == "p1" else i
             for i in voting()]
    cal = calibrate(mixed, target_share=0.95)
    assert cal["samples"] == 0 and "agreement" not in cal["thresholds"] and not votes("learned", "", cal["learned"])
    assert cal["warnings"] == ["the student's items have 0 or 4 sampled answers per problem (evaluations pooled?): "
                               "calibrated as k=0, so neither the agreement threshold nor the learned router's vote is fitted"]


def test_a_router_beats_the_teacher_where_the_two_are_right_on_different_problems(tmp_path):
    """A floor above the teacher's accuracy can be asked for and met; APGR, which divides by the
    teacher's lead, is no summary here and says so; the best point is."""
    import json

    from jobs.common.errors import DataError
    from serve.main import calibrate_main

    cq = cost_quality(complementary(), target_share=1.5)
    assert cq["student_accuracy"] == cq["teacher_accuracy"] == 0.5
    agree = cq["policies"]["confidence:agreement"]
    assert (agree["accuracy"], agree["escalated"], agree["n"], agree["share_of_teacher"]) == (1.0, 0.5, 80, 2.0)
    c = cq["curves"]["agreement"]
    assert c["apgr"] is None and c["apgr_reliable"] is False
    assert c["best"]["accuracy"] == 1.0 and c["best"]["rate"] == 0.5
    # the informative signal of items(): a teacher well ahead, APGR is a summary
    assert cost_quality(items(80))["curves"]["logprob"]["apgr_reliable"] is True

    write_items(tmp_path / "items", complementary())
    out = tmp_path / "router.json"
    assert calibrate_main(["--items", str(tmp_path / "items"), "--out", str(out), "--target-share", "1.5"],
                          log=lambda *_: None) == 0
    saved = json.loads(out.read_text())
    assert saved["thresholds"]["agreement"]["accuracy"] == 1.0 and saved["target"]["floor"] == 0.75
    for bad, message in (("0", "--target-share must be above 0"), ("-1", "--target-share must be above 0")):
        with pytest.raises(DataError, match=message):
            calibrate_main(["--items", str(tmp_path / "items"), "--out", str(tmp_path / "x.json"), "--target-share", bad])
    with pytest.raises(DataError, match=r"--budget must be in \(0, 1\]"):
        calibrate_main(["--items", str(tmp_path / "items"), "--out", str(tmp_path / "x.json"), "--budget", "1.5"])
    with pytest.raises(DataError, match=r"--accuracy must be in \(0, 1\]"):
        calibrate_main(["--items", str(tmp_path / "items"), "--out", str(tmp_path / "x.json"), "--accuracy", "80"])
    assert not (tmp_path / "x.json").exists()
    # an absolute accuracy floor: reached with the fewest escalations, or said to be out of reach
    lines = []
    assert calibrate_main(["--items", str(tmp_path / "items"), "--out", str(out), "--accuracy", "0.9"], log=lines.append) == 0
    saved = json.loads(out.read_text())
    assert saved["target"] == {"share": None, "accuracy": 0.9, "budget": None, "floor": 0.9}
    assert saved["thresholds"]["agreement"]["accuracy"] == 1.0 and not any("no threshold" in x for x in lines)
    write_items(tmp_path / "items2", items())
    assert calibrate_main(["--items", str(tmp_path / "items2"), "--out", str(out), "--accuracy", "0.99"], log=lines.append) == 0
    assert json.loads(out.read_text())["thresholds"] == {}
    assert any("no threshold reaches accuracy 99.0% for agreement, logprob, learned" in line for line in lines)


def test_logistic_fit_separates_a_separable_signal():
    import numpy as np

    x = np.array([[1.0, v] for v in np.linspace(0, 1, 50)])
    y = (x[:, 1] > 0.5).astype(float)
    w = fit_logistic(x, y, l2=0.01)
    assert w[1] > 5 and 1 / (1 + np.exp(-(w[0] + w[1] * 0.9))) > 0.9


def test_serve_config_checks_its_keys():
    ok = build(ServeConfig, {"student": "some-model", "teacher": "other-model"})
    assert ok.student.model == "some-model" and ok.teacher.model == "other-model"  # strings are model references
    with pytest.raises(ConfigError, match="set exactly one of model, run and base_url"):
        build(ServeConfig, {"student": {"model": "a", "run": "b"}, "teacher": "t"})
    with pytest.raises(ConfigError, match="not behind base_url"):
        build(ServeConfig, {"student": {"base_url": "http://x/v1", "served_model": "s"}, "teacher": "t"})
    with pytest.raises(ConfigError, match="policy kind learned needs calibration"):
        build(ServeConfig, {"student": "s", "teacher": "t", "policy": {"kind": "learned"}})
    assert isinstance(PolicyConfig(threshold=0.5), PolicyConfig) and isinstance(ModelSpec(model="m"), ModelSpec)


@pytest.mark.parametrize("body, status, message", [
    ([], 400, "must be a JSON object"),
    ({"messages": []}, 400, "non-empty list"),
    ({"messages": [{"role": "user", "content": 3}]}, 400, r"messages\[0\] content must be a string or a list of text parts, got int"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, 400, "last message must be the user"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-9"}, 404, "model 'gpt-9' is not served"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}, 400, "max_tokens must be an integer from 1 to 512"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n must be 1"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature must be a number"),
    ({"messages": [{"role": "user", "content": "hi"}], "cotd": "yes"}, 400, "'cotd' must be an object"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     r"messages\[0\].content\[0\] is a 'image_url' part"),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "a"}, {"role": "user", "content": "hi"}]}, 400,
     "got role 'tool'"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "a"}]}, {"role": "user", "content": "hi"}]},
     400, r"messages\[0\] holds tool calls"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "'tools' is not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, 400, "response_format must be"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop must be"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p must be"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream_options": "usage"}, 400, "stream_options must be"),
])
def test_bad_requests_are_refused_with_a_clear_status(body, status, message):
    from serve.app import HTTPError, check_request

    with pytest.raises(HTTPError, match=message) as e:
        check_request(body, LimitsConfig(), {"cotd-hybrid", "cotd-student", "cotd-teacher"})
    assert e.value.status == status


def test_a_good_request_is_read():
    from serve.app import check_request

    req = check_request({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
                         "max_tokens": 32, "stream": True, "cotd": {"high_stakes": True, "category": "math"}},
                        LimitsConfig(), {"cotd-hybrid"})
    assert (req["model"], req["max_tokens"], req["stream"], req["high_stakes"], req["question"]) == (
        "cotd-hybrid", 32, True, True, "2+2?")
    assert (req["sampling"], req["include_usage"], req["temperature"]) == ({}, False, 0.0)


def test_requests_as_other_openai_clients_write_them_are_read():
    """Text parts, the developer role, explicit nulls for defaults, stop, top_p and the usage
    chunk's option, as SDKs and frameworks other than the openai client send them."""
    from serve.app import check_request

    req = check_request({"model": "", "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "2+2?"}, {"type": "text", "text": "Answer only."}]}],
        "max_tokens": None, "max_completion_tokens": 20, "temperature": None, "n": None, "top_p": 0.9, "stop": "###",
        "tools": [], "response_format": {"type": "text"}, "stream": True, "stream_options": {"include_usage": True},
        "seed": 3, "user": "u1", "cotd": None}, LimitsConfig(), {"cotd-hybrid"})
    assert req["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?\nAnswer only."}]
    assert (req["model"], req["max_tokens"], req["temperature"], req["question"]) == ("cotd-hybrid", 20, 0.0, "2+2?\nAnswer only.")
    assert req["sampling"] == {"top_p": 0.9, "stop": ["###"]} and req["include_usage"] and req["stream"]
    req = check_request({"model": None, "messages": [{"role": "user", "content": "hi"}], "stop": "", "top_p": 1},
                        LimitsConfig(), {"cotd-hybrid"})
    assert (req["model"], req["sampling"]) == ("cotd-hybrid", {})


def test_the_student_is_prompted_as_it_was_trained():
    from jobs.formats.cot import instruction
    from serve.app import messages_for

    msgs = messages_for([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
                        {"format": "post", "granularity": "coarse", "system": "You are a tutor."})
    assert msgs[0]["role"] == "system" and msgs[0]["content"].startswith("You are a tutor. Be brief.")
    assert msgs[0]["content"].endswith(instruction("post", "coarse")) and msgs[1:] == [{"role": "user", "content": "2+2?"}]


def test_the_serve_deploy_file_validates_and_names_a_real_builder_and_config():
    import importlib
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from jobs.common.config import load_config

    repo = Path(__file__).resolve().parents[2]
    spec = ServeDeploySchema.parse_obj(yaml.safe_load((repo / "serve" / "hybrid.yaml").read_text()))
    app = spec.applications[0]
    module, _, attr = app.import_path.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    cfg = load_config(ServeConfig, repo / app.args["config"], app.args["overrides"])
    assert cfg.policy.threshold is None
    # it serves what `make demo` leaves: the quickstart pipeline's student, and the router that
    # `cotd run` calibrates beside the evaluation's report
    from jobs.pipeline.config import PipelineConfig
    from jobs.pipeline.main import pipeline_stages

    stages = pipeline_stages(load_config(PipelineConfig, repo / "configs" / "pipelines" / "quickstart.yaml"))
    assert Path(cfg.student.run) == Path(stages.train.out_dir)
    assert Path(cfg.policy.calibration) == Path(stages.eval.out_dir) / "router.json"


def test_a_teacher_endpoint_is_retried_then_given_up_on():
    """The hosted-teacher client: 5xx retried, then a clear error; a hanging endpoint bounded by
    its timeout (the router's own timeout bounds the whole call too)."""
    import asyncio
    import json as _json
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from serve.app import HTTPError, endpoint_chat

    calls = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = _json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls.append(body)
            if body["model"] == "hang":
                time.sleep(5)
            code, reply = (503, {"error": "busy"}) if len(calls) == 1 else (
                200, {"choices": [{"message": {"content": "4"}}], "usage": {"completion_tokens": 1}})
            data = _json.dumps(reply).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    try:
        ep = {"base_url": base, "model": "big", "api_key": None, "timeout_s": 2, "retries": 2}
        out = asyncio.run(endpoint_chat(ep, [{"role": "user", "content": "2+2"}], {"max_tokens": 4, "stop": ["\n\n"]}))
        assert out["choices"][0]["message"]["content"] == "4" and len(calls) == 2  # the 503 was retried
        assert (calls[-1]["model"], calls[-1]["max_tokens"], calls[-1]["stop"]) == ("big", 4, ["\n\n"])
        t0 = time.time()
        with pytest.raises(HTTPError, match="the teacher endpoint failed: ReadTimeout"):
            asyncio.run(endpoint_chat({**ep, "model": "hang", "retries": 0}, [{"role": "user", "content": "x"}], {"max_tokens": 4}))
        assert time.time() - t0 < 5
        with pytest.raises(HTTPError, match="the teacher endpoint failed: ConnectError"):
            asyncio.run(endpoint_chat({**ep, "base_url": "http://127.0.0.1:9/v1", "retries": 1}, [{"role": "user", "content": "x"}], {"max_tokens": 4}))
    finally:
        srv.shutdown()


@pytest.mark.parametrize("model", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def test_the_prompt_bound_is_never_below_the_token_count(model):
    """The router skips tokenizing a prompt whose byte bound fits the limit; that is only safe if
    the bound holds for every chat, in the real templates of the packaged students."""
    import random

    from transformers import AutoTokenizer

    from jobs.common.models import resolve
    from serve.app import messages_for, prompt_token_bound, template_overhead

    tok = AutoTokenizer.from_pretrained(resolve(model))
    count = lambda m: len(tok.apply_chat_template(m, tokenize=True, add_generation_prompt=True, return_dict=False))
    prompt = {"format": "pre", "granularity": "coarse", "system": None}
    overhead = template_overhead(count, messages_for([], prompt)[0])
    rng = random.Random(0)
    pieces = ["2 + 3", "  ", "\n\n", "é", "数学", "🙂", "<|im_start|>", "x" * 40, " - ", "1234567", "\t"]
    for _ in range(120):
        chat = [{"role": rng.choice(["user", "assistant"]), "content": "".join(rng.choices(pieces, k=rng.randint(0, 30)))}
                for _ in range(rng.randint(1, 5))]
        chat[-1]["role"] = "user"
        if rng.random() < 0.3:
            chat.insert(0, {"role": "system", "content": "".join(rng.choices(pieces, k=rng.randint(1, 10)))})
        msgs = messages_for(chat, prompt)
        assert prompt_token_bound(msgs, overhead) >= count(msgs), chat
    # and it is tight enough to skip the count for an ordinary question
    short = messages_for([{"role": "user", "content": "What is 12 * 7? Explain briefly."}], prompt)
    assert prompt_token_bound(short, overhead) < count(short) + 80


def test_the_pipeline_calibrates_the_router_from_its_evaluation(tmp_path):
    import json

    import pyarrow as pa

    from jobs.common.runs import PartWriter
    from jobs.common.schemas import ITEM_SCHEMA
    from jobs.pipeline.main import calibrate_router

    rows = [{k: r.get(k) for k in ITEM_SCHEMA.names} | {"role": r["target"], "difficulty": "default", "gold_answer": "1"}
            for r in items()]
    PartWriter(tmp_path / "eval" / "items", ITEM_SCHEMA).write(pa.Table.from_pylist(rows, schema=ITEM_SCHEMA))
    said = []
    router = calibrate_router(tmp_path / "eval", log=said.append)
    saved = json.loads((tmp_path / "eval" / "router.json").read_text())
    assert router["path"] == str(tmp_path / "eval" / "router.json") and router["n"] == saved["n"] == 40
    assert saved["thresholds"]["logprob"]["accuracy"] >= 0.95 * 0.9 and "cost_quality" in saved
    # an evaluation without the teacher cannot calibrate it: said, and the pipeline goes on
    only = tmp_path / "student-only"
    PartWriter(only / "items", ITEM_SCHEMA).write(pa.Table.from_pylist([r for r in rows if r["target"] == "student"],
                                                                        schema=ITEM_SCHEMA))
    assert calibrate_router(only, log=said.append) is None and "not calibrated" in said[-1]


QWEN_05B = {"hidden_size": 896, "num_hidden_layers": 24, "vocab_size": 151936, "intermediate_size": 4864,
            "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True}


def test_an_engine_that_did_not_start_on_a_cpu_names_its_memory_share(tmp_path):
    """vLLM's CPU worker counts weights and runtime inside its share of RAM, and when they fill it
    says to reduce other processes' memory; cotd's error names the key to raise and by how much:
    for `cotd serve` (Serve names the failed deployment) and for the batch stages."""
    import json

    from jobs.common.engine import engine_start_error
    from serve.main import deploy_error

    model = tmp_path / "qwen"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(QWEN_05B))
    gib = 1 << 30
    e = engine_start_error("generate", "teacher.gpu_memory_utilization", "qwen", str(model), "float32", 0.15, 24 * gib)
    text = str(e)
    # 0.49B parameters in float32; 0.15 of 24 GiB; the share that holds weights, runtime and some KV cache
    assert "teacher.gpu_memory_utilization=0.15 gives the engine 3.6 GiB of this machine's 24.0 GiB" in text
    assert "the weights (1.8 GiB in float32)" in text and text.endswith("Try teacher.gpu_memory_utilization=0.25.")
    assert "(0.9 GiB in bfloat16)" in str(engine_start_error("x", "k", "qwen", str(model), "bfloat16", 0.1, 24 * gib))
    assert "Try" not in str(engine_start_error("x", "k", "hub/id", None, "float32", 0.1, 24 * gib))

    cfg = build(ServeConfig, {"student": {"model": str(model)}, "teacher": {"model": str(model), "gpu_memory_utilization": 0.03}})
    failed = RuntimeError("Deploying application cotd-hybrid failed: Failed to update the deployments ['teacher:cotd-teacher'].")
    err = deploy_error(failed, cfg, log=lambda *_: None)
    assert "serve: the teacher's deployment" in str(err) and "teacher.gpu_memory_utilization=0.03" in str(err)
    other = RuntimeError("Deploying application cotd-hybrid failed: the route prefix is taken")
    assert deploy_error(other, cfg, log=lambda *_: None) is other
    remote = build(ServeConfig, {"student": {"model": str(model)},
                                 "teacher": {"base_url": "http://127.0.0.1:9/v1", "served_model": "big"}})
    assert deploy_error(failed, remote, log=lambda *_: None) is failed  # an endpoint has no engine here


def test_an_auto_memory_share_holds_the_model_its_runtime_and_a_kv_cache(tmp_path):
    """`gpu_memory_utilization: auto` (the serve default): on a CPU, the weights, vLLM's measured
    runtime and 8 sequences of KV cache as a share of RAM, so that a larger teacher given on the
    command line gets a share that holds it; on a GPU, 0.9 of the GPU the replica holds."""
    import json

    from jobs.common.engine import auto_memory_share, kv_gib_per_sequence
    from serve.app import engine_config

    model = tmp_path / "qwen"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(QWEN_05B))
    gib = 1 << 30
    # 24 layers x 2 KV heads x 64 dims x (K, V) x 4 bytes = 24 KiB a token; 2048 tokens = 48 MiB
    assert kv_gib_per_sequence(str(model), "float32", 2048) == pytest.approx(48 / 1024)
    share, why = auto_memory_share(str(model), "float32", 2048, ram_bytes=24 * gib)
    # 1.84 weights + 2.5 runtime + 0.375 KV = 4.7 GiB of 24: 0.196, rounded up to 0.2
    assert share == 0.2 and "4.7 GiB of this machine's 24.0 GiB" in why
    assert auto_memory_share(str(model), "float32", 2048, ram_bytes=8 * gib)[0] == 0.6
    assert auto_memory_share(str(model), "float32", 2048, gpus=0.5) == (0.45, "0.9 of the 0.5 GPU the replica holds")
    assert auto_memory_share(None, "float32", 2048) == (0.2, "the weights' size is unknown")

    cfg = build(ServeConfig, {"student": {"model": str(model), "dtype": "float32"},
                              "teacher": {"model": str(model), "gpu_memory_utilization": 0.5}})
    mc, why = engine_config(cfg.student, str(model))
    assert why.startswith("auto: ") and mc.gpu_memory_utilization == auto_memory_share(str(model), "float32", 2048)[0]
    mc, why = engine_config(cfg.teacher, str(model))
    assert (mc.gpu_memory_utilization, why) == (0.5, "set in the config")
    with pytest.raises(ConfigError, match="auto or in"):
        build(ServeConfig, {"student": "s", "teacher": {"model": "t", "gpu_memory_utilization": 1.5}})
    with pytest.raises(ConfigError, match="expected one of"):
        build(ServeConfig, {"student": "s", "teacher": {"model": "t", "gpu_memory_utilization": "half"}})
