"""The hybrid server for real: ray.serve.llm deployments of the session's tiny student and of a
tiny teacher (vLLM on CPU) behind cotd's router, called with the official `openai` client:
routing metadata, streaming, escalation under each policy (chosen per request, which this
deployment allows, so the engines start once), rules, the API key, bad requests, and a teacher
whose replica is killed answered by the fallback within the timeout."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from shared import wait_until

from jobs.common.config import build
from serve.config import ServeConfig

pytestmark = pytest.mark.integration
PORT = 8765
KEY = "sk-test-key"
Q = [{"role": "user", "content": "What is 2 + 3? Think step by step."}]


# a learned router as `cotd serve calibrate` writes it from items with 3 sampled answers per
# problem: it reads their agreement, so the router asks for samples and serves their vote
LEARNED = {"thresholds": {}, "samples": 3, "by_category": {},
           "learned": {"weights": [0.0, 0.0, 0.0, 0.0], "categories": [], "threshold": 0.0, "samples": 3}}


def serve_config(student_dir, teacher, calibration=None) -> ServeConfig:
    engine = {"max_model_len": 1024, "gpu_memory_utilization": 0.1, "scaling": {"cpus": 1}}
    # the student's memory share is the serve default, sized from its model (auto)
    data = {"student": {"run": str(student_dir), **engine, "gpu_memory_utilization": "auto", "timeout_s": 20},
            "teacher": {"model": str(teacher), **engine, "timeout_s": 8},
            "policy": {"kind": "confidence", "signal": "logprob", "threshold": 0.0, "calibration": calibration},
            "limits": {"max_tokens": 32, "max_prompt_tokens": 400}, "port": PORT, "name": "cotd-test",
            "api_key_env": "COTD_TEST_SERVE_KEY", "allow_request_overrides": True}
    return build(ServeConfig, data)


@pytest.fixture(scope="module")
def server(lora_run, tiny_model, ray_session, tmp_path_factory):
    import json
    import os

    from ray import serve

    from serve.main import start

    student_dir, _, _ = lora_run
    os.environ["COTD_TEST_SERVE_KEY"] = KEY

    calibration = tmp_path_factory.mktemp("router") / "router.json"
    calibration.write_text(json.dumps(LEARNED))
    start(serve_config(student_dir, tiny_model, str(calibration)), log=lambda *_: None, blocking=False)
    yield
    serve.shutdown()


def client(key: str = KEY):
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key=key, max_retries=0, timeout=120)


def test_openai_client_gets_an_answer_with_routing_metadata(server):
    c = client()
    models = {m.id for m in c.models.list().data}
    assert {"cotd-hybrid", "cotd-student", "cotd-teacher"} <= models
    r = c.chat.completions.create(model="cotd-hybrid", messages=Q, max_tokens=16)
    meta = r.model_extra["cotd"]
    assert meta["answered_by"] == "student" and meta["reason"] == "confident" and meta["policy"] == "confidence"
    assert 0 < meta["confidence"] <= 1 and meta["threshold"] == 0.0 and meta["tokens"]["completion_tokens"] > 0
    assert isinstance(r.choices[0].message.content, str) and r.usage.completion_tokens == meta["tokens"]["completion_tokens"]
    # the students's deployment and the teacher's, directly; an answer cut by max_tokens says so
    r = client().chat.completions.create(model="cotd-teacher", messages=Q, max_tokens=4)
    assert r.model_extra["cotd"]["answered_by"] == "teacher" and r.choices[0].finish_reason == "length"
    # content as text parts, a developer message and a stop sequence, as other SDKs send them
    parts = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": Q[0]["content"]}]}]
    r = c.chat.completions.create(model="cotd-hybrid", messages=parts, max_tokens=4, stop=["\n\n\n"], top_p=0.9)
    assert r.model_extra["cotd"]["answered_by"] == "student" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 4


def test_streaming_delivers_the_chosen_answer_then_the_metadata(server):
    usage = {"include_usage": True}
    chunks = list(client().chat.completions.create(model="cotd-hybrid", messages=Q, max_tokens=16, stream=True,
                                                   stream_options=usage))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    meta = [ch.model_extra["cotd"] for ch in chunks if ch.model_extra.get("cotd")]
    assert text and len(meta) == 1 and meta[0]["answered_by"] == "student"
    assert chunks[-1].usage.completion_tokens == meta[0]["tokens"]["completion_tokens"] > 0 and not chunks[-1].choices
    # a rule decides before the student is asked: the teacher's answer streams as it is written,
    # and its tokens reach the metadata and the usage chunk once it is done
    chunks = list(client().chat.completions.create(model="cotd-hybrid", messages=Q, max_tokens=16, stream=True,
                                                   stream_options=usage, extra_body={"cotd": {"high_stakes": True}}))
    meta = [ch.model_extra["cotd"] for ch in chunks if ch.model_extra.get("cotd")]
    assert meta[0]["answered_by"] == "teacher" and meta[0]["reason"] == "rule:high_stakes_flag"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert chunks[-1].usage.completion_tokens == meta[0]["tokens"]["completion_tokens"] > 0
    assert {ch.model for ch in chunks if ch.choices} == {"cotd-hybrid"}
    # without stream_options, no usage chunk
    chunks = list(client().chat.completions.create(model="cotd-teacher", messages=Q, max_tokens=4, stream=True))
    assert all(ch.usage is None for ch in chunks) and chunks[-1].model_extra.get("cotd")


def test_bad_requests_get_4xx_with_a_message(server):
    url = f"http://127.0.0.1:{PORT}/v1/chat/completions"
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url, content=b"{not json", timeout=30, headers=auth)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url, json={"messages": Q, "max_tokens": 10_000}, timeout=30, headers=auth)
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    r = httpx.post(url, json={"messages": [{"role": "user", "content": "word " * 2000}]}, timeout=30, headers=auth)
    assert r.status_code == 400 and "prompt is" in r.json()["error"]["message"]  # refused before any engine
    r = httpx.post(url, json={"messages": Q, "model": "nope"}, timeout=30, headers=auth)
    assert r.status_code == 404
    r = httpx.post(url, content=b"x" * (2 << 20), timeout=30, headers=auth)
    assert r.status_code == 413
    r = httpx.post(url, json={"messages": Q, "cotd": {"policy": {"kind": "coin"}}}, timeout=30, headers=auth)
    assert r.status_code == 400 and "cotd.policy: kind: must be one of" in r.json()["error"]["message"]
    r = httpx.post(url, json={"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                   timeout=30, headers=auth)
    assert r.status_code == 400 and "text parts only" in r.json()["error"]["message"]


def ask(content=Q, **cotd):
    return client().chat.completions.create(messages=content, model="cotd-hybrid", max_tokens=8,
                                            extra_body={"cotd": cotd} if cotd else None).model_extra["cotd"]


def test_each_policy_and_rule_routes_as_configured(server):
    assert ask(policy={"kind": "always_teacher"})["answered_by"] == "teacher"
    assert ask(policy={"kind": "always_student"})["answered_by"] == "student"
    meta = ask(policy={"threshold": 1.01})  # no answer is that confident: the query escalates
    assert (meta["answered_by"], meta["reason"]) == ("teacher", "below_threshold")
    meta = ask(policy={"signal": "agreement", "samples": 3, "threshold": 0.0})
    assert meta["answered_by"] == "student" and len(meta["signals"]["answers"]) == 3
    assert meta["signals"]["agreement"] in (pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0)
    meta = ask(policy={"kind": "learned", "samples": 3})
    assert (meta["answered_by"], meta["policy"], meta["reason"]) == ("student", "learned", "predicted_right")
    assert len(meta["signals"]["answers"]) == 3 and meta["signals"]["agreement"] is not None
    assert meta["warnings"] == []
    # a request asking for another k than the calibration's is answered, and told so
    meta = ask(policy={"kind": "learned", "samples": 2})
    assert len(meta["signals"]["answers"]) == 2 and "calibrated on 3 samples" in meta["warnings"][0]
    meta = ask([{"role": "user", "content": "Check this contract."}], policy={"rules": {"keywords": ["contract"]}})
    assert meta["reason"] == "rule:keyword" and meta["answered_by"] == "teacher"
    assert ask(category="legal", policy={"rules": {"teacher_categories": ["legal"]}})["reason"] == "rule:category"


def test_api_key_is_enforced(server):
    import openai

    with pytest.raises(openai.AuthenticationError):
        client("sk-wrong").chat.completions.create(messages=Q, model="cotd-hybrid", max_tokens=8)
    r = httpx.get(f"http://127.0.0.1:{PORT}/v1/models", timeout=30)
    assert r.status_code == 401


def test_metrics_and_logs_record_every_answer(server):
    """The router's counters reach Ray's Prometheus endpoint, and each answered request is one
    JSON line in its log, a streamed teacher answer (a rule's) included."""
    import json

    import ray

    client().chat.completions.create(model="cotd-hybrid", messages=Q, max_tokens=4, stream=True,
                                     extra_body={"cotd": {"high_stakes": True}}).close()
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])

    def exported():
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        lines = [x for x in text.splitlines() if x.startswith(("ray_cotd_requests_total", "ray_cotd_escalations_total"))]
        return lines if any('reason="rule:high_stakes_flag"' in x for x in lines) and any('model="student"' in x for x in lines) else None

    assert wait_until(exported, 90, "the router's metrics reached Prometheus", every=5)
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"

    def logged():
        events = [json.loads(x[x.index("{"):]) for f in logs.glob("replica_cotd-test_router_*.log")
                  for x in f.read_text().splitlines() if '"event": "cotd.request"' in x]
        return [e for e in events if (e["answered_by"], e["reason"]) == ("teacher", "rule:high_stakes_flag")
                and e["tokens"].get("completion_tokens")]

    assert wait_until(logged, 30, "a streamed teacher answer in the router's log")


def kill_replica(role: str) -> None:
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA") and role in a["name"]]
    assert names, f"no {role} replica to kill"
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=False)


def test_student_down_is_answered_by_the_teacher(server):
    """The student's replica is killed: until Serve brings it back, a routed query is answered by
    the teacher, marked, after the student's timeout; with fallback error, a 503 naming the student."""
    kill_replica("student")
    t0 = time.time()
    meta = ask()
    assert time.time() - t0 < 50  # the student's 20 s timeout, then the teacher
    assert (meta["answered_by"], meta["reason"]) == ("teacher", "fallback:student_unavailable")
    assert "the student" in meta["details"]["error"]
    r = httpx.post(f"http://127.0.0.1:{PORT}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"messages": Q, "max_tokens": 8, "cotd": {"fallback": "error"}}, timeout=60)
    assert r.status_code in (200, 503)  # 200: the replica came back in the meantime
    if r.status_code == 503:
        assert "the student" in r.json()["error"]["message"]

    def student_back():
        r = client().chat.completions.create(model="cotd-hybrid", messages=Q, max_tokens=4)
        return r.model_extra["cotd"]["answered_by"] == "student"

    wait_until(student_back, 240, "the student's replica came back")


def test_teacher_down_falls_back_within_the_timeout(server):
    """Last: the teacher's replica is killed; until Serve brings it back, an escalated query, streamed
    or not, gets the student's answer, marked, within the teacher's timeout, or a 503 with fallback
    error."""
    kill_replica("teacher")
    # streamed: a rule sends it to the teacher before the student is asked, and the fallback still holds
    t0 = time.time()
    chunks = list(client().chat.completions.create(model="cotd-hybrid", messages=Q, max_tokens=8, stream=True,
                                                   extra_body={"cotd": {"high_stakes": True}}))
    assert time.time() - t0 < 30
    meta = [ch.model_extra["cotd"] for ch in chunks if ch.model_extra.get("cotd")][0]
    assert (meta["answered_by"], meta["reason"]) == ("student", "fallback:teacher_unavailable")
    assert meta["details"]["escalation_reason"] == "rule:high_stakes_flag"
    t0 = time.time()
    meta = ask(policy={"kind": "always_teacher"})
    assert time.time() - t0 < 30  # never a hang
    assert (meta["answered_by"], meta["reason"]) == ("student", "fallback:teacher_unavailable")
    assert meta["details"]["escalation_reason"] == "always_teacher"
    r = httpx.post(f"http://127.0.0.1:{PORT}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"messages": Q, "max_tokens": 8, "cotd": {"policy": {"kind": "always_teacher"}, "fallback": "error"}},
                   timeout=60)
    assert r.status_code == 503 and "teacher" in r.json()["error"]["message"]
