"""Autoscaling on a real multi-node Ray cluster on this machine: a head node and worker nodes, each
`ray start` on loopback, each worker node pinned to one core as a machine of its own would be
(the first on core 0, the later ones on core 1). The teacher's replicas reserve a resource only
the worker nodes have (teacher.replica_resources), so each replica needs a worker node of its own.
A generation job submitted with teacher.concurrency [1, 3] starts its first replica on the one
worker node; a second node joins while it runs, the replica count grows onto it (the third
replica Ray Data asks for waits for a node), and the job finishes with every chain exactly once.
Beside that cluster, a local cotd run starts a Ray of its own instead of joining it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from jobs.common.runs import read_dataset
from shared import cotd, cotd_start, ray_node, stop_node, wait_for_dashboard, wait_until

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
# ports apart from the session's local Ray and the Jobs API test's head node
GCS_PORT, DASHBOARD_PORT, AGENT_PORT = 6393, 8273, 52401
RESOURCE = "cotd_teacher"
PROBLEMS, PATHS = 75, 4


def replicas(url: str) -> list[tuple[str | None, str]]:
    """(node, state) of each teacher replica Ray Data has started (the actors that reserve
    RESOURCE), alive or still starting (node None until it is placed)."""
    from ray.util.state import list_actors

    live = list_actors(address=url, filters=[("state", "!=", "DEAD")], limit=1000, detail=True,
                       raise_on_missing_output=False)
    return [(a.node_id, a.state) for a in live if RESOURCE in (a.required_resources or {})]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node (no teacher resource) and a function that adds a worker node with one."""
    temp = tmp_path_factory.mktemp("ray-multi")
    # the worker nodes' temp dirs short: a node's socket paths must fit in 107 bytes
    short = Path(tempfile.mkdtemp(prefix="cotd-ray-", dir="/tmp"))
    head = ray_node("--head", f"--port={GCS_PORT}", f"--dashboard-port={DASHBOARD_PORT}", "--include-dashboard=true",
                    "--num-cpus=2", f"--dashboard-agent-listen-port={AGENT_PORT}", temp=temp)
    nodes = [head]

    def add_worker() -> None:
        # each node a temp dir of its own: nodes of one machine sharing one would unpack the job's
        # working directory over each other (and under the driver, which runs in it). Each node on
        # a core of its own, as a machine of its own: the first on core 0, the later ones on core 1
        # (on one shared pool of 2 cores, a busy engine and vLLM's polling starve the next
        # replica's engine start for minutes)
        port = AGENT_PORT + 10 * len(nodes)
        cores = "0" if len(nodes) == 1 else str(min(1, (os.cpu_count() or 1) - 1))
        nodes.append(ray_node(f"--address=127.0.0.1:{GCS_PORT}", "--num-cpus=2",
                              f"--resources={json.dumps({RESOURCE: 1})}", f"--dashboard-agent-listen-port={port}",
                              temp=short / str(len(nodes)), cores=cores))

    url = f"http://127.0.0.1:{DASHBOARD_PORT}"
    try:
        wait_for_dashboard(url, head)
        yield url, add_worker, nodes
    finally:
        for node in nodes[::-1]:  # the worker nodes, then the head
            stop_node(node)
        # the worker nodes' logs kept beside the test's (pytest keeps its last runs' folders)
        for logs in short.glob("*/session_latest/logs"):
            shutil.copytree(logs, temp / f"worker-{logs.parents[1].name}-logs", dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.sock", "events"))
        shutil.rmtree(short, ignore_errors=True)


def live_nodes(url: str) -> int:
    from ray.util.state import list_nodes

    return sum(n.state == "ALIVE" for n in list_nodes(address=url, raise_on_missing_output=False))


def test_teacher_replicas_grow_as_nodes_join(cluster, tiny_model, tmp_path):
    url, add_worker, _ = cluster
    add_worker()
    wait_until(lambda: live_nodes(url) == 2, 120, "the first worker node did not join")

    out = tmp_path / "gen"
    sources = json.dumps([{"type": "reasoning_gym", "tasks": [{"name": "basic_arithmetic", "size": PROBLEMS, "seed": 5}]}])
    # batches of 2 rows, one in flight per replica: 150 batches wait, far more than one replica's share
    # (Ray Data adds a replica while more than 1.75 x max_concurrent_batches tasks wait on each), and
    # enough that a replica added once the node joins (its engine starts in 30-60 s here) has work
    # left. One node joins, not two: two engines starting on the one core left would each start late
    args = ["submit", "generate", "--config", "configs/generate/quickstart.yaml", "--address", url, "--follow",
            f"out_dir={out}", f"teacher.model={tiny_model}", f"sources={sources}", f"paths_per_problem={PATHS}",
            "teacher.concurrency=[1, 3]", f"teacher.replica_resources={{{RESOURCE}: 1}}", "teacher.batch_size=2",
            "teacher.max_concurrent_batches=1", "teacher.gpu_memory_utilization=0.05", "sampling.max_tokens=48",
            "sampling.extra={ignore_eos: true}", "prompt.few_shot=0"]
    log = (tmp_path / "job.log").open("w")
    job = cotd_start(*args, log=log)
    seen: list[tuple[float, int, int, str]] = []   # (seconds, replicas started, on how many nodes, their states)
    joined = None                              # samples taken before the second node joined
    nodes = 0
    started = time.time()
    while job.poll() is None and time.time() - started < 900:
        on = replicas(url)
        states = ",".join(sorted(state for _, state in on))
        seen.append((round(time.time() - started, 1), len(on), len({n for n, state in on if n and state == "ALIVE"}), states))
        if joined is None and any(n for n, _ in on):
            joined = len(seen)  # the first replica is placed on the first worker node: a second joins
            add_worker()
        if joined is not None and nodes < 3:
            nodes = live_nodes(url)
        time.sleep(1)
    job.wait(timeout=60)
    log.close()
    output = (tmp_path / "job.log").read_text()
    assert job.returncode == 0, output[-4000:]

    print(f"replicas (seconds, started, on nodes): {seen}; a node joined after sample {joined}; nodes {nodes}")
    assert joined is not None and nodes == 3, f"the second worker node did not join ({nodes} alive): {seen}"
    # before the node joined, one replica ran (Ray Data may already ask for a second, which waits
    # for a node: PENDING_CREATION, on none)
    before, after = [k for _, _, k, _ in seen[:joined]], [n for _, n, _, _ in seen[joined:]]
    assert before and max(before) <= 1, f"replicas running before the nodes joined: {seen}"
    assert after and max(after) >= 2, f"the teacher's replicas did not grow as the node joined: {seen}"
    # and a second one came up on another node (a replica's node shows once its engine has started)
    assert max(k for _, _, k, _ in seen) >= 2, f"the replicas never ran on more than one node: {seen}"
    chains = read_dataset(out / "chains", columns=["problem_id", "path_index", "chain"]).to_pylist()
    keys = [(r["problem_id"], r["path_index"]) for r in chains]
    assert len(keys) == PROBLEMS * PATHS and len(set(keys)) == len(keys), "chains lost or duplicated"
    assert all(r["chain"] for r in chains)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["summary"]["chains"] == PROBLEMS * PATHS


def test_a_local_run_starts_its_own_ray_beside_another_cluster(cluster):
    """With another Ray running on the machine, a run without an address starts a local Ray of its
    own (a bare ray.init() would join the other and refuse num_cpus)."""
    code = ("from jobs.common.raycluster import RayConfig, init_ray; import ray; "
            "print(init_ray(RayConfig(num_cpus=1), log=lambda *_: None)); print('nodes', len(ray.nodes()))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "local Ray (1 logical CPUs" in done.stdout and "nodes 1" in done.stdout, done.stdout
    assert cotd("jobs", "list", "--address", cluster[0]).returncode == 0  # the other cluster still answers


def test_training_workers_are_placed_on_the_nodes_that_have_room(cluster, curated, tiny_model, tmp_path):
    """Each training worker reserves the worker nodes' resource (scaling.worker_resources), of which
    each node has one: Ray Train places the two workers on two of the nodes, and the job finishes."""
    from ray.util.state import list_actors

    url, add_worker, nodes = cluster
    while len(nodes) < 3:  # alone, this test adds the two worker nodes the generation test leaves
        add_worker()
    wait_until(lambda: live_nodes(url) >= len(nodes), 120, "the worker nodes did not join")
    out = tmp_path / "student"
    done = cotd("submit", "train", "--config", "configs/train/quickstart.yaml", "--address", url, "--follow",
                f"data={curated}", f"model={tiny_model}", f"out_dir={out}", "precision=fp32", "max_seq_len=256",
                "max_steps=2", "eval_every=0", "save_every=100",
                f"scaling.worker_resources={{{RESOURCE}: 1}}", timeout=900)
    (tmp_path / "job.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "train" and manifest["final"]["step"] >= 1 and (out / "merged" / "config.json").is_file()
    # a worker's resources are its placement group bundle's: RESOURCE renamed cotd_teacher_group_...
    workers = [a for a in list_actors(address=url, detail=True, limit=10_000, raise_on_missing_output=False)
               if a.class_name.endswith("RayTrainWorker") and any(k.startswith(RESOURCE) for k in a.required_resources or {})]
    assert len(workers) == 2, f"training workers holding {RESOURCE}: {workers}"
    assert len({a.node_id for a in workers}) == 2, "the two workers did not run on two nodes"
