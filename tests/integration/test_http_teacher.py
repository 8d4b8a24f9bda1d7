"""The OpenAI-compatible HTTP teacher through Ray Data's HTTP processor, against a real HTTP server on
loopback that solves "Calculate ..." questions, answers 503 once (a retry) and 400 to an overlong one."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.parquet as pq
import pytest

from jobs.common.config import build
from jobs.generate.config import GenerateConfig
from jobs.generate.main import main

pytestmark = pytest.mark.integration


class TeacherServer(ThreadingHTTPServer):
    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.payloads: list[dict] = []
        self.failed_once = False
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
        if first:
            return self.reply(503, {"error": "warming up"})
        if "TOO LONG" in question:
            return self.reply(400, {"error": {"message": "maximum context length exceeded", "code": 400}})
        expr = re.match(r"Calculate (.*)\.", question).group(1)
        text = f"Step 1: Evaluate {expr}.\nAnswer: {eval(expr)}"  # noqa: S307 (our own test questions)
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
    ]) + "\n")
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
    assert len(rows) == 6
    good = [r for r in rows if "TOO LONG" not in r["question"]]
    bad = [r for r in rows if "TOO LONG" in r["question"]]
    assert all(r["status"] == "ok" and r["correct"] and r["output_tokens"] == 12 for r in good), good
    assert all(r["status"] == "error" and "maximum context length" in r["error"] for r in bad)
    assert manifest["summary"]["status"] == {"ok": 4, "unparsed": 0, "error": 2}

    sent = teacher_server.payloads
    assert teacher_server.failed_once and len(sent) == 6  # the 503 was retried
    assert {p["path"] for p in sent} == {"/v1/chat/completions"} and {p["auth"] for p in sent} == {"Bearer sk-test"}
    assert {p["model"] for p in sent} == {"served-teacher"}
    assert all(p["temperature"] == 0.7 and p["max_tokens"] == 64 for p in sent)
    assert len({p["seed"] for p in sent}) == 6  # an HTTP teacher gets each chain's own seed
    assert sent[0]["messages"][0]["role"] == "system" and len(sent[0]["messages"]) == 4  # system, 1 exemplar, question
