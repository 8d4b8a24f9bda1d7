"""Attention for packed micro-batches: each example attends to itself only, without a dense mask.

A packed micro-batch is one row of examples laid end to end (see `collate_packed`), with the
example boundaries in `cu_seq_lens_q`, the cumulative lengths that flash-attention's varlen
kernels read. transformers passes those keyword arguments down to the attention function, but
its only kernels that use them are flash-attention's (CUDA, an extra package). cotd registers
one more implementation with transformers' AttentionInterface. On a CUDA device in bf16/fp16 it
is PyTorch's own flash-attention varlen kernel (`torch.nn.attention.varlen.varlen_attn`, one
launch per layer for the whole row); elsewhere (CPU, fp32) it is causal sdpa over each example's
slice. Either way a micro-batch costs sum(l_i^2) attention instead of (sum l_i)^2 and builds no
mask. Without boundaries it is plain sdpa (with the usual mask when the batch is padded).
"""

from __future__ import annotations

import functools
import inspect

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
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and not dropout and _flash_varlen():
        return _flash(query, key, value, cu_seq_lens_q, kwargs.get("max_length_q"), scaling), None
    bounds = cu_seq_lens_q.tolist()
    parts = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                                    dropout=dropout, scaling=scaling, is_causal=True)[0]
             for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(parts, dim=1), None


@functools.cache
def _flash_varlen():
    """(PyTorch's varlen flash-attention function, its keyword parameters), or None where this
    torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _flash(query, key, value, cu, max_len, scaling):
    """Causal varlen flash attention over one packed row: [1, heads, tokens, dim] in,
    [1, tokens, heads, dim] out. Older torch releases take `is_causal` and no `enable_gqa`;
    newer ones take `window_size` ((-1, 0) is causal) and `enable_gqa`."""
    import torch

    varlen_attn, params = _flash_varlen()
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [tokens, heads, dim]
    extra = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each key/value head serves a group
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    if max_len is None:
        max_len = int((cu[1:] - cu[:-1]).max())
    cu = cu.to(device=q.device, dtype=torch.int32)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling, **extra).unsqueeze(0)


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
