"""`compile: true` compiles each decoder layer in place: the same loss and gradients as eager, and
the same state dict keys (checkpoints, resume and export do not change)."""

from __future__ import annotations

import shutil

import pytest
import torch

from jobs.common.config import build
from jobs.train.config import TrainConfig
from jobs.train.data import collate, example_sequence, model_inputs
from jobs.train.loss import weighted_loss_sum
from jobs.train.loop import build_model

pytestmark = pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                                reason="torch.compile on CPU needs a C++ compiler")


def test_compiled_layers_train_as_eager_ones(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    batch = collate([example_sequence(list(range(1, n + 1)), [-100] * 2 + list(range(3, n + 1)), 1.0)
                     for n in (6, 11, 4)], pad_id=0)
    results = []
    for compile in (False, True):
        cfg = build(TrainConfig, {"data": "-", "out_dir": "-", "model": "-", "method": "full", "packing": False,
                                  "compile": compile})
        model = build_model(cfg, str(tmp_path), torch.float32)
        loss = weighted_loss_sum(model(**model_inputs(batch)).logits, batch["labels"], batch["weights"])
        loss.backward()
        layers = [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()], list(model.state_dict()),
                        [m._compiled_call_impl is not None for m in layers]))
    (eager, eager_grads, eager_keys, eager_compiled), (compiled, grads, keys, compiled_layers) = results
    assert compiled_layers == [True, True] and eager_compiled == [False, False]
    assert keys == eager_keys
    assert compiled == pytest.approx(eager, rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(grads, eager_grads))
