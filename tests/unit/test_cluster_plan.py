"""Resource planning on tables of real model sizes, and a job that does not fit refused with reasons."""

from __future__ import annotations

import json

import pytest

from jobs.cluster.plan import GPUType, PlanError, check_cluster, min_tensor_parallel, param_count, teacher_replica, training_worker

H100, A10 = GPUType("H100-80GB", 80), GPUType("A10G-24GB", 24)
# parameter counts of the models as published (Qwen2.5-7B-Instruct 7.62B, Llama-3-70B 70.6B, Qwen2.5-1.5B 1.54B)
QWEN7B, LLAMA70B, QWEN1_5B = 7.62e9, 70.6e9, 1.54e9


def test_param_count_from_a_real_config():
    qwen1_5b = {"hidden_size": 1536, "num_hidden_layers": 28, "vocab_size": 151936, "intermediate_size": 8960,
                "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": True}
    assert param_count(qwen1_5b) == pytest.approx(QWEN1_5B, rel=0.02)


def test_a_7b_teacher_fits_one_80gb_gpu():
    need = teacher_replica(QWEN7B, 1, H100)
    assert need.gpus == 1 and need.gpu_memory_gib <= 80 * 0.9 + 1e-9
    assert "KV cache" in need.notes and float(need.notes.split()[0]) > 40


def test_a_70b_teacher_needs_tensor_parallelism():
    need = teacher_replica(LLAMA70B, 4, H100)
    assert need.gpus == 4 and need.cpus == 8
    with pytest.raises(PlanError, match=r"70\.6B parameters need 131\.5 GiB per GPU at tensor parallelism 1.*raise "
                                        r"tensor_parallel_size to 2"):
        teacher_replica(LLAMA70B, 1, H100)
    assert min_tensor_parallel(LLAMA70B, A10) == 8


def test_1_5b_full_fine_tuning_zero3_on_8_x_24gb():
    need = training_worker(QWEN1_5B, "full", 3, 8, A10, hidden=1536, layers=28, micro_batch_tokens=4096,
                           gradient_checkpointing=True)
    assert need.gpus == 1 and need.gpu_memory_gib < 24
    # the same without ZeRO's partitioning holds 16 bytes per parameter on every GPU: does not fit
    with pytest.raises(PlanError, match=r"ZeRO-0 on 8 workers needs .* GiB per GPU .*optimizer 17\.2"):
        training_worker(QWEN1_5B, "full", 0, 8, A10, hidden=1536, layers=28, micro_batch_tokens=4096,
                        gradient_checkpointing=True)


def test_lora_and_offload_lower_the_need():
    full = training_worker(QWEN7B, "full", 3, 8, H100, gradient_checkpointing=True)
    lora = training_worker(QWEN7B, "lora", 2, 8, H100, gradient_checkpointing=True)
    offload = training_worker(QWEN7B, "full", 3, 8, H100, offload_optimizer=True, gradient_checkpointing=True)
    assert offload.gpu_memory_gib < full.gpu_memory_gib and offload.host_memory_gib > full.host_memory_gib
    assert lora.gpu_memory_gib < 40


def test_a_job_the_cluster_cannot_hold_is_refused_before_submission():
    teacher = teacher_replica(LLAMA70B, 4, H100)
    nodes = [{"GPU": 8, "CPU": 64}, {"GPU": 8, "CPU": 64}]
    check_cluster([(teacher, 4)], nodes)  # 16 GPUs in two nodes of 8
    with pytest.raises(PlanError, match="needs 20 GPUs .* the cluster has 16"):
        check_cluster([(teacher, 5)], nodes)
    with pytest.raises(PlanError, match="needs 8 GPUs on one node; the largest node has 4"):
        check_cluster([(teacher_replica(LLAMA70B, 8, A10), 1)], [{"GPU": 4, "CPU": 32}] * 4)


# --- a job against the cluster definitions, before submission --------------------------------------

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]
QWEN7B_CONFIG = {"hidden_size": 3584, "num_hidden_layers": 28, "vocab_size": 152064, "intermediate_size": 18944,
                 "num_attention_heads": 28, "num_key_value_heads": 4}
LLAMA70B_CONFIG = {"hidden_size": 8192, "num_hidden_layers": 80, "vocab_size": 128256, "intermediate_size": 28672,
                   "num_attention_heads": 64, "num_key_value_heads": 8}


def definition(path: str) -> dict:
    import yaml

    return yaml.safe_load((REPO / path).read_text())


def test_node_types_of_the_cluster_definitions_at_their_largest():
    from jobs.cluster.plan import node_types

    aws = {t.name: t for t in node_types(definition("cluster/aws/cotd.yaml"))}
    assert (aws["head"].max_count, aws["head"].gpus, aws["head"].cpus) == (1, 0, 4)
    assert (aws["gpu_teacher"].max_count, aws["gpu_teacher"].gpus, aws["gpu_teacher"].gpu) == (8, 1, GPUType("L40S", 48))
    assert (aws["gpu_train"].max_count, aws["gpu_train"].gpus, aws["gpu_train"].cpus) == (4, 4, 48)
    k8s = {t.name: t for t in node_types(definition("cluster/k8s/raycluster.yaml"))}
    assert (k8s["head"].cpus, k8s["head"].gpus) == (4, 0)               # rayStartParams win over the pod's limits
    assert (k8s["gpu-teacher"].max_count, k8s["gpu-teacher"].gpus, k8s["gpu-teacher"].gpu) == (8, 1, None)
    assert (k8s["gpu-train"].max_count, k8s["gpu-train"].gpus) == (4, 4)
    custom = {"kind": "RayCluster", "spec": {"headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": [
        {"resources": {"limits": {"cpu": "500m"}}}]}}}, "workerGroupSpecs": [{"groupName": "h100", "maxReplicas": 2,
        "rayStartParams": {"num-gpus": "8", "resources": '"{\\"accelerator_type:H100\\": 1}"'},
        "template": {"spec": {"containers": [{"resources": {"limits": {"cpu": "96"}}}]}}}]}}
    head, h100 = node_types(custom)
    assert head.cpus == 0.5 and (h100.gpus, h100.cpus, h100.gpu) == (8, 96, GPUType("H100", 80))
    with pytest.raises(PlanError, match="neither a Ray cluster launcher YAML"):
        node_types({"kind": "Deployment"})


def test_workloads_checked_against_the_aws_cluster():
    from jobs.cluster.plan import Workload, check_workloads, node_types

    types = node_types(definition("cluster/aws/cotd.yaml"))
    lines = check_workloads([Workload("generate", "teacher", 2, param_count(QWEN7B_CONFIG))], types)
    assert lines[0].startswith("generate: 2 x teacher replica, 1 GPU each") and "gpu_teacher, gpu_train" in lines[0]
    # a 70B teacher: tensor parallelism 4 fits only the 4-GPU training nodes, 1 fits none
    seventy = param_count(LLAMA70B_CONFIG)
    assert "on gpu_train" in check_workloads([Workload("generate", "teacher", 1, seventy, 4)], types)[0]
    with pytest.raises(PlanError, match=r"generate: on gpu_teacher \(L40S\): teacher: 70\.\dB parameters .*raise "
                                        r"tensor_parallel_size to 4"):
        check_workloads([Workload("generate", "teacher", 1, seventy, 1)], types)
    with pytest.raises(PlanError, match="a teacher replica needs 8 GPUs on one node; the largest node has 4"):
        check_workloads([Workload("generate", "teacher", 1, seventy, 8)], types)
    with pytest.raises(PlanError, match=r"generate: the job needs 20 GPUs .* the cluster has 16 on the node types .*\(gpu_train\)"):
        check_workloads([Workload("generate", "teacher", 5, seventy, 4)], types)
    # training: 16 workers fit 4 x 4 + 8 x 1 GPUs, 32 do not; unknown size: GPUs counted, memory not
    full = dict(method="full", zero_stage=3, micro_batch_tokens=4096, hidden=1536, layers=28, gradient_checkpointing=True)
    check_workloads([Workload("train", "training", 16, QWEN1_5B, **full)], types)
    with pytest.raises(PlanError, match="train: the job needs 32 GPUs"):
        check_workloads([Workload("train", "training", 32, QWEN1_5B, **full)], types)
    assert "memory not checked: the model's size is unknown here" in check_workloads(
        [Workload("train", "training", 8, None)], types)[0]
    with pytest.raises(PlanError, match="runs on GPUs of type H100, and no node type of the cluster has any"):
        check_workloads([Workload("train", "training", 8, None, accelerator_type="H100")], types)


def test_submit_refuses_a_job_the_cluster_cannot_hold_before_contacting_it(tmp_path):
    import json
    import subprocess
    import sys

    model = tmp_path / "llama70b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA70B_CONFIG))

    def submit(*over):
        return subprocess.run([sys.executable, "-m", "jobs.cli", "submit", "generate", "--config",
                               "configs/generate/gsm8k-qwen7b.yaml", "--cluster", "cluster/aws/cotd.yaml",
                               "--address", "http://127.0.0.1:9", f"teacher.model={model}", *over],
                              cwd=REPO, capture_output=True, text=True, timeout=120)

    refused = submit("teacher.tensor_parallel_size=1")
    assert refused.returncode == 2 and "raise tensor_parallel_size to 4" in refused.stderr, refused.stderr
    assert "no Ray job server" not in refused.stderr          # refused before the cluster was asked
    fits = submit("teacher.tensor_parallel_size=4")
    assert "plan: generate: 2 x teacher replica, 4 GPUs each" in fits.stdout, fits.stdout + fits.stderr  # concurrency [2, 8]
    assert fits.returncode == 2 and "no Ray job server answers there" in fits.stderr   # then the (absent) cluster


def test_model_shape_reads_a_folder_or_the_hubs_config_file_alone(tmp_path, monkeypatch):
    import jobs.common.models as models
    from jobs.cluster.submit import model_shape

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 896, "num_hidden_layers": 24}))
    assert model_shape(str(folder))["hidden_size"] == 896
    asked = []
    hub = tmp_path / "hub-config.json"
    hub.write_text(json.dumps({"hidden_size": 4096}))
    monkeypatch.setattr(models, "hub_file", lambda ref, name: asked.append((ref, name)) or hub)
    assert model_shape("org/model-7b") == {"hidden_size": 4096} and asked == [("org/model-7b", "config.json")]
    hub.write_text("not json")
    assert model_shape("org/model-7b") is None                     # unreadable: the memory goes unchecked
    monkeypatch.setattr(models, "hub_file", lambda ref, name: None)
    assert model_shape("org/model-7b") is None                     # offline
    assert model_shape(str(tmp_path / "missing")) is None and len(asked) == 2   # a missing folder is not a hub id
