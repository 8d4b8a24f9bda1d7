"""The curate stage for real: chains made by generate's own row builders, screened on Ray Data, a
judge pass through vLLM on CPU (tiny model) and through an OpenAI-compatible server on loopback,
resume of the judge pass, and bad input refused before anything is written."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.common.config import build
from jobs.common.runs import PartWriter, part_files, read_dataset
from jobs.curate.config import CurateConfig
from jobs.curate.main import main
from jobs.formats.prompts import load_exemplars
from jobs.generate.config import GenerateConfig
from jobs.generate.pipeline import finish_rows, plan_rows
from jobs.common.schemas import CHAIN_SCHEMA
from jobs.tasks.sources import load_problems

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
MAX_TOKENS = 200

# what each path of a gold-answer problem is, and the reason curation must give it
PATHS = {0: ("method A", None), 1: ("copy of A", "duplicate"), 2: ("wrong", "incorrect"),
         3: ("method B", None), 4: ("cut off", "truncated")}


def chain_text(kind: str, answer: str) -> str:
    if kind in ("method A", "copy of A"):
        sep = "\n" if kind == "method A" else "  \n"
        return sep.join(["Step 1: Method A. Read the expression and find the innermost operations first.",
                         "Step 2: Evaluate them from left to right, keeping the signs.",
                         "Step 3: Combine the partial results into the final value.", f"Answer: {answer}"])
    if kind == "method B":
        return ("Step 1: Method B. Rewrite the whole sum as one running total.\n"
                "Step 2: Add or subtract each number in turn, carefully.\n"
                f"Answer: {answer}")
    if kind == "wrong":
        return f"Step 1: Guess a value close to the numbers.\nStep 2: Round it.\nAnswer: {answer}1"
    return "Step 1: Start with the first number and then keep going through the"


@pytest.fixture(scope="module")
def chains_dir(tmp_path_factory, tokenizer) -> Path:
    """A chains dataset built exactly as generate builds one: plan_rows, then finish_rows over
    engine outputs (here, texts we wrote), 6 gold-answer problems x 5 paths and one problem
    without a gold answer x 3 paths."""
    tmp = tmp_path_factory.mktemp("chains")
    nogold = tmp / "nogold.jsonl"
    nogold.write_text(json.dumps({"question": "Which weekday follows Monday?", "id": "weekday"}) + "\n")
    cfg = build(GenerateConfig, {
        "out_dir": str(tmp), "paths_per_problem": 5, "teacher": {"model": "teacher-x"},
        "sampling": {"max_tokens": MAX_TOKENS},
        "sources": [{"type": "reasoning_gym", "tasks": [{"name": "basic_arithmetic", "size": 6, "seed": 5}]},
                    {"type": "jsonl", "path": str(nogold), "fields": {"answer": None, "id": "id"}, "category": "temporal"}]})
    problems = load_problems(cfg.sources)
    rows = plan_rows(problems, cfg, load_exemplars(), tokenizer)
    gold = {p.id: p.answer for p in problems}
    outputs = []
    for r in rows:
        if r["problem_id"] == "weekday":
            if r["path_index"] > 2:
                continue
            text = f"Step 1: The week runs Monday, Tuesday.\nStep 2: So the day after Monday is next.\nAnswer: {'Wednesday' if r['path_index'] == 2 else 'Tuesday'}"
            tokens = 20
        else:
            kind = PATHS[r["path_index"]][0]
            text, tokens = chain_text(kind, gold[r["problem_id"]]), MAX_TOKENS if kind == "cut off" else 40
        outputs.append({**r, "generated_text": text, "num_generated_tokens": tokens, "num_input_tokens": 100,
                        "time_taken_llm": 1.0})
    import pyarrow as pa

    folder = tmp / "chains"
    PartWriter(folder, CHAIN_SCHEMA).write(pa.Table.from_pylist(finish_rows(outputs, MAX_TOKENS), schema=CHAIN_SCHEMA))
    return folder


def expected_reason(pid: str, k: int) -> str | None:
    if pid == "weekday":
        return {0: None, 1: "duplicate", 2: "disagrees_with_majority"}[k]
    return PATHS[k][1]


def curate_config(chains, out, **over):
    data = {"chains": str(chains), "out_dir": str(out), "val_fraction": 0.3,
            "mix": {"ratio": 0.5, "sources": [{"type": "reasoning_gym", "tasks": [
                {"name": "spell_backward", "size": 20, "seed": 1, "category": "general"}]}]}}
    data.update(over)
    return build(CurateConfig, data)


def examples(out: Path, split: str) -> list[dict]:
    return pq.read_table(out / split).to_pylist()


def check_outputs(out: Path, chains: Path, manifest: dict) -> list[dict]:
    """Invariants every curation run must hold."""
    decisions = pq.read_table(out / "decisions").to_pylist()
    n_chains = pq.read_table(chains).num_rows
    assert len(decisions) == n_chains  # every chain decided once
    assert len({(d["problem_id"], d["path_index"]) for d in decisions}) == n_chains
    assert all(d["kept"] == (d["reason"] is None) for d in decisions)  # never both kept and dropped
    s = manifest["summary"]
    assert s["kept"] + sum(s["dropped_by_reason"].values()) == s["chains"] == n_chains
    train, val = examples(out, "train"), examples(out, "val")
    assert not {e["problem_id"] for e in train} & {e["problem_id"] for e in val}  # no problem in two splits
    assert any(e["kind"] == "rationale" for e in val)  # val is drawn from problems that kept a chain
    kept = {(d["problem_id"], d["path_index"]) for d in decisions if d["kept"]}
    rationale = [(e["problem_id"], e["path_index"]) for e in train + val if e["kind"] == "rationale"]
    assert sorted(rationale) == sorted(kept)
    chain_rows = {(c["problem_id"], c["path_index"]): c for c in pq.read_table(chains).to_pylist()}
    for e in train + val:
        messages = json.loads(e["messages"])
        assert messages[-1]["role"] == "assistant" and messages[-1]["content"].strip()
        if e["kind"] != "general":  # each example carries its problem's answer check (train's answer accuracy)
            c = chain_rows[(e["problem_id"], e["path_index"])]
            assert (e["gold_answer"], e["verifier"], e["metadata"]) == (c["gold_answer"], c["verifier"], c["metadata"])
        else:
            assert e["verifier"]
    split_of = {d["problem_id"]: d["split"] for d in decisions}
    assert all(split_of[e["problem_id"]] == "val" for e in val if e["kind"] != "general")
    general = [e for e in train + val if e["kind"] == "general"]
    assert len(general) == round(0.5 * len(rationale))
    assert s["examples"]["train"]["rationale"] + s["examples"].get("val", {}).get("rationale", 0) == len(rationale)
    assert (out / "report.md").read_text().startswith("# Curation report")
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob(".staging-*")) and not list(out.glob(".old-*"))
    return decisions


def test_curate_with_vllm_judge(tmp_path, chains_dir, tiny_model, ray_session):
    out = tmp_path / "curated"
    judge = {"model": {"model": str(tiny_model), "max_model_len": 1024, "batch_size": 8, "gpu_memory_utilization": 0.1},
             "sampling": {"temperature": 0.0, "max_tokens": 16}, "unparsed": "keep", "write_rows": 4}
    cfg = curate_config(chains_dir, out, judge=judge)
    lines: list[str] = []
    manifest = main(cfg, log=lines.append)
    decisions = check_outputs(out, chains_dir, manifest)
    assert {(d["problem_id"], d["path_index"]): d["reason"] for d in decisions} == \
        {(d["problem_id"], d["path_index"]): expected_reason(d["problem_id"], d["path_index"]) for d in decisions}

    # the judge rated every chain that passed the checks, and its judgements are kept as data
    jdir = next(p for p in (out / "judgements").iterdir() if p.is_dir())
    judged = read_dataset(jdir).to_pylist()
    survivors = {(d["problem_id"], d["path_index"]) for d in decisions if d["kept"]}
    assert {(j["problem_id"], j["path_index"]) for j in judged} == survivors
    assert all(j["status"] in ("ok", "unparsed") and j["judge_text"] is not None for j in judged)
    assert any("13 to judge" in ln for ln in lines), lines


class JudgeServer(ThreadingHTTPServer):
    """Rates 'Method B' chains 3, others 8, and answers one chain in a form that cannot be read."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), JudgeHandler)
        self.seen: list[str] = []


class JudgeHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        self.server.seen.append(user)
        if "Monday" in user:
            text = "Looks fine to me."
        else:
            s = 3 if "Method B" in user else 8
            text = f"Structure: {s}\nClarity: {s}\nConfidence: {s}\nJustification: rated {s} for its steps."
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 90, "completion_tokens": 20}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_curate_with_http_judge_drop_rule_self_eval_and_resume(tmp_path, chains_dir, ray_session):
    """Also: the judge pass resumes (the same for every judge backend): a lost judgement part is
    judged again, nothing else."""
    server = JudgeServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "curated"
        judge = {"model": {"backend": "openai", "model": "judge-x", "base_url": f"http://127.0.0.1:{server.server_address[1]}/v1"},
                 "rule": "threshold", "min_score": 6, "unparsed": "drop", "write_rows": 4}
        cfg = curate_config(chains_dir, out, judge=judge, examples={"format": "post", "granularity": 1})
        manifest = main(cfg, log=lambda *_: None)
        # resume: lose the last judgement part (as a crash would), run again: only those are judged
        jdir = next(p for p in (out / "judgements").iterdir() if p.is_dir())
        parts = part_files(jdir)
        assert len(parts) >= 2
        lost = pq.read_table(parts[-1]).num_rows
        parts[-1].unlink()
        lines: list[str] = []
        seen = len(server.seen)
        again = main(cfg, log=lines.append)
        assert any(f"{13 - lost} already judged" in ln and f"{lost} to judge" in ln for ln in lines), lines
        assert len(server.seen) - seen == lost and len(read_dataset(jdir)) == 13
        assert again["summary"]["kept"] == manifest["summary"]["kept"]
        check_outputs(out, chains_dir, again)
        server.seen = server.seen[:seen]
    finally:
        server.shutdown()
    decisions = check_outputs(out, chains_dir, manifest)
    reasons = Counter(d["reason"] for d in decisions)
    assert reasons == Counter({None: 6, "duplicate": 7, "incorrect": 6, "truncated": 6, "judge_low": 6,
                               "judge_unparsed": 1, "disagrees_with_majority": 1})
    assert all("Method A" in s or "Method B" in s or "Monday" in s for s in server.seen) and len(server.seen) == 13
    train, val = examples(out, "train"), examples(out, "val")
    evals = [e for e in train + val if e["kind"] == "self_eval"]
    assert len(evals) == 12  # the 12 readable judgements, low ones included: they teach what bad looks like
    rationale = [json.loads(e["messages"]) for e in train + val if e["kind"] == "rationale"]
    assert all(m[-1]["content"].startswith("Answer:") and m[-1]["content"].count("Step ") == 1 for m in rationale)


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "holds no part-"),
    ("columns", "lacks column(s)"),
    ("corrupt", "not a readable Parquet file"),
])
def test_bad_chains_input_is_refused_before_writing(tmp_path, case, message):
    chains = tmp_path / "chains"
    if case != "missing":
        chains.mkdir()
    if case == "columns":
        import pyarrow as pa

        pq.write_table(pa.table({"problem_id": ["a"], "chain": ["x"]}), chains / "part-1-00000.parquet")
    if case == "corrupt":
        (chains / "part-1-00000.parquet").write_bytes(b"PAR1 not really")
    out = tmp_path / "curated"
    proc = subprocess.run([sys.executable, "-m", "jobs.curate", "--config", str(REPO / "configs/curate/quickstart.yaml"),
                           f"chains={chains}", f"out_dir={out}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "cotd: error: chains:" in proc.stderr and message in proc.stderr
    assert not out.exists()
