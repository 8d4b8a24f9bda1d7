"""The OpenAI-compatible HTTP teacher through Ray Data's HTTP processor, against a real HTTP server on
loopback that solves "Calculate ..." questions, answers 503 once (a retry) and 400 to an overlong one."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.parquet as pq
import pytest

from jobs.common.runs import part_files, read_dataset

from jobs.common.config import build
from jobs.generate.config import GenerateConfig
from jobs.generate.main import main
from shared import dotted

pytestmark = pytest.mark.integration


class TeacherServer(ThreadingHTTPServer):
    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.payloads: list[dict] = []
        self.failed_once = False
        self.down: set[str] = set()  # questions answered with an outage (500)
        self.delay = 0.0             # seconds before each answer
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server: TeacherServer = self.server  # type: ignore[assignment]
        with server.lock:
            first = not server.failed_once
            server.failed_once = True
            if not first:
                server.payloads.append(body | {"path": self.path, "auth": self.headers.get("Authorization")})
        question = body["messages"][-1]["content"]
        time.sleep(server.delay)
        if first:
            return self.reply(503, {"error": "warming up"})
        if question in server.down:
            return self.reply(500, {"error": {"message": "upstream outage", "code": 500}})
        if "TOO LONG" in question:
            return self.reply(400, {"error": {"message": "maximum context length exceeded", "code": 400}})
        m = re.match(r"Calculate ([\d\s+*/().-]*)\.$", question)
        # our own test questions are evaluated; anything else gets an answer of the right shape
        text = f"Step 1: Evaluate {m.group(1)}.\nAnswer: {eval(m.group(1))}" if m else "Step 1: Think it over.\nAnswer: 0"  # noqa: S307
        self.reply(200, {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 50, "completion_tokens": 12}})

    def reply(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def teacher_server():
    server = TeacherServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_http_teacher_generates_grades_retries_and_records_errors(tmp_path, teacher_server, ray_session, monkeypatch):
    monkeypatch.setenv("COTD_TEST_KEY", "sk-test")
    problems = tmp_path / "p.jsonl"
    problems.write_text("\n".join(json.dumps(r) for r in [
        {"question": "Calculate 2 + 3.", "answer": "5"},
        {"question": "Calculate 7 * 6.", "answer": "42"},
        {"question": "TOO LONG: Calculate 1.", "answer": "1"},
        {"question": "Calculate 9 - 4.", "answer": "5"},
    ]) + "\n")
    teacher_server.down = {"Calculate 9 - 4."}
    port = teacher_server.server_address[1]
    cfg = build(GenerateConfig, {
        "out_dir": str(tmp_path / "run"), "paths_per_problem": 2,
        "sources": [{"type": "jsonl", "path": str(problems), "category": "math"}],
        "teacher": {"backend": "openai", "model": "served-teacher", "base_url": f"http://127.0.0.1:{port}/v1",
                    "api_key_env": "COTD_TEST_KEY", "max_retries": 2, "qps": 50},
        "sampling": {"temperature": 0.7, "max_tokens": 64}, "prompt": {"format": "pre", "few_shot": 1},
    })
    manifest = main(cfg, log=lambda *_: None)

    rows = pq.read_table(tmp_path / "run" / "chains").to_pylist()
    assert len(rows) == 8
    good = [r for r in rows if "TOO LONG" not in r["question"] and r["question"] not in teacher_server.down]
    bad = [r for r in rows if "TOO LONG" in r["question"]]
    outage = [r for r in rows if r["question"] in teacher_server.down]
    assert all(r["status"] == "ok" and r["correct"] and r["output_tokens"] == 12 for r in good), good
    assert all(r["status"] == "error" and "maximum context length" in r["error"] for r in bad)
    assert all(r["status"] == "error" and "outage" in r["error"] for r in outage)
    assert manifest["summary"]["status"] == {"ok": 4, "unparsed": 0, "error": 4}

    sent = teacher_server.payloads
    # the 503 was retried (Ray's HTTP processor retries 503 and 429, not a 500)
    assert teacher_server.failed_once and len(sent) == 8
    assert {p["path"] for p in sent} == {"/v1/chat/completions"} and {p["auth"] for p in sent} == {"Bearer sk-test"}
    assert {p["model"] for p in sent} == {"served-teacher"}
    assert all(p["temperature"] == 0.7 and p["max_tokens"] == 64 for p in sent)
    assert len({p["seed"] for p in sent}) == 8  # an HTTP teacher gets each chain's own seed
    assert sent[0]["messages"][0]["role"] == "system" and len(sent[0]["messages"]) == 4  # system, 1 exemplar, question

    # the outage is over: a re-run generates the failed chains again (both kinds of failure),
    # keeps the good ones as they are, and duplicates nothing
    teacher_server.down, teacher_server.payloads = set(), []
    lines = []
    manifest = main(cfg, log=lines.append)
    assert any("4 chains that failed in an earlier run" in line for line in lines), lines
    assert len(teacher_server.payloads) == 4
    rows = pq.read_table(tmp_path / "run" / "chains").to_pylist()
    keys = [(r["problem_id"], r["path_index"]) for r in rows]
    assert len(rows) == 8 and len(set(keys)) == 8
    assert all(r["status"] == "ok" and r["correct"] for r in rows if r["question"] == "Calculate 9 - 4.")
    assert {r["chain"] for r in rows if r["question"] in ("Calculate 2 + 3.", "Calculate 7 * 6.")} == {r["chain"] for r in good}
    assert manifest["summary"]["status"] == {"ok": 6, "unparsed": 0, "error": 2}


MIX = [{"type": "reasoning_gym", "tasks": [
    {"name": "basic_arithmetic", "size": 3, "seed": 2},
    {"name": "calendar_arithmetic", "size": 2, "seed": 2},
    {"name": "syllogism", "size": 2, "seed": 2},
]}]


def test_resume_fills_only_what_is_missing_and_refuses_a_different_setup(tmp_path, teacher_server, ray_session, monkeypatch):
    """Resume is the same for every backend: this runs it against the HTTP teacher (no engine to
    start). The first run, a resume that fills a lost part and a third path per problem at once,
    and an overwrite; the no-op and the refusal start nothing."""
    from jobs.common import raycluster
    from jobs.common.errors import CotdError

    teacher_server.failed_once = True  # no 503 here
    url = f"http://127.0.0.1:{teacher_server.server_address[1]}/v1"

    def config(out, model, **over):
        data = {"out_dir": str(out), "sources": MIX, "paths_per_problem": 2, "write_rows": 4,
                "teacher": {"backend": "openai", "model": "served-teacher", "base_url": url, "batch_size": 4},
                "sampling": {"max_tokens": 24}, "prompt": {"few_shot": 1}}
        return build(GenerateConfig, dotted(data, over))

    def keys(run_dir):
        t = read_dataset(run_dir / "chains", columns=["problem_id", "path_index"])
        return list(zip(t.column("problem_id").to_pylist(), t.column("path_index").to_pylist()))

    tiny_model = None
    run = tmp_path / "run"
    main(config(run, tiny_model), log=lambda *_: None)
    first = {p.name: p.stat().st_mtime_ns for p in part_files(run / "chains")}

    # a crash: one part lost, a half-written temporary file left behind
    lost = sorted(first)[1]
    lost_keys = set(zip(*(pq.read_table(run / "chains" / lost).column(c).to_pylist() for c in ("problem_id", "path_index"))))
    assert lost_keys and all(path < 2 for _, path in lost_keys)
    (run / "chains" / lost).unlink()
    (run / "chains" / ".part-crashed-00009.parquet.tmp").write_bytes(b"PAR1 half")

    # resumed with more paths per problem: the lost chains and the 7 new paths, nothing else
    lines = []
    manifest = main(config(run, tiny_model, paths_per_problem=3), log=lines.append)
    assert any(f"{21 - len(lost_keys) - 7} already in" in line and f"{len(lost_keys) + 7} to generate" in line
               for line in lines), lines
    assert not list((run / "chains").glob(".*.tmp"))
    ks = keys(run)
    assert len(ks) == 21 and len(set(ks)) == 21 and lost_keys <= set(ks)
    # untouched parts were neither rewritten nor duplicated
    assert all((run / "chains" / name).stat().st_mtime_ns == t for name, t in first.items() if name != lost)
    assert manifest["last_attempt"]["rows"] == len(lost_keys) + 7

    # the same command once more: nothing to do, nothing duplicated; and neither Ray nor the
    # tokenizer is started, nor, for the refusal below, before refusing
    with monkeypatch.context() as m:
        m.setattr(raycluster, "init_ray_while", lambda *a, **k: pytest.fail("started Ray with nothing to generate"))
        manifest = main(config(run, tiny_model, paths_per_problem=3), log=lambda *_: None)
        assert manifest["last_attempt"]["rows"] == 0 and len(keys(run)) == 21

        # other sampling settings would mix two setups in one dataset: refused, the run left as it is
        with pytest.raises(CotdError, match="different sampling"):
            main(config(run, tiny_model, paths_per_problem=3, **{"sampling.temperature": 0.3}), log=lambda *_: None)
        assert len(keys(run)) == 21
    # unless the user asks to start over
    manifest = main(config(run, tiny_model, overwrite=True, **{"sampling.temperature": 0.3,
                    "sources": [{"type": "reasoning_gym", "tasks": [{"name": "chain_sum", "size": 1}]}]}),
                    log=lambda *_: None)
    assert manifest["summary"]["chains"] == 2 and len(keys(run)) == 2
