"""Training data: the loss falls on the answer only, packing keeps examples apart, and the loss is
the same packed or padded (no Ray, no DeepSpeed: a tiny torch model)."""

from __future__ import annotations

import pytest
import torch

from jobs.common.config import ConfigError, build
from jobs.train.config import FIRST_ITERATION, TrainConfig, deepspeed_config
from jobs.train.attention import register
from jobs.train.data import (IGNORE, SEQ_FIELDS, collate, collate_packed, example_sequence, model_inputs, pack,
                             pack_batch,
                             tokenize_example)
from jobs.train.loss import weighted_loss_sum

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
    assert sorted(p["position_ids"] for p in packed) == [
        list(range(6)) + list(range(2)), list(range(7)) + list(range(5)), list(range(9)) + list(range(3))]
    assert pack(items, 12) == packed  # deterministic


def test_pack_stage_packs_a_batch_and_counts_its_truncated_examples():
    """The Ray Data stage packs as `pack` does and carries how many cut examples each sequence holds."""
    import numpy as np

    items = seqs([5, 9, 3, 7, 2, 6])
    batch = {k: np.array([np.array(s[k]) for s in items], dtype=object) for k in SEQ_FIELDS}
    batch["truncated"] = np.array([True, True, False, False, True, False])
    out = pack_batch(batch, 12)
    assert [{k: [int(x) if k != "weights" else x for x in out[k][i]] for k in SEQ_FIELDS}
            for i in range(len(out["input_ids"]))] == pack(items, 12)
    assert out["truncated"] == [1, 1, 1]  # 9+3, 7+5, 6+2: one cut example in each


def test_collate_pads_and_packed_collate_marks_examples():
    padded = collate(seqs([4, 2]), pad_id=0)
    assert padded["input_ids"].shape == (2, 4) and padded["labels"][1, 2:].eq(IGNORE).all()
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    b = collate_packed(pack(seqs([3, 2, 4]), max_len=5) + pack(seqs([6]), max_len=8))
    assert b["input_ids"].shape == (1, 15) and "attention_mask" not in b
    # examples in packing order (4; 3+2), then the 6 of the second sequence
    assert b["cu_seq_lens_q"].tolist() == [0, 4, 7, 9, 15] and b["max_length_q"] == 6
    # no example's first token is a target (the token before it belongs to another example)
    assert all(b["labels"][0, i] == IGNORE and b["weights"][0, i] == 0 for i in (4, 7, 9))


@pytest.fixture(scope="module")
def tiny_lm():
    """A tiny Llama with grouped-query attention, under cotd's varlen attention (plain sdpa
    when a batch marks no examples)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    cfg._attn_implementation = register()
    return LlamaForCausalLM(cfg).eval()


def loss_of(model, b):
    logits = model(**model_inputs(b)).logits
    return weighted_loss_sum(logits, b["labels"], b["weights"]), b["weights"][:, 1:].sum()


def test_packed_equals_padded_loss_and_gradient(tiny_lm):
    items = seqs([6, 11, 4, 9, 3])
    losses, grads = [], []
    for b in (collate(items, pad_id=0), collate_packed(pack(items, max_len=16))):
        tiny_lm.zero_grad()
        loss, weight = loss_of(tiny_lm, b)
        loss.backward()
        losses.append((loss.item(), weight.item()))
        grads.append(torch.cat([p.grad.flatten() for p in tiny_lm.parameters()]))
    (padded, w1), (packed, w2) = losses
    assert w1 == w2
    assert packed == pytest.approx(padded, rel=1e-5)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    # the same row without the example boundaries lets examples see each other: a different loss
    unmarked = {k: v for k, v in collate_packed(pack(items, max_len=16)).items() if not k.startswith(("cu_", "max_"))}
    assert loss_of(tiny_lm, unmarked)[0].item() != pytest.approx(padded, rel=1e-3)


def test_masked_tokens_carry_no_gradient(tiny_lm):
    b = collate(seqs([8]), pad_id=0)
    logits = tiny_lm(**model_inputs(b)).logits
    logits.retain_grad()
    weighted_loss_sum(logits, b["labels"], b["weights"]).backward()
    per_position = logits.grad[0].abs().sum(-1)
    # the logits at position t predict token t+1: only positions whose next token is a label get gradient
    target = b["labels"][0, 1:] != IGNORE
    assert per_position[:-1][~target].eq(0).all() and per_position[:-1][target].gt(0).all()
    assert per_position[-1] == 0


def test_kind_weights_scale_the_loss(tiny_lm):
    one, _ = loss_of(tiny_lm, collate(seqs([6], weight=1.0), pad_id=0))
    half, _ = loss_of(tiny_lm, collate(seqs([6], weight=0.5), pad_id=0))
    assert half.item() == pytest.approx(one.item() / 2, rel=1e-6)


BASE = {"data": "d", "out_dir": "o", "model": "m"}


def test_deepspeed_config_is_derived():
    cfg = build(TrainConfig, {**BASE, "zero": {"stage": 3, "offload_params": True}, "method": "full",
                              "micro_batch_size": 2, "grad_accum": 3, "scaling": {"num_workers": 2}})
    ds = deepspeed_config(cfg, total_steps=50, bf16=False)
    assert ds["train_batch_size"] == 12 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert ds["scheduler"]["type"] == "WarmupCosineLR" and ds["bf16"]["enabled"] is False


def test_precision_auto_trains_fp32_on_a_cpu_without_native_bf16(monkeypatch):
    """Decided on the workers (trains_in_bf16 runs in each; without a process group it sees its own
    CPU alone). DeepSpeed's bf16 on a CPU without bf16 arithmetic converts every operand; where the
    CPU has it, bf16 LoRA trained 1.43x as fast as fp32 (docs/benchmarks.md)."""
    import jobs.common.engine as llm_mod
    from jobs.train.loop import trains_in_bf16

    cpu = torch.device("cpu")

    def precision(value, saved=None, **over):
        return trains_in_bf16(build(TrainConfig, {**BASE, "precision": value, **over}), saved, cpu)

    monkeypatch.setattr(llm_mod, "cpu_has_native_bf16", lambda: False)
    assert build(TrainConfig, BASE).precision == "auto"
    assert precision("auto") is False and precision("bf16") is True and precision("fp32") is False
    monkeypatch.setattr(llm_mod, "cpu_has_native_bf16", lambda: True)
    assert precision("auto") is True and precision("fp32") is False
    # a resumed auto run keeps its checkpoint's precision, on whatever CPU it restarts
    assert precision("auto", saved={"precision": "fp32"}) is False
    monkeypatch.setattr(llm_mod, "cpu_has_native_bf16", lambda: False)
    assert precision("auto", saved={"precision": "bf16"}) is True
    assert precision("auto", saved={"step": 3}) is False  # a checkpoint written before it was recorded
    assert precision("fp32", saved={"precision": "bf16"}) is False  # a precision set in the config is kept
    # GPU workers train in bf16
    gpu = {"scaling": {"use_gpu": True}}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision("auto", **gpu) is True and precision("bf16", **gpu) is True and precision("fp32", **gpu) is False


def test_workers_train_in_bf16_only_if_every_one_has_it(monkeypatch):
    """The ranks agree: one worker without native bf16 makes the whole run fp32."""
    import jobs.common.engine as llm_mod
    import jobs.train.loop as loop

    cfg = build(TrainConfig, BASE)
    monkeypatch.setattr(llm_mod, "cpu_has_native_bf16", lambda: True)
    seen = []

    def all_reduce(values, device):  # this rank's flag, summed with another rank lacking bf16
        seen.append(values)
        return [values[0] + 1.0]

    monkeypatch.setattr(loop, "_all_reduce", all_reduce)
    assert loop.trains_in_bf16(cfg, None, torch.device("cpu")) is False and seen == [[0.0]]
    monkeypatch.setattr(loop, "_all_reduce", lambda values, device: values)
    assert loop.trains_in_bf16(cfg, None, torch.device("cpu")) is True


def lrs_of_steps(schedule: str, warmup: int, steps: int, lr: float = 1.0) -> list[float]:
    """The learning rate each training step updates with, from DeepSpeed's own scheduler built
    from cotd's config and moved as the training loop moves it."""
    from deepspeed.runtime import lr_schedules

    cfg = build(TrainConfig, {**BASE, "schedule": schedule, "warmup_steps": warmup, "lr": lr})
    spec = deepspeed_config(cfg, total_steps=steps, bf16=False)["scheduler"]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = getattr(lr_schedules, spec["type"])(opt, **spec["params"])
    scheduler.step(FIRST_ITERATION)
    used = []
    for _ in range(steps):
        used.append(opt.param_groups[0]["lr"])
        scheduler.step()  # the engine steps it after each optimizer step
    return used


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_no_step_trains_at_lr_zero_and_warmup_reaches_the_peak(schedule):
    used = lrs_of_steps(schedule, warmup=4, steps=10)
    assert used[:3] == pytest.approx([0.25, 0.5, 0.75])  # k / warmup: the first update counts
    # DeepSpeed's cosine counts the step after warmup as its first step of decay: just under the peak
    assert 0.95 <= max(used) <= 1.0 and min(used) > 0
    if schedule != "constant":
        assert used[3:] == sorted(used[3:], reverse=True) and used[-1] < 0.2
    no_warmup = lrs_of_steps(schedule, warmup=0, steps=10)
    assert no_warmup[0] >= 0.95 and min(no_warmup) > 0


@pytest.mark.parametrize("over, message", [
    ({"zero": {"stage": 2, "offload_params": True}}, "offload_params needs ZeRO stage 3"),
    ({"zero": {"stage": 0, "offload_optimizer": True}}, "offload_optimizer needs ZeRO stage 1, 2 or 3"),
    ({"zero": {"stage": 3, "offload_params": True}}, "zero.offload_params with method lora"),
    ({"zero": {"stage": 4}}, "stage must be 0, 1, 2 or 3"),
    ({"weights": {"rationale": 1.0, "chitchat": 1.0}}, "weights: kinds are"),
    ({"micro_batch_size": 0}, "micro_batch_size must be >= 1"),
    ({"compile": True, "zero": {"stage": 3}}, "compile with zero.stage 3"),
    ({"loss_chunk_tokens": 64, "zero": {"stage": 3}}, "loss_chunk_tokens with zero.stage 3"),
    ({"loss_chunk_tokens": -1}, "loss_chunk_tokens must be >= 0"),
    ({"scaling": {"worker_resources": {"GPU": 1}}}, r"worker_resources holds custom resources.*got \{'GPU': 1\.0\}"),
    ({"scaling": {"worker_resources": {"trainer_node": 0}}}, "worker_resources holds custom resources"),
    ({"scaling": {"placement_strategy": "RANDOM"}}, "placement_strategy"),
])
def test_bad_train_config(over, message):
    with pytest.raises(ConfigError, match=message):
        build(TrainConfig, {**BASE, **over})
