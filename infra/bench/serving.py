"""The hybrid server under measurement, one local Serve application, three benchmarks.

Run as:
    .venv/bin/python infra/bench/serving.py overhead --student runs/quickstart/student --teacher smollm2-135m-instruct
    .venv/bin/python infra/bench/serving.py load --student ... --teacher ... --concurrency 8 --seconds 60 --kill-at 20
    .venv/bin/python infra/bench/serving.py quality --items runs/lab/qwen0.5b/eval/items --plot docs/router-cost-quality.png

overhead  p50/p99 latency of the same one-token request, interleaved in one run, by three paths to
          the one student deployment: through cotd's router (HTTP, Serve's proxy, the router, the
          student); through Ray Serve LLM's own OpenAI ingress bound to that same deployment as a
          second application (HTTP, the proxy, the stock ingress, the student: how a user serves the
          student alone behind the same API); and a Serve handle call from this process (no HTTP).
          The router's overhead is reported against both baselines. Beside them, GET /health: HTTP
          through Serve's proxy to the router and back with no model. Target: p50 overhead <= 5 ms.
load      a fixed number of concurrent clients for a fixed time: throughput, latency percentiles,
          errors; with --kill-at, one student replica is killed mid-test (its actor, through Ray):
          no request may hang, every failure is counted, and the replica must come back.
quality   the cost-quality points of every policy on held-out problems (an evaluation's items:
          thresholds calibrated on one half, measured on the other), the always-student and
          always-teacher points, RouteLLM's summaries (APGR, escalation for 50/80/95% of the
          teacher's quality), and a plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
PORT = 8766


def percentile(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def paired_median(a: list[float], b: list[float]) -> tuple[float, tuple[float, float]]:
    """The median of a[i] - b[i] (the same iteration of an interleaved run, so the same moment of the
    machine) and its 95% bootstrap interval: steadier than a difference of two medians."""
    import numpy as np
    from scipy.stats import bootstrap

    diff = np.asarray(a) - np.asarray(b)
    ci = bootstrap((diff,), np.median, confidence_level=0.95, n_resamples=2000, method="percentile",
                   random_state=np.random.default_rng(0)).confidence_interval
    return float(np.median(diff)), (float(ci.low), float(ci.high))


def up(args, **over):
    """Start the application (student, teacher, router) and return its config; `start` waits until
    it answers."""
    from jobs.common.config import build
    from serve.config import ServeConfig
    from serve.main import start

    engine = {"max_model_len": 1024, "gpu_memory_utilization": args.memory,
              "scaling": {"cpus": 1, "min_replicas": args.replicas, "max_replicas": args.replicas}}
    data = {"student": {"run": args.student, **engine, "timeout_s": getattr(args, "student_timeout", 60.0)},
            "teacher": {"model": args.teacher, **engine, "gpu_memory_utilization": args.teacher_memory,
                        "scaling": {"cpus": 1}},
            "policy": {"kind": "always_student"}, "port": PORT, "name": "cotd-bench", **over}
    cfg = build(ServeConfig, data)
    start(cfg, log=print, blocking=False)
    return cfg


def stock_ingress(cfg) -> str:
    """Ray Serve LLM's OpenAI ingress, unchanged, bound to the running application's student
    deployment (`cfg`: the application's ServeConfig) and served as a second application under
    /stock; returns its chat URL."""
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress

    from serve.app import STUDENT_ID, llm_config, resolve_spec

    config = llm_config(cfg.student, STUDENT_ID, resolve_spec(cfg.student)["path"])
    student = serve.get_deployment_handle(f"student:{STUDENT_ID}", app_name="cotd-bench")
    options = {**OpenAiIngress.get_deployment_options([config]), "ray_actor_options": {"num_cpus": 0.2}}
    ingress = serve.deployment(make_fastapi_ingress(OpenAiIngress), name="stock-ingress", **options)
    serve.run(ingress.bind(llm_deployments={STUDENT_ID: student},
                           model_cards={STUDENT_ID: to_model_metadata(STUDENT_ID, config)}),
              name="stock", route_prefix="/stock", blocking=False)
    return f"http://127.0.0.1:{PORT}/stock/v1/chat/completions"


def overhead(args) -> None:
    import httpx
    from ray import serve
    from ray.serve.llm.openai_api_models import ChatCompletionRequest

    from serve.app import STUDENT_ID, HybridRouter, messages_for

    stock_url = stock_ingress(up(args))
    student = serve.get_deployment_handle(f"student:{STUDENT_ID}", app_name="cotd-bench")
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    prompt = json.loads(json.dumps({"format": "pre", "granularity": "coarse", "system": None}))
    direct_req = ChatCompletionRequest(model=STUDENT_ID, messages=messages_for(messages, prompt), max_tokens=1,
                                       temperature=0.0, stream=False)
    body = {"model": "cotd-student", "messages": messages, "max_tokens": 1, "temperature": 0.0}

    async def direct() -> float:
        t0 = time.perf_counter()
        await HybridRouter._first(student, direct_req)
        return 1000 * (time.perf_counter() - t0)

    inside = []  # the router's own time per request (its `router_ms`: latency less the model's)

    def routed(c: httpx.Client) -> float:
        t0 = time.perf_counter()
        r = c.post(f"http://127.0.0.1:{PORT}/v1/chat/completions", json=body)
        r.raise_for_status()
        inside.append(r.json()["cotd"]["router_ms"])
        return 1000 * (time.perf_counter() - t0)

    # the stock ingress gets the student's messages as the router sends them (prompt format applied)
    stock_body = {"model": STUDENT_ID, "messages": direct_req.messages, "max_tokens": 1, "temperature": 0.0}

    def stock(c: httpx.Client) -> float:
        t0 = time.perf_counter()
        c.post(stock_url, json=stock_body).raise_for_status()
        return 1000 * (time.perf_counter() - t0)

    def health(c: httpx.Client) -> float:
        t0 = time.perf_counter()
        c.get(f"http://127.0.0.1:{PORT}/health").raise_for_status()
        return 1000 * (time.perf_counter() - t0)

    loop = asyncio.new_event_loop()
    paths = {"handle call to the student deployment": lambda c: loop.run_until_complete(direct()),
             "HTTP, Ray Serve LLM's ingress, student": stock, "HTTP, cotd's router, student": routed,
             "HTTP to the router, no model (/health)": health}
    ms: dict[str, list[float]] = {name: [] for name in paths}
    with httpx.Client(timeout=60) as c:
        for i in range(args.warmup + args.requests):  # interleaved, so all four see the same machine
            for name, call in paths.items():
                took = call(c)
                if i >= args.warmup:
                    ms[name].append(took)
    print(f"requests: {args.requests} each, one-token answers, interleaved")
    for name, v in ms.items():
        print(f"  {name:<40} p50 {percentile(v, 50):7.1f} ms   p99 {percentile(v, 99):7.1f} ms   mean {statistics.mean(v):7.1f} ms")
    r = ms["HTTP, cotd's router, student"]
    for name, base in (("the student behind Ray Serve LLM's own OpenAI ingress", ms["HTTP, Ray Serve LLM's ingress, student"]),
                       ("a handle call (no HTTP)", ms["handle call to the student deployment"])):
        med, (lo, hi) = paired_median(r, base)
        print(f"router overhead against {name}: p50 {percentile(r, 50) - percentile(base, 50):.1f} ms, "
              f"p99 {percentile(r, 99) - percentile(base, 99):.1f} ms; median of the paired differences "
              f"{med:.1f} ms [{lo:.1f}, {hi:.1f}]   target p50 <= 5 ms")
    inside = inside[args.warmup:]
    print(f"  of which in the router's own code: p50 {percentile(inside, 50):.2f} ms, p99 {percentile(inside, 99):.2f} ms "
          "(the rest: the HTTP proxy and the extra Serve hop)")


def load(args) -> None:
    import httpx
    import ray

    up(args)
    body = {"model": "cotd-hybrid", "messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 8}
    stats = {"ok": 0, "errors": {}, "latency": [], "hung": 0, "by": {}}
    deadline = time.time() + args.seconds
    killed = {"at": None, "back": None}

    async def client(c: httpx.AsyncClient):
        while time.time() < deadline:
            t0 = time.perf_counter()
            try:
                r = await c.post(f"http://127.0.0.1:{PORT}/v1/chat/completions", json=body)
                if r.status_code == 200:
                    stats["ok"] += 1
                    stats["latency"].append(1000 * (time.perf_counter() - t0))
                    meta = r.json()["cotd"]
                    how = f"{meta['answered_by']} ({meta['reason']})"
                    stats["by"][how] = stats["by"].get(how, 0) + 1
                else:
                    stats["errors"][str(r.status_code)] = stats["errors"].get(str(r.status_code), 0) + 1
            except httpx.TimeoutException:
                stats["hung"] += 1
            except httpx.HTTPError as e:
                stats["errors"][type(e).__name__] = stats["errors"].get(type(e).__name__, 0) + 1

    async def killer():
        if args.kill_at is None:
            return
        await asyncio.sleep(args.kill_at)
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith("SERVE_REPLICA") and "student" in a["name"]]
        if names:
            ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=False)
            killed["at"] = time.time()
            print(f"killed replica {names[0]}", flush=True)

    async def main():
        async with httpx.AsyncClient(timeout=args.timeout) as c:
            await asyncio.gather(killer(), *(client(c) for _ in range(args.concurrency)))

    t0 = time.time()
    asyncio.run(main())
    wall = time.time() - t0
    lat = stats["latency"]
    print(f"{args.concurrency} concurrent clients for {args.seconds} s: {stats['ok']} answered ({stats['ok'] / wall:.2f} req/s), "
          f"errors {stats['errors'] or 0}, hung (no answer within {args.timeout} s) {stats['hung']}")
    print("answered by: " + ", ".join(f"{how} {n}" for how, n in sorted(stats["by"].items())))
    if lat:
        print(f"latency p50 {percentile(lat, 50):.0f} ms, p90 {percentile(lat, 90):.0f} ms, p99 {percentile(lat, 99):.0f} ms")
    if killed["at"]:
        from ray import serve

        status = serve.status().applications["cotd-bench"].deployments
        print("deployments after the test: " + ", ".join(f"{n}: {d.status.value} ({d.replica_states})" for n, d in status.items()))


def quality(args) -> None:
    from jobs.common.runs import read_dataset
    from jobs.evaluate.report import fmt_diff
    from serve.calibrate import cost_quality

    cq = cost_quality(read_dataset(args.items).to_pylist(), target_share=args.target_share)
    print(f"{cq['n']} held-out problems: student {cq['student_accuracy']:.1%}, teacher {cq['teacher_accuracy']:.1%}; "
          f"thresholds calibrated to {args.target_share:.0%} of the teacher on one half, measured on the other")
    print(f"{'policy':<22}{'accuracy':>10}{'share of teacher [95% interval]':>33}{'escalated':>11}")
    for name, p in cq["policies"].items():
        if p["accuracy"] is None:
            continue
        share, ci = p["share_of_teacher"], p["share_ci"]
        cell = "-" if share is None else f"{share:.1%}" + (f" [{ci[0]:.1%}, {ci[1]:.1%}]" if ci else "")
        part = "" if p["n"] == cq["n"] else f"  (on {p['n']} of the {cq['n']}: one half's floor is out of its reach)"
        print(f"{name:<22}{p['accuracy']:>10.1%}{cell:>33}{p['escalated']:>11.1%}{part}")
    for signal, c in cq["curves"].items():
        f, best = c["escalation_for_share"], c["best"]
        apgr = "-" if c["apgr"] is None else f"{c['apgr']:.3f}"
        print(f"{signal} (the student's {c['student_answer']} answer, {c['student_accuracy']:.1%}): APGR {apgr}; "
              "escalation for 50/80/95% of the teacher's quality: "
              + " / ".join("-" if f[k] is None else f"{f[k]:.0%}" for k in ("0.5", "0.8", "0.95"))
              + f"; best point {best['accuracy']:.1%} with {best['rate']:.0%} escalated")
        if not c["apgr_reliable"]:
            print(f"  the teacher leads that answer by {fmt_diff(c['gap'])}: APGR divides by this gap, whose interval "
                  "reaches zero")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for signal, c in cq["curves"].items():
            ax.plot([p["rate"] for p in c["escalation"]], [p["accuracy"] for p in c["escalation"]], "-", label=f"confidence: {signal}")
        for name, p in cq["policies"].items():
            if p["accuracy"] is not None:
                ax.plot([p["escalated"]], [p["accuracy"]], "o", label=name)
        ax.set(xlabel="share of queries answered by the teacher", ylabel="accuracy on held-out problems",
               title="cost-quality of the router's policies")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=90)
        print(f"plot: {args.plot}")


def share(text: str) -> float | str:
    return text if text == "auto" else float(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="bench", required=True)
    for name in ("overhead", "load"):
        p = sub.add_parser(name)
        p.add_argument("--student", required=True, help="a cotd train run directory")
        p.add_argument("--teacher", required=True, help="a model reference")
        p.add_argument("--replicas", type=int, default=1, help="student replicas")
        # on a CPU, the fraction of RAM an engine may use (weights, activations and KV cache): a
        # 135M model fits in 0.1 of 24 GiB, a 0.5B student with its LoRA adapter needs about 0.2
        p.add_argument("--memory", type=share, default="auto", help="the student engine's memory share (auto: sized from it)")
        p.add_argument("--teacher-memory", type=share, default="auto", help="the teacher engine's memory share")
    sub.choices["overhead"].add_argument("--requests", type=int, default=200)
    sub.choices["overhead"].add_argument("--warmup", type=int, default=20)
    lp = sub.choices["load"]
    lp.add_argument("--concurrency", type=int, default=8)
    lp.add_argument("--seconds", type=float, default=60)
    lp.add_argument("--timeout", type=float, default=120, help="a request with no answer by then counts as hung")
    lp.add_argument("--student-timeout", type=float, default=60.0,
                    help="student.timeout_s: a query whose student has not answered by then goes to the teacher")
    lp.add_argument("--kill-at", type=float, help="kill one student replica this many seconds in")
    q = sub.add_parser("quality")
    q.add_argument("--items", required=True, help="an evaluation's items/ folder")
    q.add_argument("--target-share", type=float, default=0.95)
    q.add_argument("--plot", help="where to save the cost-quality plot (PNG)")
    args = ap.parse_args()
    {"overhead": overhead, "load": load, "quality": quality}[args.bench](args)


if __name__ == "__main__":
    main()
