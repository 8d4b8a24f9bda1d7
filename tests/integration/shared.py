"""What the integration tests share: a synthetic curated set and a training config for the 2-layer
test model (the fixtures that train its students once per session are in conftest.py), and dotted
config overrides."""

from __future__ import annotations

import json

from jobs.common.config import build
from jobs.train.config import TrainConfig

# the LoRA run the export, resume and evaluation tests share (2 workers, ZeRO-2)
LORA = {"zero": {"stage": 2}, "val_accuracy_samples": 4, "val_accuracy_max_tokens": 16}


def dotted(data: dict, over: dict) -> dict:
    """`data` with `over`'s dotted keys (teacher.batch_size=...) set in place."""
    for key, value in over.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return data


def example(i: int, kind: str) -> dict:
    a, b = i % 9 + 1, i % 7 + 2
    if kind == "general":
        messages = [{"role": "user", "content": f"Spell 'cat{i}' backward."}, {"role": "assistant", "content": f"{i}tac"}]
    else:
        messages = [{"role": "system", "content": "Solve the problem step by step. End with 'Answer: <final answer>'."},
                    {"role": "user", "content": f"What is {a} + {b} times 2?"},
                    {"role": "assistant", "content": f"Step 1: {b} times 2 is {2 * b}.\nStep 2: {a} plus {2 * b} is {a + 2 * b}.\nAnswer: {a + 2 * b}"}]
    return {"example_id": f"{kind}{i}", "kind": kind, "problem_id": f"p{i}", "path_index": 0, "category": "math",
            "difficulty": "default", "format": "pre", "num_steps": 2, "messages": json.dumps(messages),
            "gold_answer": messages[-1]["content"].rsplit(" ", 1)[-1], "verifier": "exact", "metadata": "{}"}


def config(curated, out, model, **over) -> TrainConfig:
    data = {"data": str(curated), "out_dir": str(out), "model": str(model), "precision": "fp32", "max_seq_len": 256,
            "micro_batch_size": 2, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 1, "epochs": 4, "eval_every": 3,
            "save_every": 3, "max_failures": 0, "scaling": {"num_workers": 2}, "lora": {"dropout": 0.0}}
    data.update(over)
    return build(TrainConfig, data)


def command_env(**extra: str) -> dict[str, str]:
    """This process's environment for a command of a test's own, as from a shell with the
    environment activated (its bin first on PATH: a Jobs API entrypoint's `python` is this
    environment's): no Ray token needed, no RAY_ADDRESS inherited (each command chooses its
    cluster), and `extra`."""
    import os
    import sys
    from pathlib import Path

    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "RAY_AUTH_MODE": "disabled", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def _cotd(args):
    """The command line, folder and environment of `cotd ARGS` run from the repository, with no
    RAY_ADDRESS inherited."""
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    return {"args": [sys.executable, "-m", "jobs.cli", *args], "cwd": repo, "env": command_env(PYTHONPATH=str(repo))}


def cotd(*args: str, timeout: float = 600):
    """`cotd ARGS` in a process of its own, waited for; its output captured."""
    import subprocess

    return subprocess.run(**_cotd(args), capture_output=True, text=True, timeout=timeout)


def cotd_start(*args: str, log, group: bool = False):
    """`cotd ARGS` started in a process of its own, its output to the open file `log`; not waited
    for. With `group`, in a process group of its own (a test kills the whole group)."""
    import subprocess

    return subprocess.Popen(**_cotd(args), stdout=log, stderr=subprocess.STDOUT, start_new_session=group)


def ray_node(*args: str, temp=None, cores: str | None = None):
    """`ray start ... --block` in a process group of its own (a node of a test's own cluster, apart
    from the session's local Ray); `stop_node` ends it. Its `python` is this environment's. With
    `cores` (a CPU list such as "1"), the node and every process it starts run on those cores
    alone, as a machine of its own would."""
    import subprocess
    import sys

    env = command_env()
    extra = [f"--temp-dir={temp}"] if temp else []
    pin = ["taskset", "-c", cores] if cores else []
    return subprocess.Popen([*pin, sys.executable, "-m", "ray.scripts.scripts", "start", *args, *extra, "--block",
                             "--disable-usage-stats"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def stop_node(proc) -> None:
    """End a `ray start` node: SIGKILL to its process group (the node's every process; asked with
    SIGTERM, a node takes over 30 s to shut down, which a test's throwaway node need not)."""
    import os
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_until(predicate, seconds: float, what: str, every: float = 1.0):
    """Calls `predicate` until it returns something true (returned) or `seconds` pass (an
    AssertionError saying `what` did not happen). The predicate may assert on the way."""
    import time

    deadline = time.monotonic() + seconds
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"{what} within {seconds:g} s"
        time.sleep(every)
    return value


def wait_for_dashboard(url: str, proc, seconds: float = 180) -> None:
    """Until the head node's dashboard (and its job server) answers; fails if the node ended."""
    import httpx

    def up() -> bool:
        try:
            return httpx.get(f"{url}/api/version", timeout=5).status_code == 200
        except httpx.HTTPError:
            assert proc.poll() is None, "ray start --head ended"
            return False

    wait_until(up, seconds, "the head node's dashboard did not come up")
