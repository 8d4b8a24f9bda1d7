"""The demo's generation (configs/generate/quickstart.yaml: 24 problems x 4 paths of the packaged
0.5B teacher) before and after cotd's CPU thread binding, back to back in one run.

Run as:
    .venv/bin/python infra/bench/demo_generation.py              # before, then after
    .venv/bin/python infra/bench/demo_generation.py --repeat 2   # two pairs, medians

`before` is the demo as it was configured before the change: vLLM's own CPU binding (one core kept
for the engine's scheduler, `teacher.cpu_binding=vllm`) and engine batches of 32 rows; `after` is
the config as it is now. Each side is `python -m jobs.generate` in its own process with its output
to a pipe, as in CI or `ray job logs`, timed end to end (Ray start-up and the engine's start
included). The bench also reports when the first progress line came and when the first rows were
counted, from the lines as they arrived. The target is a speedup of at least 1.4.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "generate" / "quickstart.yaml"
BEFORE = ["teacher.cpu_binding=vllm", "teacher.batch_size=32", "teacher.max_concurrent_batches=4"]


def run_side(overrides: list[str], out_dir: Path) -> dict:
    """One generation run in a child process; the times at which its lines arrived."""
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    cmd = [sys.executable, "-m", "jobs.generate", "--config", str(CONFIG), f"out_dir={out_dir}", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    proc.wait()
    reader.join(timeout=5)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"generation failed (exit {proc.returncode}):\n" + "\n".join(line for _, line in lines[-20:]))
    progress = [(t, line) for t, line in lines if line.startswith("[generate] ")]
    counted = [(t, line) for t, line in progress if not line.startswith("[generate] 0/")]
    return {"seconds": seconds, "progress_lines": len(progress),
            "first_progress_s": progress[0][0] if progress else None,
            "first_rows_s": counted[0][0] if counted else None,
            "row_updates": len({line.split(" ")[1] for _, line in counted})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=1, help="pairs of runs, back to back; medians are reported")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from jobs.common.engine import cpu_has_native_bf16, physical_cores

    print(f"machine: {platform.machine()}, {physical_cores()} cores, native bf16: {cpu_has_native_bf16()}; "
          f"config {CONFIG.relative_to(REPO)}; before: {' '.join(BEFORE)}")
    speedups = []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            before = run_side(BEFORE, Path(tmp) / "before")
            after = run_side([], Path(tmp) / "after")
        speedups.append(before["seconds"] / after["seconds"])
        print(f"pair {i + 1}/{args.repeat}:")
        for name, r in (("before", before), ("after ", after)):
            print(f"  {name}: {r['seconds']:6.1f} s end to end; {r['progress_lines']} progress lines, the first at "
                  f"{r['first_progress_s']:.0f} s; first rows counted at {r['first_rows_s']:.0f} s; "
                  f"{r['row_updates']} distinct row counts", flush=True)
        print(f"  speedup: {speedups[-1]:.3f}", flush=True)
    extra = f" (pairs {', '.join(f'{s:.3f}' for s in speedups)})" if len(speedups) > 1 else ""
    print(f"demo generation speedup, after / before{', median' if len(speedups) > 1 else ''}: "
          f"{statistics.median(speedups):.3f}{extra}   target >= 1.4")


if __name__ == "__main__":
    main()
