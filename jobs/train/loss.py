"""The training loss: the sum over label tokens of weight x next-token cross-entropy (the caller
normalizes), computed either from the model's logits or, chunked, from its last hidden states and
output head.

The chunked form exists for memory. A model's forward returns the logits of every position, and
the loss upcasts them to float32: with a 150k-token vocabulary that is about 2.3 GiB per 4096
tokens, held with its gradient until the backward pass. `chunked_loss_sum` instead takes the
hidden states of the positions that carry a loss and runs the output head over them a chunk at a
time, computing each chunk's gradients (for the hidden states and, where it trains, the head)
while its logits exist, so no more than one chunk's logits is ever held.
"""

from __future__ import annotations

import functools
from typing import Any

from jobs.train.data import IGNORE, model_inputs


def weighted_loss_sum(logits, labels, weights):
    """From logits [batch, seq, vocab]; labels and weights [batch, seq] (see jobs.train.data)."""
    import torch.nn.functional as F

    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    ce = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                         ignore_index=IGNORE, reduction="none")
    return (ce * weights[:, 1:].reshape(-1)).sum()


def _head_chunk(h, head_weight, targets, w, with_grad: bool):
    """One chunk: (its weighted loss sum, and, with_grad, d(loss)/d(logits) in h's dtype)."""
    import torch

    logits = (h @ head_weight.t()).float()
    lse = torch.logsumexp(logits, dim=-1)
    loss = ((lse - logits.gather(1, targets[:, None]).squeeze(1)) * w).sum()
    if not with_grad:
        return loss, None
    grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
    grad[torch.arange(len(targets), device=grad.device), targets] -= 1
    return loss, grad.mul_(w[:, None]).to(h.dtype)


def _chunked(hidden, head_weight, targets, w, chunk: int, with_grad: bool):
    """(weighted loss sum, and with_grad the gradients of hidden and of the head where it trains)."""
    import torch

    grad_hidden = torch.empty_like(hidden) if with_grad else None
    grad_head = torch.zeros(head_weight.shape, dtype=torch.float32, device=head_weight.device) \
        if with_grad and head_weight.requires_grad else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for s in range(0, len(targets), chunk):
        h = hidden[s:s + chunk]
        loss, grad = _head_chunk(h, head_weight, targets[s:s + chunk], w[s:s + chunk], with_grad)
        total += loss
        if grad is not None:
            grad_hidden[s:s + chunk] = grad @ head_weight
            if grad_head is not None:
                grad_head += (grad.t() @ h).float()
    return total, grad_hidden, grad_head


@functools.cache
def _autograd_function():
    import torch

    class ChunkedHeadLoss(torch.autograd.Function):
        """loss(hidden, head_weight); the gradients come out of the forward pass (chunk by
        chunk) and the backward pass only scales them by the incoming gradient."""

        @staticmethod
        def forward(ctx, hidden, head_weight, targets, w, chunk):
            total, ctx.grad_hidden, ctx.grad_head = _chunked(hidden, head_weight, targets, w, chunk, with_grad=True)
            ctx.head_dtype = head_weight.dtype
            return total

        @staticmethod
        def backward(ctx, grad_out):
            grad_hidden = ctx.grad_hidden * grad_out.to(ctx.grad_hidden.dtype)
            grad_head = None if ctx.grad_head is None else (ctx.grad_head * grad_out).to(ctx.head_dtype)
            ctx.grad_hidden = ctx.grad_head = None
            return grad_hidden, grad_head, None, None, None

    return ChunkedHeadLoss


def chunked_loss_sum(hidden, head_weight, labels, weights, chunk: int):
    """`weighted_loss_sum` of logits = hidden @ head_weightᵀ, without the logits: hidden
    [batch, seq, dim] (the decoder's last hidden states), head_weight [vocab, dim] (an output head
    with no bias), `chunk` label tokens at a time."""
    import torch

    keep = (labels[:, 1:] != IGNORE) & (weights[:, 1:] != 0)  # positions whose next token carries a loss
    h = hidden[:, :-1][keep]
    targets, w = labels[:, 1:][keep], weights[:, 1:][keep].float()
    if not torch.is_grad_enabled() or not (h.requires_grad or head_weight.requires_grad):
        return _chunked(h, head_weight, targets, w, chunk, with_grad=False)[0]
    return _autograd_function().apply(h, head_weight, targets, w, chunk)


def decoder_and_head(model) -> tuple[Any, Any]:
    """The decoder (returning last hidden states) and the output head of a causal LM, PEFT-wrapped
    or not; a clear error where the logits are more than hidden @ head (a bias, a LoRA-adapted
    head, a softcap or scale), which the chunked loss would not reproduce."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    name = type(base).__name__
    if type(head) is not torch.nn.Linear or head.bias is not None:
        raise ValueError(f"loss_chunk_tokens: {name}'s output head is {type(head).__name__}"
                         f"{' with a bias' if getattr(head, 'bias', None) is not None else ''}, not a plain "
                         "linear layer (a LoRA target_modules entry that adapts it?); use loss_chunk_tokens: 0")
    cfg = base.config
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            raise ValueError(f"loss_chunk_tokens: {name} transforms its logits ({attr}={getattr(cfg, attr)}), "
                             "which the chunked loss does not reproduce; use loss_chunk_tokens: 0")
    return base.get_decoder(), head


def loss_sum(model, batch: dict[str, Any], chunk: int):
    """The weighted loss sum of a collated batch through `model` (a DeepSpeed engine or a module):
    from its logits, or with `chunk` > 0 through `chunked_loss_sum`."""
    if not chunk:
        return weighted_loss_sum(model(**model_inputs(batch)).logits, batch["labels"], batch["weights"])
    decoder, head = decoder_and_head(getattr(model, "module", model))
    hidden = decoder(**model_inputs(batch)).last_hidden_state
    return chunked_loss_sum(hidden, head.weight, batch["labels"], batch["weights"], chunk)
