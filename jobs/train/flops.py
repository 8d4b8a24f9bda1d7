"""Model FLOPs utilization (MFU): the floating-point work a training step needs, over what the
device could do in the step's time at its dense bf16 peak.

The work counted is the model's, not the kernels': padding and recomputation (gradient
checkpointing) are not counted, causal attention counts its lower triangle only, and a frozen
weight (LoRA's base model) costs its forward and the gradient of its input, not its own
gradient. Each token costs 2 FLOPs per weight of every linear layer (the embedding lookup
not) in the forward pass, 2 more in the backward pass for the input's gradient, and 2 more for
the weight's gradient where the weight trains. The output head counts only at the positions
that carry a loss (label tokens): the prompt's logits are not needed, and the chunked loss
(jobs.train.loss) does not compute them. Attention adds, per layer and example of length l,
2·l²·(heads·head_dim) forward (QKᵀ and AV over the causal half), twice that backward.
"""

from __future__ import annotations

from typing import Any, Iterable

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, in FLOP/s, matched
# against torch.cuda.get_device_name() (first match wins: the more specific names come first).
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),   # SXM (HBM3)
    ("H200", 989e12),
    ("H20", 148e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
)


def peak_flops(device_name: str) -> float | None:
    """The device's dense bf16 peak, or None for a device not in `PEAK_BF16` (then no MFU)."""
    return next((peak for key, peak in PEAK_BF16 if key in device_name), None)


def example_lengths(position_ids: Iterable[int]) -> list[int]:
    """Lengths of the examples in one sequence (each starts where its position id is 0)."""
    lengths: list[int] = []
    for p in position_ids:
        if p == 0 or not lengths:
            lengths.append(0)
        lengths[-1] += 1
    return lengths


class StepFlops:
    """FLOPs of training steps of one model: `StepFlops(model)(example_lengths, label_tokens)`."""

    def __init__(self, model: Any):
        import torch

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = base.get_output_embeddings()
        head_weights = [head.weight] if isinstance(head, torch.nn.Linear) else []
        linear = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
        seen = {id(w): w for w in linear}.values()  # a tied output head is one weight, once

        def cost(weights) -> int:  # per token: forward, input gradient, and the weight's own where it trains
            # ZeRO-3 leaves each rank an empty tensor and keeps the full size in ds_numel
            size = [(getattr(w, "ds_numel", w.numel()), w.requires_grad) for w in weights]
            return sum(4 * n + (2 * n if trains else 0) for n, trains in size)

        self.per_token = cost([w for w in seen if all(w is not h for h in head_weights)])
        self.per_label = cost(head_weights)
        cfg = model.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        self.per_square = 6 * cfg.num_hidden_layers * heads * head_dim

    def __call__(self, lengths: Iterable[int], label_tokens: int) -> float:
        lengths = list(lengths)
        return float(self.per_token * sum(lengths) + self.per_label * label_tokens
                     + self.per_square * sum(n * n for n in lengths))
