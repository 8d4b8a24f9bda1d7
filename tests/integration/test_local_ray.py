"""The local Ray cluster cotd starts: its worker pool stays small, so idle Ray processes do not take
CPU from the teacher engine on a small machine."""

from __future__ import annotations

import os
import time
from pathlib import Path

from jobs.common.raycluster import LOCAL_IDLE_WORKERS


def _idle(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::IDLE")
    except FileNotFoundError:
        return False


def test_local_cluster_keeps_at_most_a_few_idle_workers(ray_session):
    import ray

    @ray.remote(num_cpus=1)
    def hold(seconds: float) -> int:
        time.sleep(seconds)
        return os.getpid()

    workers = set(ray.get([hold.remote(2.0) for _ in range(6)]))
    assert len(workers) > LOCAL_IDLE_WORKERS, f"six concurrent tasks ran on only {len(workers)} workers"
    deadline = time.monotonic() + 30
    idle = [p for p in workers if _idle(p)]
    while len(idle) > LOCAL_IDLE_WORKERS and time.monotonic() < deadline:
        time.sleep(0.5)
        idle = [p for p in workers if _idle(p)]
    assert len(idle) <= LOCAL_IDLE_WORKERS, f"{len(idle)} of the tasks' workers are still idle: {sorted(idle)}"
