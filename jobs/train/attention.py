"""Attention for packed micro-batches: each example attends to itself only, without a dense mask.

A packed micro-batch is one row of examples laid end to end (see `collate_packed`), with the
example boundaries in `cu_seq_lens_q`, the cumulative lengths that flash-attention's varlen
kernels read. transformers passes those keyword arguments down to the attention function, but
its only kernels that use them are flash-attention's (CUDA, an extra package). cotd registers
one more implementation with transformers' AttentionInterface: causal sdpa over each example's
slice, so a micro-batch costs sum(l_i^2) attention instead of (sum l_i)^2, builds no mask, and
runs on CPU and GPU alike. Without boundaries it is plain sdpa (with the usual mask when the
batch is padded).
"""

from __future__ import annotations

VARLEN = "cotd_varlen"


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     cu_seq_lens_q=None, **kwargs):
    """transformers attention signature; query/key/value are [batch, heads, tokens, head_dim] and
    the output is [batch, tokens, heads, head_dim]."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    bounds = cu_seq_lens_q.tolist()
    parts = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                                    dropout=dropout, scaling=scaling, is_causal=True)[0]
             for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(parts, dim=1), None


def varlen_mask(*args, attention_mask=None, **kwargs):
    """The mask transformers builds before the layers: sdpa's for a padded batch, none otherwise
    (a packed row is kept apart by its boundaries, a single example by causality)."""
    from transformers.masking_utils import sdpa_mask

    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Make `cotd_varlen` known to transformers (in this process) and return its name, for
    `from_pretrained(..., attn_implementation=...)`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(VARLEN, varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, varlen_mask)
    return VARLEN
