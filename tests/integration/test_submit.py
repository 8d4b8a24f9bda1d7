"""`cotd submit` and `cotd jobs` through Ray's Jobs API, against a head node this test starts (its
own Ray, with the dashboard's job server): a generation job against an HTTP teacher on loopback,
its logs followed to the end, its status as the exit code, the jobs listed, and a running job
stopped."""

from __future__ import annotations

import json
import threading

import pytest

from shared import cotd, ray_node, stop_node, wait_for_dashboard, wait_until

pytestmark = pytest.mark.integration
# ports apart from any other Ray on this machine (a session's local Ray runs its own agents)
GCS_PORT, DASHBOARD_PORT, AGENT_PORT = 6391, 8271, 52391


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head node of its own (ports and temp dir apart from the session's local Ray)."""
    proc = ray_node("--head", f"--port={GCS_PORT}", f"--dashboard-port={DASHBOARD_PORT}", "--include-dashboard=true",
                    "--num-cpus=4", f"--dashboard-agent-listen-port={AGENT_PORT}",
                    f"--dashboard-agent-grpc-port={AGENT_PORT + 1}", f"--metrics-export-port={AGENT_PORT + 2}",
                    f"--runtime-env-agent-port={AGENT_PORT + 3}", temp=tmp_path_factory.mktemp("ray-head"))
    url = f"http://127.0.0.1:{DASHBOARD_PORT}"
    try:
        wait_for_dashboard(url, proc)
        yield url
    finally:
        stop_node(proc)


def test_submit_follow_list_and_refusals(head, tmp_path):
    from test_http_teacher import TeacherServer

    server = TeacherServer()
    server.failed_once = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = tmp_path / "run"
    try:
        sources = json.dumps([{"type": "jsonl", "path": str(tmp_path / "p.jsonl"), "category": "math"}])
        (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"question": f"Calculate {a} + 4.", "answer": str(a + 4)})
                                                    for a in range(3)) + "\n")
        done = cotd("submit", "generate", "--config", "configs/generate/http-teacher.yaml", "--address", head,
                    "--follow", "--id", "cotd-test-job", f"out_dir={out}", f"sources={sources}", "paths_per_problem=1",
                    f"teacher.base_url=http://127.0.0.1:{server.server_address[1]}/v1", "teacher.qps=null")
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "submitted cotd-test-job: python -m jobs.generate --config configs/generate/http-teacher.yaml" in done.stdout
    assert "accuracy" in done.stdout and "job cotd-test-job: SUCCEEDED" in done.stdout  # the followed logs
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["summary"]["chains"] == 3 and manifest["summary"]["accuracy"] == 1.0

    listed = cotd("jobs", "list", "--address", head)
    assert listed.returncode == 0 and "cotd-test-job" in listed.stdout and "SUCCEEDED" in listed.stdout
    assert "generate" in listed.stdout
    logs = cotd("jobs", "logs", "cotd-test-job", "--address", head)
    assert logs.returncode == 0 and "chains:" in logs.stdout

    # a job that fails exits non-zero with --follow; bad input is refused before anything is submitted
    failed = cotd("submit", "generate", "--config", "configs/generate/http-teacher.yaml", "--address", head,
                  "--follow", f"out_dir={tmp_path / 'bad'}", "sources=[{type: jsonl, path: /nope.jsonl}]")
    assert failed.returncode == 1 and "FAILED" in failed.stdout
    outside = tmp_path / "c.yaml"
    outside.write_text("out_dir: x\n")
    refused = cotd("submit", "generate", "--config", str(outside), "--address", head)
    assert refused.returncode == 2 and "outside the repository" in refused.stderr
    nowhere = cotd("jobs", "list", "--address", "http://127.0.0.1:9")
    assert nowhere.returncode == 2 and "no Ray job server answers there" in nowhere.stderr

    # a running job stopped: `cotd jobs stop` asks, `cotd jobs status` then says STOPPED, and the
    # stage left no manifest behind (nothing claims to be finished)
    slow = TeacherServer()
    slow.failed_once, slow.delay = True, 600.0
    threading.Thread(target=slow.serve_forever, daemon=True).start()
    try:
        started = cotd("submit", "generate", "--config", "configs/generate/http-teacher.yaml", "--address", head,
                       "--id", "cotd-test-stop", f"out_dir={tmp_path / 'slow'}", f"sources={sources}",
                       "paths_per_problem=1", f"teacher.base_url=http://127.0.0.1:{slow.server_address[1]}/v1",
                       "teacher.qps=null")
        assert started.returncode == 0 and "submitted cotd-test-stop" in started.stdout, started.stderr[-2000:]
        # the job is running once its first request reaches the teacher
        wait_until(lambda: slow.payloads, 180, "the submitted job did not reach the teacher")
        assert cotd("jobs", "status", "cotd-test-stop", "--address", head).stdout.strip() == "RUNNING"
        stopped = cotd("jobs", "stop", "cotd-test-stop", "--address", head)
        assert stopped.returncode == 0 and "cotd-test-stop: stop requested" in stopped.stdout
        def stopped() -> bool:
            status = cotd("jobs", "status", "cotd-test-stop", "--address", head).stdout.strip()
            assert status in ("RUNNING", "STOPPED"), status
            return status == "STOPPED"

        wait_until(stopped, 60, "the stopped job did not reach STOPPED")
    finally:
        slow.shutdown()
    assert not (tmp_path / "slow" / "manifest.json").exists()
    again = cotd("jobs", "stop", "cotd-test-stop", "--address", head)
    assert again.returncode == 0 and "cotd-test-stop: not running" in again.stdout
