"""Training on a CUDA GPU: packed micro-batches go through PyTorch's varlen flash-attention kernel
(one launch per layer) and give the loss and gradients that padded batches give. The CPU path of
the same attention (sdpa per example) is covered by tests/unit/test_train_data.py."""

from __future__ import annotations

import pytest
import torch

from jobs.train import attention
from jobs.train.data import collate, collate_packed, example_sequence, model_inputs, pack
from jobs.train.loss import weighted_loss_sum

pytestmark = pytest.mark.gpu


def model(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # grouped-query attention
    cfg._attn_implementation = attention.register()
    return LlamaForCausalLM(cfg).to("cuda", dtype)


def batches(lengths):
    g = torch.Generator().manual_seed(1)
    items = [example_sequence(ids, [-100] * 2 + ids[2:], 1.0)
             for ids in (torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths)]
    on_gpu = lambda b: {k: v.cuda() if hasattr(v, "cuda") else v for k, v in b.items()}  # noqa: E731
    return on_gpu(collate(items, pad_id=0)), on_gpu(collate_packed(pack(items, max_len=256)))


def loss_and_grad(m, b):
    m.zero_grad()
    loss = weighted_loss_sum(m(**model_inputs(b)).logits, b["labels"], b["weights"]) / b["weights"][:, 1:].sum()
    loss.backward()
    return loss.item(), torch.cat([p.grad.float().flatten() for p in m.parameters()])


def test_packed_bf16_uses_flash_varlen_and_matches_padded(monkeypatch):
    assert attention._flash_varlen() is not None, "this torch has no torch.nn.attention.varlen"
    calls = []
    flash = attention._flash
    monkeypatch.setattr(attention, "_flash", lambda *a: calls.append(1) or flash(*a))
    padded, packed = batches([37, 120, 5, 64, 90])
    reference = loss_and_grad(model(torch.float32), padded)  # fp32: sdpa with the padding mask
    got = loss_and_grad(model(torch.bfloat16), packed)
    assert len(calls) == 2  # one launch per layer for the whole packed row
    assert got[0] == pytest.approx(reference[0], rel=2e-2)
    cos = torch.nn.functional.cosine_similarity(got[1], reference[1], dim=0).item()
    assert cos > 0.99, cos
