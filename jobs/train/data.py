"""Training sequences from curated examples: tokenization with the loss on the assistant's answer
only, packing into sequences of bounded length without attention across examples, and collation.
Pure functions over token lists (tested without Ray or a model).

A sequence is a dict of equal-length lists: `input_ids`, `labels` (-100 where no loss),
`weights` (the example kind's loss weight on each label token, 0 elsewhere) and `position_ids`
(restarting at 0 for each example, which is how a packed sequence marks where examples begin).
Padded mode batches single-example sequences with padding; packed mode lays a micro-batch's
examples end to end in one row and tells the attention where each begins (attention.py), so
a packed example gets exactly the loss it has alone.
"""

from __future__ import annotations

import functools
import json
from typing import Any

IGNORE = -100
SEQ_FIELDS = ("input_ids", "labels", "weights", "position_ids")
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                "max_length_k")


def tokenize_example(messages: list[dict[str, str]], tokenizer: Any, max_len: int) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) of one chat: the whole chat in the model's template, with
    labels only on the final assistant turn (the system prompt, user turns and any few-shot turns
    are masked). Cut to `max_len` tokens."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("an example's last message must be the assistant's (the training target)")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template does not extend the prompt with the answer; cannot mask the prompt")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    ids = prompt_ids + answer_ids
    labels = [IGNORE] * len(prompt_ids) + answer_ids
    return ids[:max_len], labels[:max_len], len(ids) > max_len


def example_sequence(input_ids: list[int], labels: list[int], weight: float) -> dict[str, list]:
    """One example as a sequence of its own (the padded mode's unit, and packing's input)."""
    n = len(input_ids)
    return {"input_ids": list(input_ids), "labels": list(labels),
            "weights": [weight if lab != IGNORE else 0.0 for lab in labels],
            "position_ids": list(range(n))}


def pack_bins(lengths: list[int], max_len: int) -> list[list[int]]:
    """First-fit-decreasing packing: the indices of the items in each bin of at most `max_len`
    tokens. Deterministic: ties keep input order. Items are never split."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        slot = next((b for b, r in enumerate(room) if r >= lengths[i]), None)
        if slot is None:
            bins.append([])
            room.append(max_len)
            slot = len(bins) - 1
        bins[slot].append(i)
        room[slot] -= lengths[i]
    return bins


def pack(sequences: list[dict[str, list]], max_len: int) -> list[dict[str, list]]:
    """Single-example sequences packed into sequences of at most `max_len` tokens (`pack_bins`)."""
    bins = pack_bins([len(s["input_ids"]) for s in sequences], max_len)
    return [{k: [x for i in b for x in sequences[i][k]] for k in SEQ_FIELDS} for b in bins]


def collate(sequences: list[dict[str, list]], pad_id: int):
    """Tensors for a micro-batch of single-example sequences, right-padded to the longest:
    input_ids, labels, weights, position_ids and attention_mask (1 on real tokens)."""
    import torch

    width = max(len(s["input_ids"]) for s in sequences)

    def padded(key: str, fill, dtype):
        return torch.tensor([s[key] + [fill] * (width - len(s[key])) for s in sequences], dtype=dtype)

    return {"input_ids": padded("input_ids", pad_id, torch.long), "labels": padded("labels", IGNORE, torch.long),
            "weights": padded("weights", 0.0, torch.float32), "position_ids": padded("position_ids", 0, torch.long),
            "attention_mask": torch.tensor([[1] * len(s["input_ids"]) + [0] * (width - len(s["input_ids"]))
                                            for s in sequences], dtype=torch.long)}


def collate_packed(sequences: list[dict[str, list]]):
    """Tensors for a micro-batch of packed sequences, laid end to end in one row with no padding:
    input_ids, labels, weights, position_ids [1, tokens], and the examples' boundaries as
    `cu_seq_lens_q/k` (cumulative lengths) with `max_length_q/k`, the varlen convention that
    the model passes down to its attention (attention.py)."""
    import torch

    row = {k: [x for s in sequences for x in s[k]] for k in SEQ_FIELDS}
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    for i in starts:  # no example learns its first token from the one before it
        row["labels"][i], row["weights"][i] = IGNORE, 0.0
    cu = torch.tensor(starts + [len(row["input_ids"])], dtype=torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"input_ids": torch.tensor([row["input_ids"]], dtype=torch.long),
            "labels": torch.tensor([row["labels"]], dtype=torch.long),
            "weights": torch.tensor([row["weights"]], dtype=torch.float32),
            "position_ids": torch.tensor([row["position_ids"]], dtype=torch.long),
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The model's keyword arguments from a collated batch (labels and weights stay with the loss)."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


@functools.lru_cache(maxsize=4)
def _tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def tokenize_batch(batch: dict[str, Any], model_path: str, max_len: int, weights: dict[str, float],
                   packing: bool = False) -> dict[str, Any]:
    """map_batches over curated examples -> training sequences (Arrow lists): one per example, or
    with `packing` the batch's examples packed (pack_batch). Carries the kind's loss weight; counts
    truncated examples in `truncated`. One stage does both. A Ray task: each worker process loads
    the tokenizer once and keeps it for the next batch and the next split (an actor would start a
    process of its own for each split)."""
    tokenizer = _tokenizer(model_path)
    out: dict[str, list] = {k: [] for k in (*SEQ_FIELDS, "truncated")}
    for messages, kind in zip(batch["messages"], batch["kind"]):
        weight = float(weights.get(str(kind), 1.0))
        if weight == 0:
            continue
        ids, labels, cut = tokenize_example(json.loads(messages), tokenizer, max_len)
        seq = example_sequence(ids, labels, weight)
        for k in SEQ_FIELDS:
            out[k].append(seq[k])
        out["truncated"].append(cut)
    return pack_batch(out, max_len) if packing else out


def pack_batch(batch: dict[str, Any], max_len: int) -> dict[str, Any]:
    """Single-example sequences -> packed sequences (within the batch); `truncated` becomes the
    number of truncated examples in each packed sequence."""
    bins = pack_bins([len(ids) for ids in batch["input_ids"]], max_len)
    out = {k: [[x for i in b for x in batch[k][i]] for b in bins] for k in SEQ_FIELDS}
    out["truncated"] = [int(sum(batch["truncated"][i] for i in b)) for b in bins]
    return out
