"""MFU's numerator: the FLOPs a training step needs, counted from the model's shapes."""

from __future__ import annotations

import pytest

from jobs.train.flops import StepFlops, example_lengths, peak_flops


def tiny(tied: bool):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))


# per layer: q, o (32x32), k, v (32x16: 2 of 4 heads), gate, up, down (32x64); the head 100x32
LAYERS = 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64)
HEAD = 100 * 32


@pytest.mark.parametrize("tied", [True, False])
def test_full_fine_tuning_costs_six_flops_per_linear_weight_and_token(tied):
    flops = StepFlops(tiny(tied))
    assert flops.per_token == 6 * LAYERS  # the embedding lookup costs nothing, tied or not
    assert flops.per_label == 6 * HEAD  # the output head: only where a token carries a loss
    # attention: 6 x layers x heads x head_dim per squared example length (causal half, fwd + bwd)
    assert flops([10, 3], 5) == 6 * LAYERS * 13 + 6 * HEAD * 5 + 6 * 2 * 32 * (100 + 9)


def test_lora_counts_no_gradient_for_frozen_weights():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny(True), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    lora = 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)  # A and B of q and v in both layers
    assert StepFlops(model).per_token == 4 * (LAYERS + lora) + 2 * lora
    assert StepFlops(model).per_label == 4 * HEAD  # frozen


def test_zero3_partitioned_weights_count_at_full_size():
    import torch

    model = tiny(True)
    expected = StepFlops(model).per_token, StepFlops(model).per_label
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):  # what ZeRO-3 leaves on a rank: an empty tensor, the size aside
            m.weight.ds_numel = m.weight.numel()
            m.weight.data = torch.empty(0)
    assert (StepFlops(model).per_token, StepFlops(model).per_label) == expected


def test_example_lengths_split_at_restarting_positions():
    assert example_lengths([0, 1, 2, 0, 1, 0]) == [3, 2, 1]
    assert example_lengths(range(5)) == [5]


def test_peak_is_known_by_device_name():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Some Future Accelerator") is None
