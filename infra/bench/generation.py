"""Teacher generation throughput: the cotd pipeline (Ray Data + ray.data.llm + parsing, grading and
Parquet writing) against a plain `vllm.LLM.chat` loop over the same prompts, in one run, with two
plain baselines: vLLM with its defaults (what a user gets first) and vLLM with the CPU thread
binding cotd uses (`teacher.cpu_binding`: the fair engine baseline).

Run as:
    .venv/bin/python infra/bench/generation.py                      # 64 problems x 4 paths, SmolLM2-135M
    .venv/bin/python infra/bench/generation.py --problems 128 --max-tokens 128 --model qwen2.5-coder-0.5b-instruct

Both sides produce exactly problems x paths x max_tokens output tokens (`ignore_eos`), each in its own
process (so neither inherits the other's engine or memory), and are timed end to end from a cold start:
the plain loop from `import vllm` to its last output, cotd from `main()` to its manifest (Ray start-up
included). Prints the rates and both ratios; the targets on a 2-core CPU machine are cotd >= 1.3x plain
vLLM with its defaults and >= 0.9x plain vLLM with the same binding. One set of runs moves by a few
percent on a noisy machine: `--repeat N` measures N sets back to back and reports the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SIDES = ("plain", "plain-bound", "cotd")
sys.path.insert(0, str(REPO))


def build_config(args, out_dir: str):
    from jobs.common.config import build
    from jobs.generate.config import GenerateConfig

    return build(GenerateConfig, {
        "out_dir": out_dir, "paths_per_problem": args.paths, "write_rows": 64,
        "sources": [{"type": "reasoning_gym", "tasks": [{"name": "basic_arithmetic", "size": args.problems, "seed": 7}]}],
        "teacher": {"model": args.model, "max_model_len": args.max_model_len, "batch_size": args.batch_size,
                    "max_concurrent_batches": args.concurrent_batches},
        "sampling": {"max_tokens": args.max_tokens, "temperature": 0.8, "extra": {"ignore_eos": True}},
        "prompt": {"few_shot": 2},
    })


def run_plain(args, bound: bool) -> dict:
    """A baseline: the same templated prompts, one `LLM.chat` call, all requests at once; `bound`:
    with cotd's CPU thread binding, else vLLM's own."""
    import json as _json

    from jobs.common.engine import cpu_binding_env, engine_dtype
    from jobs.common.models import resolve
    from jobs.formats.prompts import load_exemplars
    from jobs.generate.pipeline import plan_rows
    from jobs.tasks.sources import load_problems

    cfg = build_config(args, "unused")
    rows = plan_rows(load_problems(cfg.sources), cfg, load_exemplars(), tokenizer=None)
    conversations = [_json.loads(r["prompt_messages"]) for r in rows]
    path = resolve(args.model)
    if bound:
        os.environ.update(cpu_binding_env(cfg.teacher))
    t0 = time.perf_counter()
    # vLLM is imported inside the timed window: cotd's engine process imports it inside cotd's
    from vllm import LLM, SamplingParams

    llm = LLM(model=path, dtype=engine_dtype(cfg.teacher), max_model_len=args.max_model_len, enforce_eager=True,
              gpu_memory_utilization=0.4)
    t1 = time.perf_counter()
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=args.max_tokens, ignore_eos=True)
    outputs = llm.chat(conversations, params, use_tqdm=False)
    t2 = time.perf_counter()
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"chains": len(outputs), "output_tokens": tokens, "seconds": t2 - t0, "generate_seconds": t2 - t1}


def run_cotd(args) -> dict:
    from jobs.generate.main import main

    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config(args, str(Path(tmp) / "run"))
        t0 = time.perf_counter()
        manifest = main(cfg, log=lambda *_: None)
        t1 = time.perf_counter()
    s = manifest["summary"]
    return {"chains": s["chains"], "output_tokens": s["output_tokens"], "seconds": t1 - t0,
            "generate_seconds": manifest["last_attempt"]["seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--paths", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--concurrent-batches", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure this many sets of runs back to back and report the median ratios")
    ap.add_argument("--only", choices=SIDES, help=argparse.SUPPRESS)  # one side, in a child process
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error(f"--repeat must be >= 1, got {args.repeat}")

    if args.only:
        result = run_cotd(args) if args.only == "cotd" else run_plain(args, bound=args.only == "plain-bound")
        print("RESULT " + json.dumps(result))
        return

    from jobs.common.engine import cpu_binding_env
    from jobs.common.models import resolve

    resolve(args.model)  # pull once, outside the timed runs
    binding = cpu_binding_env(build_config(args, "unused").teacher)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}; model {args.model}; "
          f"cotd's CPU binding: {binding or 'vLLM defaults'}")
    ratios: dict[str, list[float]] = {"plain": [], "plain-bound": []}
    for i in range(args.repeat):
        runs = {side: _run_side(side) for side in SIDES}
        tokens = {side: r["output_tokens"] for side, r in runs.items()}
        if len(set(tokens.values())) != 1:
            sys.exit(f"the sides did different work: {tokens} tokens")
        c = runs["cotd"]
        print(f"run {i + 1}/{args.repeat}: {c['chains']} chains x {args.max_tokens} tokens = {c['output_tokens']} output tokens")
        rate_c = c["output_tokens"] / c["seconds"]
        for side, label in (("plain", "plain vLLM, its defaults "), ("plain-bound", "plain vLLM, cotd binding")):
            p = runs[side]
            rate_p = p["output_tokens"] / p["seconds"]
            ratios[side].append(rate_c / rate_p)
            print(f"  {label}: {p['seconds']:7.1f} s end to end  {rate_p:7.1f} tok/s   "
                  f"(generation alone {p['generate_seconds']:.1f} s, {p['output_tokens'] / p['generate_seconds']:.1f} tok/s)")
        print(f"  cotd generate           : {c['seconds']:7.1f} s end to end  {rate_c:7.1f} tok/s   "
              f"(streaming phase {c['generate_seconds']:.1f} s, {c['output_tokens'] / c['generate_seconds']:.1f} tok/s)")
        print(f"  ratios cotd / plain (end to end tok/s): defaults {ratios['plain'][-1]:.3f}, "
              f"same binding {ratios['plain-bound'][-1]:.3f}", flush=True)
    for side, target, label in (("plain", 1.3, "vLLM defaults"), ("plain-bound", 0.9, "the same binding")):
        rs = ratios[side]
        extra = f" (runs {', '.join(f'{r:.3f}' for r in rs)})" if len(rs) > 1 else ""
        print(f"ratio cotd / plain vLLM with {label}{', median' if len(rs) > 1 else ''}: "
              f"{statistics.median(rs):.3f}{extra}   target >= {target}")


def _run_side(side: str) -> dict:
    """One side, timed in a fresh child process."""
    cmd = [sys.executable, __file__, "--only", side] + sys.argv[1:]
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
           "VLLM_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        sys.exit(f"{side} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[0][7:])


if __name__ == "__main__":
    main()
