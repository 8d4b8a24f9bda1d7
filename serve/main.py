"""Serve the student and the teacher behind one OpenAI-compatible endpoint, or calibrate its router.

Run as:
    cotd serve --config configs/serve/quickstart.yaml student=runs/q1/student teacher=qwen2.5-coder-1.5b-instruct
    cotd serve calibrate --items runs/q1/eval/items --out runs/q1/router.json --target-share 0.95
    serve deploy serve/hybrid.yaml          # the same application on a cluster, from a Serve config file

`cotd serve` checks the config and the models, starts (or joins) Ray, runs the application under
Ray Serve and waits; Ctrl-C stops it. `calibrate` fits the router's thresholds and its learned
model on an evaluation's per-item results (`cotd eval` writes them to <eval>/items).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from jobs.common.progress import emit
from serve.config import ServeConfig


def start(cfg: ServeConfig, log=emit, blocking: bool = True) -> str:
    """Run the application; returns its base URL (and with `blocking`, waits until Ctrl-C)."""
    from ray import serve

    from jobs.common.raycluster import init_ray
    from serve.app import build_app

    # Ray first: building the deployments touches Ray, which would otherwise start a default local
    # instance with one CPU per core, too few on a small machine for the student, teacher and router
    init_ray(cfg.ray, log=log)
    app = build_app(cfg, log)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    log(f"starting {cfg.name}: student, teacher and router deployments (the first start loads both engines)")
    try:
        serve.run(app, name=cfg.name, route_prefix="/", blocking=False)
    except RuntimeError as e:
        raise deploy_error(e, cfg, log) from None
    wait_healthy(f"http://{'127.0.0.1' if cfg.host == '0.0.0.0' else cfg.host}:{cfg.port}/health")
    url = f"http://{cfg.host}:{cfg.port}/v1"
    log(f"serving at {url} (models cotd-hybrid, cotd-student, cotd-teacher); Ctrl-C stops it")
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return url


def deploy_error(error: RuntimeError, cfg: ServeConfig, log) -> Exception:
    """What to tell the user when Serve could not deploy the application: a model deployment on a
    CPU whose vLLM engine did not start gets the memory-share error of jobs.common.engine (Serve
    retries the replica, then names the deployment; vLLM's reason is in the log above). Any other
    failure is returned as it is."""
    from jobs.common.engine import engine_dtype, engine_start_error
    from serve.app import deployment_prefix, engine_config, resolve_spec

    for role in ("student", "teacher"):
        spec = getattr(cfg, role)
        if spec.base_url is None and spec.scaling.gpus == 0 and f"'{deployment_prefix(role)}" in str(error):
            path = resolve_spec(spec, log)["path"]
            mc, _ = engine_config(spec, path)
            return engine_start_error(f"serve: the {role}'s deployment", f"{role}.gpu_memory_utilization",
                                      spec.model or spec.run, path, engine_dtype(mc), mc.gpu_memory_utilization)
    return error


def wait_healthy(url: str, timeout_s: float = 600) -> None:
    """Until the router answers its health check (Serve's proxy may take a moment after the
    deployments are up)."""
    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the application did not answer {url} within {timeout_s:.0f}s")


def main(cfg: ServeConfig, log=emit) -> dict[str, Any]:
    return {"url": start(cfg, log=log)}


def calibrate_items(items_dir: Path, out: Path, share: float | None = 0.95, budget: float | None = None,
                    student: str = "student", teacher: str = "teacher", log=emit,
                    accuracy: float | None = None) -> dict[str, Any]:
    """Fit the router on an evaluation's items (thresholds per signal, the learned router, the
    cost-quality points) and write router.json; returns it. `cotd serve calibrate` and `cotd run`."""
    from jobs.common.errors import DataError
    from jobs.common.runs import check_dataset, read_dataset, write_json
    from jobs.common.schemas import ITEM_SCHEMA
    from serve.calibrate import calibrate, cost_quality

    check_dataset(items_dir, ITEM_SCHEMA.names, "--items", "cotd eval")
    items = read_dataset(items_dir).to_pylist()
    try:
        cal = calibrate(items, share, budget, student, teacher, accuracy)
    except ValueError as e:
        raise DataError(f"--items {items_dir}: {e}") from None
    cal["cost_quality"] = cost_quality(items, share or 0.95, student, teacher)
    write_json(out, cal)
    log(f"calibrated on {cal['n']} held-out problems: student {cal['student_accuracy']:.1%}, teacher "
        f"{cal['teacher_accuracy']:.1%}")
    for warning in cal["warnings"]:
        log(f"warning: {warning}")
    if cal["unreached"]:
        log(f"  no threshold reaches accuracy {cal['target']['floor']:.1%} for {', '.join(cal['unreached'])}"
            " (the teacher's answers and the student's together do not get there): not calibrated")
    vote = f" (the student answers with the vote of {cal['samples']} samples: set policy.samples={cal['samples']})"
    for signal, t in cal["thresholds"].items():
        log(f"  {signal}: escalate below {t['threshold']:.4f} -> {t['rate']:.1%} escalated, accuracy {t['accuracy']:.1%}"
            + (vote if signal == "agreement" else ""))
    if cal["learned"]:
        l = cal["learned"]
        log(f"  learned: escalate below P(right) {l['threshold']:.4f} -> {l['rate']:.1%} escalated, accuracy {l['accuracy']:.1%}"
            + (vote if l["samples"] else ""))
    return cal


def calibrate_main(argv: list[str], log=emit) -> int:
    """`cotd serve calibrate`: thresholds and the learned router from an evaluation's items."""
    from jobs.common.errors import DataError

    ap = argparse.ArgumentParser(prog="cotd serve calibrate", description=calibrate_main.__doc__)
    ap.add_argument("--items", required=True, help="the items/ folder `cotd eval` wrote")
    ap.add_argument("--out", required=True, help="where to write router.json")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--target-share", type=float,
                       help="reach this share of the teacher's accuracy (default 0.95; above 1 where the student "
                            "is right on problems the teacher is not, and the router can beat the teacher)")
    group.add_argument("--accuracy", type=float, help="reach this accuracy (an absolute floor, 0-1)")
    group.add_argument("--budget", type=float, help="escalate at most this share of queries")
    ap.add_argument("--student", default="student")
    ap.add_argument("--teacher", default="teacher")
    args = ap.parse_args(argv)
    chosen = args.budget is not None or args.accuracy is not None
    share = args.target_share if args.target_share is not None or chosen else 0.95
    if share is not None and not 0 < share:
        raise DataError(f"--target-share must be above 0, got {share}")
    if args.budget is not None and not 0 < args.budget <= 1:
        raise DataError(f"--budget must be in (0, 1], got {args.budget}")
    if args.accuracy is not None and not 0 < args.accuracy <= 1:
        raise DataError(f"--accuracy must be in (0, 1], got {args.accuracy}")
    calibrate_items(Path(args.items), Path(args.out), share, args.budget, args.student, args.teacher, log=log,
                    accuracy=args.accuracy)
    log(f"router: {args.out}")
    return 0
