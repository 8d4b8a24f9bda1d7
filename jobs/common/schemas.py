"""Every dataset and record cotd's stages hand to each other, declared once; docs/schema.md
documents each. Stages meet only through these files: a writer casts to its schema, a reader names
the columns it needs from the same schema (`columns`), and the contract tests check that what one
stage writes is what the next one reads.

  chains        generate -> curate, evaluate        <run>/chains/part-*.parquet
  judgements    curate (kept across runs)           <curated>/judgements/<fingerprint>/
  examples      curate -> train                     <curated>/{train,val}/
  decisions     curate (why each chain was kept)    <curated>/decisions/
  metrics       train (one JSON line per step)      <student>/metrics.jsonl
  predictions   evaluate (kept across runs)         <eval>/predictions/ (or the shared cache)
  items         evaluate -> report, serve calibrate <eval>/items/
"""

from __future__ import annotations

import pyarrow as pa

# status of a row that holds a model's output (a chain, a judgement, a prediction)
OK = "ok"              # the output was read (an answer, a rating)
UNPARSED = "unparsed"  # the model answered, but nothing could be read from it; kept and marked
ERROR = "error"        # the engine or the server failed for this row; a re-run produces it again
STATUSES = (OK, UNPARSED, ERROR)

# kinds of training example
RATIONALE = "rationale"  # a kept chain, in the student's format and granularity
SELF_EVAL = "self_eval"  # the judge's rating of a chain, teaching the student to rate reasoning
GENERAL = "general"      # general data mixed in against forgetting, answered directly
KINDS = (RATIONALE, SELF_EVAL, GENERAL)


def columns(schema: pa.Schema, names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """`names`, checked to be columns of `schema`: what a reader declares it reads."""
    missing = [n for n in names if n not in schema.names]
    if missing:
        raise AssertionError(f"columns {missing} are not in the schema ({', '.join(schema.names)})")
    return tuple(names)


# --- generate: one row per reasoning chain -------------------------------------------------------
CHAIN_KEY = ("problem_id", "path_index")
CHAIN_SCHEMA = pa.schema([
    # the problem
    pa.field("problem_id", pa.string(), nullable=False),
    pa.field("path_index", pa.int32(), nullable=False),
    pa.field("source", pa.string()),
    pa.field("category", pa.string()),
    pa.field("difficulty", pa.string()),
    pa.field("question", pa.string()),
    pa.field("gold_answer", pa.string()),
    pa.field("verifier", pa.string()),
    pa.field("metadata", pa.string()),
    # the prompt
    pa.field("format", pa.string()),
    pa.field("granularity", pa.string()),
    pa.field("exemplar_ids", pa.list_(pa.string())),
    pa.field("prompt_messages", pa.string()),
    pa.field("prompt", pa.string()),
    # the generation
    pa.field("teacher_model", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("temperature", pa.float32()),
    pa.field("chain", pa.string()),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("output_tokens", pa.int32()),
    pa.field("gen_seconds", pa.float32()),
    pa.field("finish_reason", pa.string()),
    # parsing and grading
    pa.field("steps", pa.list_(pa.string())),
    pa.field("num_steps", pa.int32()),
    pa.field("answer", pa.string()),
    pa.field("answer_source", pa.string()),
    pa.field("score", pa.float32()),
    pa.field("correct", pa.bool_()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
])

# the chain columns curation reads (teacher_model: which teacher judges its own chains)
CURATE_READS = columns(CHAIN_SCHEMA, (
    "problem_id", "path_index", "category", "difficulty", "question", "gold_answer", "verifier", "metadata",
    "format", "chain", "finish_reason", "steps", "num_steps", "answer", "correct", "output_tokens", "status",
    "teacher_model"))

# --- curate: the judge's ratings -----------------------------------------------------------------
JUDGE_KEY = ("problem_id", "path_index", "chain_sha")
JUDGEMENT_SCHEMA = pa.schema([
    pa.field("problem_id", pa.string(), nullable=False),
    pa.field("path_index", pa.int32(), nullable=False),
    pa.field("chain_sha", pa.string(), nullable=False),   # the judged text: a changed chain is judged again
    pa.field("judge_model", pa.string()),
    pa.field("prompt_messages", pa.string()),
    pa.field("judge_text", pa.string()),
    pa.field("structure", pa.float32()),
    pa.field("clarity", pa.float32()),
    pa.field("confidence", pa.float32()),
    pa.field("score", pa.float32()),                      # mean of the three criteria
    pa.field("justification", pa.string()),
    pa.field("output_tokens", pa.int32()),
    pa.field("status", pa.string()),                      # STATUSES
    pa.field("error", pa.string()),
])

# --- curate: training examples -------------------------------------------------------------------
EXAMPLE_SCHEMA = pa.schema([
    pa.field("example_id", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),        # KINDS
    pa.field("problem_id", pa.string(), nullable=False),
    pa.field("path_index", pa.int32()),                   # null for general examples
    pa.field("category", pa.string()),
    pa.field("difficulty", pa.string()),
    pa.field("format", pa.string()),                      # pre | post (rationale), null otherwise
    pa.field("num_steps", pa.int32()),
    pa.field("messages", pa.string()),                    # JSON chat; the last message is the target
    # how an answer to the problem is checked (jobs.tasks.verify.score), for answer accuracy
    pa.field("gold_answer", pa.string()),
    pa.field("verifier", pa.string()),
    pa.field("metadata", pa.string()),
])

TRAIN_READS = columns(EXAMPLE_SCHEMA, ("messages", "kind"))
ACCURACY_READS = columns(EXAMPLE_SCHEMA, ("kind", "problem_id", "messages", "format", "gold_answer", "verifier",
                                          "metadata"))

# --- curate: one decision per input chain --------------------------------------------------------
DECISION_SCHEMA = pa.schema([
    pa.field("problem_id", pa.string(), nullable=False),
    pa.field("path_index", pa.int32(), nullable=False),
    pa.field("category", pa.string()),
    pa.field("split", pa.string()),            # train | val (set once every problem is decided)
    pa.field("kept", pa.bool_()),
    pa.field("reason", pa.string()),           # why it was dropped (null when kept); jobs.curate.filters.REASONS
    pa.field("num_steps", pa.int32()),
    pa.field("chars", pa.int32()),
    pa.field("output_tokens", pa.int32()),
    pa.field("correct", pa.bool_()),
    pa.field("judge_score", pa.float32()),
])

# --- train: one JSON line per optimizer step (metrics.jsonl), also each checkpoint's history ------
METRIC_FIELDS = {
    "step": "optimizer steps done (1-based)",
    "epoch": "pass over the training set (0-based)",
    "loss": "weighted mean token loss of the step, over all workers",
    "grad_norm": "global gradient norm before clipping (null where DeepSpeed does not report it)",
    "lr": "learning rate of the step",
    "tokens": "real (unpadded) tokens of the step, over all workers",
    "label_tokens": "tokens the loss is computed on",
    "tokens_per_s": "tokens / the step's wall time, data loading included",
    "time": "Unix time at the end of the step",
    "mfu": "GPU only: model FLOPs utilization against the GPUs' dense bf16 peak",
    "val_loss": "at validation steps: weighted token loss on the validation split",
    "val_accuracy": "at validation steps, with val_accuracy_samples: answer accuracy on the sample",
}

# --- evaluate: one row per (model, problem, sample) -------------------------------------------
PREDICTION_KEY = ("target_key", "problem_id", "sample_index")
PREDICTION_SCHEMA = pa.schema([
    # the model
    pa.field("target", pa.string(), nullable=False),       # its label: teacher, base, student, ...
    pa.field("target_key", pa.string(), nullable=False),   # model, prompt and sampling setup (the cache key)
    pa.field("role", pa.string()),                         # teacher | base | student | other
    # the problem
    pa.field("suite", pa.string()),
    pa.field("suite_kind", pa.string()),                   # held_out | general | shifted
    pa.field("problem_id", pa.string(), nullable=False),
    pa.field("source", pa.string()),
    pa.field("category", pa.string()),
    pa.field("difficulty", pa.string()),
    pa.field("question", pa.string()),
    pa.field("gold_answer", pa.string()),
    pa.field("verifier", pa.string()),
    pa.field("metadata", pa.string()),
    # the request
    pa.field("format", pa.string()),
    pa.field("sample_index", pa.int32(), nullable=False),  # 0: greedy; 1..k: sampled
    pa.field("temperature", pa.float32()),
    pa.field("seed", pa.int64()),
    pa.field("prompt_messages", pa.string()),
    pa.field("prompt", pa.string()),
    # the answer
    pa.field("output", pa.string()),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("output_tokens", pa.int32()),
    pa.field("gen_seconds", pa.float32()),
    pa.field("finish_reason", pa.string()),
    pa.field("mean_logprob", pa.float32()),                # mean log-probability of the output's tokens (null: not asked)
    pa.field("answer", pa.string()),
    pa.field("answer_source", pa.string()),
    pa.field("correct", pa.bool_()),
    pa.field("format_failure", pa.bool_()),                # no answer could be read (counted apart from wrong answers)
    pa.field("status", pa.string()),                       # STATUSES
    pa.field("error", pa.string()),
])

# --- evaluate: one row per (model, suite, problem): what the report and the router's calibration use
ITEM_SCHEMA = pa.schema([
    pa.field("target", pa.string(), nullable=False),
    pa.field("role", pa.string()),
    pa.field("suite", pa.string(), nullable=False),
    pa.field("suite_kind", pa.string()),
    pa.field("problem_id", pa.string(), nullable=False),
    pa.field("category", pa.string()),
    pa.field("difficulty", pa.string()),
    pa.field("question", pa.string()),
    pa.field("gold_answer", pa.string()),
    pa.field("answer", pa.string()),                       # the greedy answer
    pa.field("correct", pa.bool_()),                       # the greedy answer's grade (a format failure is wrong)
    pa.field("format_failure", pa.bool_()),
    pa.field("output_tokens", pa.int32()),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("mean_logprob", pa.float32()),                # the greedy answer's
    pa.field("samples", pa.int32()),                       # sampled answers besides the greedy one (k)
    pa.field("samples_correct", pa.int32()),
    pa.field("agreement", pa.float32()),                   # share of the k sampled answers equivalent to the majority (null: k = 0)
    pa.field("majority_correct", pa.bool_()),              # majority@k: the voted answer's grade (verify.vote: a tie
                                                           # goes to the answer sampled first), what the router
                                                           # serves when it reads agreement (null: k = 0)
    pa.field("pass_at_k", pa.float32()),                   # unbiased pass@k over the k samples (null: k = 0)
])
