"""The chunked loss gives the loss and gradients of the loss from the logits, without the logits."""

from __future__ import annotations

import pytest
import torch

from jobs.train.data import IGNORE, collate, example_sequence
from jobs.train.loss import chunked_loss_sum, decoder_and_head, loss_sum, weighted_loss_sum


def tiny(tied: bool, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                                        attn_implementation="sdpa", **extra))


def batch():
    """Three examples (prompt masked, weights 1 and 0.5), as a padded batch of 3 rows."""
    g = torch.Generator().manual_seed(1)
    seqs = []
    for n, prompt, w in ((9, 4, 1.0), (6, 2, 0.5), (12, 7, 1.0)):
        ids = torch.randint(0, 100, (n,), generator=g).tolist()
        seqs.append(example_sequence(ids, [IGNORE] * prompt + ids[prompt:], w))
    return collate(seqs, pad_id=0)


def grads(model, fn) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = fn()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_chunked_loss_and_gradients_match_the_logits(tied, chunk):
    model, b = tiny(tied), batch()
    ref_loss, ref = grads(model, lambda: loss_sum(model, b, 0))
    got_loss, got = grads(model, lambda: loss_sum(model, b, chunk))
    assert got_loss == pytest.approx(ref_loss, rel=1e-5)
    assert got.keys() == ref.keys() and ("model.embed_tokens.weight" if tied else "lm_head.weight") in ref
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_loss_scales_with_the_incoming_gradient():
    """The optimizer step backpropagates loss x scale: the gradients computed in the forward pass scale too."""
    model, b = tiny(False), batch()
    _, ref = grads(model, lambda: 3.0 * loss_sum(model, b, 0))
    _, got = grads(model, lambda: 3.0 * loss_sum(model, b, 4))
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_lora_head_stays_frozen_and_adapters_match():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny(False), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                                   init_lora_weights=False))
    b = batch()
    _, ref = grads(model, lambda: loss_sum(model, b, 0))
    _, got = grads(model, lambda: loss_sum(model, b, 3))
    assert ref.keys() == got.keys() and all("lora_" in k for k in ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_without_gradients_the_loss_alone_matches():
    model, b = tiny(True), batch()
    with torch.no_grad():
        assert loss_sum(model, b, 2).item() == pytest.approx(loss_sum(model, b, 0).item(), rel=1e-5)


def test_hidden_states_and_head_give_the_loss_of_their_logits():
    model, b = tiny(False), batch()
    hidden = torch.randn(*b["input_ids"].shape, 32)
    head = model.lm_head.weight.detach()
    ref = weighted_loss_sum(hidden @ head.t(), b["labels"], b["weights"])
    for chunk in (1, 7, 100):
        got = chunked_loss_sum(hidden, head, b["labels"], b["weights"], chunk=chunk)
        assert got.item() == pytest.approx(ref.item(), rel=1e-5)


def test_a_head_the_chunked_loss_cannot_reproduce_is_refused():
    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(tiny(False), LoraConfig(r=4, target_modules=["lm_head"], task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="output head is .*not a plain linear layer"):
        decoder_and_head(adapted)
    capped = tiny(False)
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="transforms its logits"):
        decoder_and_head(capped)
