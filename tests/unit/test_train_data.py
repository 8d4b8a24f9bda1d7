"""Training data: the loss falls on the answer only, packing keeps examples apart, and the loss is
the same packed or padded (no Ray, no DeepSpeed: a tiny torch model)."""

from __future__ import annotations

import pytest
import torch

from jobs.common.config import ConfigError, build
from jobs.train.config import TrainConfig, deepspeed_config
from jobs.train.data import IGNORE, collate, example_sequence, pack, tokenize_example, weighted_loss_sum

CHAT = [{"role": "system", "content": "Solve it."}, {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "Step 1: Add 2 and 3.\nAnswer: 5"}]


def test_labels_cover_the_answer_only(tokenizer):
    ids, labels, cut = tokenize_example(CHAT, tokenizer, 1024)
    assert not cut and len(ids) == len(labels)
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    assert all(lab == IGNORE for lab in labels[:first]) and labels[first:] == ids[first:]
    answer = tokenizer.decode(ids[first:])
    assert answer.startswith("Step 1: Add 2 and 3.\nAnswer: 5")
    assert "What is 2 + 3?" in tokenizer.decode(ids[:first])
    few_shot = [CHAT[0], CHAT[1], {"role": "assistant", "content": "Answer: 5"}, {"role": "user", "content": "And 4 + 4?"},
                {"role": "assistant", "content": "Answer: 8"}]
    ids, labels, _ = tokenize_example(few_shot, tokenizer, 1024)
    assert tokenizer.decode([t for t in labels if t != IGNORE]).startswith("Answer: 8")  # exemplar answers masked
    assert tokenize_example(CHAT, tokenizer, 10)[2] and len(tokenize_example(CHAT, tokenizer, 10)[0]) == 10
    with pytest.raises(ValueError, match="last message"):
        tokenize_example(CHAT[:2], tokenizer, 1024)


def seqs(lengths, weight=1.0):
    out = []
    for n, length in enumerate(lengths):
        ids = [(7 * n + i) % 50 + 1 for i in range(length)]
        labels = [IGNORE] * (length // 2) + ids[length // 2:]
        out.append(example_sequence(ids, labels, weight))
    return out


def test_pack_fits_examples_whole_and_restarts_positions():
    items = seqs([5, 9, 3, 7, 2, 6])
    packed = pack(items, max_len=12)
    assert all(len(p["input_ids"]) <= 12 for p in packed)
    assert sum(len(p["input_ids"]) for p in packed) == sum(len(s["input_ids"]) for s in items)
    assert len(packed) == 3  # 9+3, 7+5, 6+2 (first fit, longest first)
    for p in packed:
        for seg in set(p["segments"]):
            pos = [q for q, s in zip(p["position_ids"], p["segments"]) if s == seg]
            assert pos == list(range(len(pos)))
    assert pack(items, 12) == packed  # deterministic


def test_collate_mask_is_causal_within_examples():
    b = collate(pack(seqs([3, 2]), max_len=8), pad_id=0)
    m = b["attention_mask"][0, 0]
    assert m.shape == (5, 5)
    assert m[4, 3] and not m[3, 2] and not m[1, 2] and m[2, 0]  # 2nd example can't see the 1st
    padded = collate(seqs([4, 2]), pad_id=0)
    assert padded["input_ids"].shape == (2, 4) and padded["labels"][1, 2:].eq(IGNORE).all()


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def loss_of(model, sequences, pad_id=0):
    b = collate(sequences, pad_id)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"]).logits
    return weighted_loss_sum(logits, b["labels"], b["weights"]), b["weights"][:, 1:].sum()


def test_packed_equals_padded_loss(tiny_lm):
    items = seqs([6, 11, 4, 9, 3])
    padded, w1 = loss_of(tiny_lm, items)
    packed, w2 = loss_of(tiny_lm, pack(items, max_len=16))
    assert w1 == w2
    assert packed.item() == pytest.approx(padded.item(), rel=1e-5)


def test_masked_tokens_carry_no_gradient(tiny_lm):
    b = collate(seqs([8]), pad_id=0)
    logits = tiny_lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"]).logits
    logits.retain_grad()
    weighted_loss_sum(logits, b["labels"], b["weights"]).backward()
    per_position = logits.grad[0].abs().sum(-1)
    # the logits at position t predict token t+1: only positions whose next token is a label get gradient
    target = b["labels"][0, 1:] != IGNORE
    assert per_position[:-1][~target].eq(0).all() and per_position[:-1][target].gt(0).all()
    assert per_position[-1] == 0


def test_kind_weights_scale_the_loss(tiny_lm):
    one, _ = loss_of(tiny_lm, seqs([6], weight=1.0))
    half, _ = loss_of(tiny_lm, seqs([6], weight=0.5))
    assert half.item() == pytest.approx(one.item() / 2, rel=1e-6)


BASE = {"data": "d", "out_dir": "o", "model": "m"}


def test_deepspeed_config_is_derived():
    cfg = build(TrainConfig, {**BASE, "zero": {"stage": 3, "offload_params": True}, "method": "full",
                              "micro_batch_size": 2, "grad_accum": 3, "scaling": {"num_workers": 2}})
    ds = deepspeed_config(cfg, total_steps=50, bf16=False)
    assert ds["train_batch_size"] == 12 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert ds["scheduler"]["params"]["total_num_steps"] == 50 and ds["bf16"]["enabled"] is False
    assert ds["scheduler"]["params"]["warmup_min_ratio"] == 0.0  # warmup from 0 over warmup_steps
    no_warmup = deepspeed_config(build(TrainConfig, {**BASE, "warmup_steps": 0, "schedule": "linear"}), 10, True)
    assert no_warmup["scheduler"]["params"]["warmup_min_lr"] == no_warmup["scheduler"]["params"]["warmup_max_lr"]


@pytest.mark.parametrize("over, message", [
    ({"zero": {"stage": 2, "offload_params": True}}, "offload_params needs ZeRO stage 3"),
    ({"zero": {"stage": 0, "offload_optimizer": True}}, "offload_optimizer needs ZeRO stage 1, 2 or 3"),
    ({"zero": {"stage": 3, "offload_params": True}}, "zero.offload_params with method lora"),
    ({"zero": {"stage": 4}}, "stage must be 0, 1, 2 or 3"),
    ({"weights": {"rationale": 1.0, "chitchat": 1.0}}, "weights: kinds are"),
    ({"micro_batch_size": 0}, "micro_batch_size must be >= 1"),
])
def test_bad_train_config(over, message):
    with pytest.raises(ConfigError, match=message):
        build(TrainConfig, {**BASE, **over})
