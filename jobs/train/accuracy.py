"""Answer accuracy on a validation sample while the student trains (`val_accuracy_samples`).

The driver picks a fixed sample of validation problems (one rationale example each, chosen by a
seeded hash, among those whose answers can be checked) and tokenizes their prompts: the student's
own prompt, as it trains on it. At each validation the workers split the sample, the student
answers greedily, and each answer is extracted in the example's CoT format and checked the way
generation checks the teacher's (jobs.formats.parse, jobs.tasks.verify).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jobs.common.schemas import ACCURACY_READS, RATIONALE
from jobs.formats.parse import extract_answer
from jobs.tasks.problem import rank_key
from jobs.tasks.verify import checkable, is_correct as answer_is_correct

BATCH = 8  # prompts per generate call


def accuracy_sample(files: list[Path], n: int, seed: int, tokenizer) -> list[dict[str, Any]]:
    """Up to `n` checkable validation problems, their prompts tokenized; ValueError naming what is
    missing when there are none."""
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for f in files:
        names = set(pq.read_schema(f).names)
        missing = [c for c in ACCURACY_READS if c not in names]
        if missing:
            raise ValueError(f"val_accuracy_samples: {f} lacks column(s) {', '.join(missing)} (curated by an older "
                             "cotd?); run `cotd curate` again, or set val_accuracy_samples: 0")
        rows += pq.read_table(f, columns=list(ACCURACY_READS)).to_pylist()
    first: dict[str, dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: (r["problem_id"], r["messages"])):  # one per problem, whatever the part order
        if r["kind"] == RATIONALE and checkable(r["gold_answer"], r["verifier"]):
            first.setdefault(r["problem_id"], r)
    if not first:
        raise ValueError("val_accuracy_samples: no validation example has an answer to check against "
                         "(rationale examples of problems with a verifier); set val_accuracy_samples: 0")
    chosen = sorted(first.values(), key=lambda r: rank_key(seed, r["problem_id"]))[:n]
    return [{"problem_id": r["problem_id"], "format": r["format"] or "pre", "gold_answer": r["gold_answer"],
             "verifier": r["verifier"], "metadata": r["metadata"] or "{}",
             "prompt_ids": list(tokenizer.apply_chat_template(json.loads(r["messages"])[:-1], tokenize=True,
                                                              add_generation_prompt=True, return_dict=False))}
            for r in chosen]


def is_correct(item: dict[str, Any], text: str) -> bool:
    """Whether the student's output `text` answers `item` (from accuracy_sample) correctly."""
    answer, _ = extract_answer(text, item["format"])
    return bool(answer_is_correct(item["verifier"], item["gold_answer"], item["metadata"], answer))


def answer_accuracy(model, sample: list[dict[str, Any]], rank: int, world: int, tokenizer, max_tokens: int,
                    device, synced: bool) -> tuple[int, int]:
    """(correct, answered) over this rank's share of `sample` (items rank, rank + world, ...).
    `synced`: every rank runs the same number of generate calls (ZeRO-3 gathers weights in them
    collectively), padding its share with repeats whose answers are not counted."""
    import torch

    mine = sample[rank::world]
    share = -(-len(sample) // world) if synced else len(mine)  # synced: the largest rank's share
    calls = -(-share // BATCH)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    correct = answered = 0
    for c in range(calls):
        items = mine[c * BATCH:(c + 1) * BATCH]
        prompts = [i["prompt_ids"] for i in items] or [sample[0]["prompt_ids"]]  # a synced rank's filler
        width = max(map(len, prompts))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                                 use_cache=True, pad_token_id=pad_id, synced_gpus=synced)
        for item, row in zip(items, out[:, width:]):
            correct += is_correct(item, tokenizer.decode(row, skip_special_tokens=True))
            answered += 1
    return correct, answered
