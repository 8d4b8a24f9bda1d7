"""The chains dataset: one row per reasoning chain. Documented in docs/schema.md; curation reads it."""

from __future__ import annotations

import pyarrow as pa

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

# status values
OK, UNPARSED, ERROR = "ok", "unparsed", "error"
