"""Answer accuracy on a validation sample: which problems are sampled, how an answer is judged,
and how the ranks split and count the sample."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from jobs.common.runs import PartWriter, part_files
from jobs.common.schemas import EXAMPLE_SCHEMA
from jobs.train.accuracy import BATCH, accuracy_sample, answer_accuracy, is_correct


def example(pid: str, kind: str = "rationale", verifier: str | None = "math", gold: str = "7", path: int = 0) -> dict:
    messages = [{"role": "system", "content": "Solve it."}, {"role": "user", "content": f"Problem {pid}?"},
                {"role": "assistant", "content": f"Step 1: think.\nAnswer: {gold}"}]
    return {"example_id": f"{pid}#{path}#{kind}", "kind": kind, "problem_id": pid, "path_index": path,
            "category": "math", "difficulty": "default", "format": "pre", "num_steps": 1,
            "messages": json.dumps(messages), "gold_answer": gold, "verifier": verifier, "metadata": "{}"}


def val_files(tmp_path, rows, schema=EXAMPLE_SCHEMA):
    PartWriter(tmp_path / "val", schema).write(pa.Table.from_pylist(rows, schema=schema))
    return part_files(tmp_path / "val")


def test_sample_takes_one_checkable_rationale_per_problem(tmp_path, tokenizer):
    rows = [example("a"), example("a", path=1), example("b"), example("c", kind="self_eval"),
            example("d", verifier="none"), example("e", verifier=None), example("f", kind="general")]
    sample = accuracy_sample(val_files(tmp_path, rows), 10, seed=0, tokenizer=tokenizer)
    assert sorted(i["problem_id"] for i in sample) == ["a", "b"]
    a = next(i for i in sample if i["problem_id"] == "a")
    prompt = json.loads(rows[0]["messages"])[:-1]  # the student's own prompt, up to the answer
    assert a["prompt_ids"] == tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                                            return_dict=False)
    assert (a["gold_answer"], a["verifier"], a["format"]) == ("7", "math", "pre")


def test_sample_size_and_choice_are_fixed_by_the_seed(tmp_path, tokenizer):
    files = val_files(tmp_path, [example(f"p{i}") for i in range(20)])
    first = [i["problem_id"] for i in accuracy_sample(files, 5, seed=3, tokenizer=tokenizer)]
    assert len(first) == 5 and first == [i["problem_id"] for i in accuracy_sample(files, 5, 3, tokenizer)]
    assert first != [i["problem_id"] for i in accuracy_sample(files, 5, 4, tokenizer)]


def test_sample_without_answer_checks_is_refused(tmp_path, tokenizer):
    old = pa.schema([f for f in EXAMPLE_SCHEMA if f.name not in ("gold_answer", "verifier", "metadata")])
    files = val_files(tmp_path / "old", [{k: v for k, v in example("a").items() if k in old.names}], old)
    with pytest.raises(ValueError, match="lacks column.*gold_answer.*run `cotd curate` again"):
        accuracy_sample(files, 4, 0, tokenizer)
    files = val_files(tmp_path / "none", [example("a", verifier="none"), example("b", kind="self_eval")])
    with pytest.raises(ValueError, match="no validation example has an answer to check"):
        accuracy_sample(files, 4, 0, tokenizer)


@pytest.mark.parametrize("fmt, text, right", [
    ("pre", "Step 1: 3 + 4 = 7.\nAnswer: 7", True),
    ("pre", "Step 1: 3 + 4 = 8.\nAnswer: 8", False),
    ("pre", "Step 1: I am not sure.", False),
    ("post", "Answer: 7\nBecause 3 + 4 = 7.", True),
    ("pre", "So the result is \\boxed{7.0}", True),  # math-verify equivalence
])
def test_an_answer_is_judged_like_the_teachers(fmt, text, right):
    item = {"format": fmt, "gold_answer": "7", "verifier": "math", "metadata": "{}"}
    assert is_correct(item, text) is right


class Scripted:
    """A model whose greedy answer to a prompt is scripted by the prompt's last token."""

    def __init__(self, tokenizer, answers: dict[int, str]):
        self.tokenizer, self.answers, self.calls = tokenizer, answers, 0

    def generate(self, input_ids, attention_mask, max_new_tokens, synced_gpus, **_):
        import torch

        self.calls += 1
        assert input_ids.shape == attention_mask.shape and input_ids.shape[0] <= BATCH
        outs = [self.tokenizer(self.answers[int(row[-1])], add_special_tokens=False)["input_ids"][:max_new_tokens]
                for row in input_ids]
        width = max(map(len, outs))
        pad = self.tokenizer.eos_token_id
        return torch.cat([input_ids, torch.tensor([o + [pad] * (width - len(o)) for o in outs])], dim=1)


@pytest.mark.parametrize("synced", [False, True])
def test_ranks_split_the_sample_and_count_each_problem_once(tokenizer, synced):
    # 2 x BATCH + 1 problems whose prompts end in distinct tokens; the model answers the even ones right
    n = 2 * BATCH + 1
    items = [{"problem_id": str(i), "format": "pre", "gold_answer": str(i), "verifier": "math", "metadata": "{}",
              "prompt_ids": [1, 2, 100 + i]} for i in range(n)]
    answers = {100 + i: f"Step 1: done.\nAnswer: {i if i % 2 == 0 else i + 1}" for i in range(n)}
    totals, calls = [0, 0], []
    for rank in range(2):
        model = Scripted(tokenizer, answers)
        correct, answered = answer_accuracy(model, items, rank, 2, tokenizer, 64, "cpu", synced)
        totals = [totals[0] + correct, totals[1] + answered]
        calls.append(model.calls)
    assert totals == [BATCH + 1, n]  # 0, 2, ..., 2 x BATCH right; every problem answered once
    # rank 0 has BATCH + 1 problems, rank 1 BATCH; under ZeRO-3 (synced) rank 1 runs a filler call
    assert calls == ([2, 2] if synced else [2, 1])
