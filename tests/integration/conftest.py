"""Fixtures the integration tests share, made once per session: the synthetic curated set and one
trained LoRA student of the tiny model (its export, resume and evaluation tests all read it)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from jobs.common.runs import PartWriter
from jobs.common.schemas import EXAMPLE_SCHEMA
from shared import LORA, config, example


@pytest.fixture(scope="session")
def curated(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("curated")
    train = [example(i, "rationale") for i in range(48)] + [example(100 + i, "general") for i in range(8)]
    val = [example(200 + i, "rationale") for i in range(8)]
    PartWriter(root / "train", EXAMPLE_SCHEMA).write(pa.Table.from_pylist(train, schema=EXAMPLE_SCHEMA))
    PartWriter(root / "val", EXAMPLE_SCHEMA).write(pa.Table.from_pylist(val, schema=EXAMPLE_SCHEMA))
    return root


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, curated, tiny_model, ray_session):
    """One uninterrupted LoRA run (2 workers, ZeRO-2): (out_dir, manifest, log lines)."""
    from jobs.train.main import main

    out = tmp_path_factory.mktemp("lora") / "student"
    lines: list[str] = []
    manifest = main(config(curated, out, tiny_model, **LORA), log=lines.append)
    return out, manifest, lines
