"""Resource planning on tables of real model sizes, and a job that does not fit refused with reasons."""

from __future__ import annotations

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
