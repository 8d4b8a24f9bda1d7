"""The generate stage on GPU replicas: the same pipeline with use_gpu and engine-side seeds.
The CPU path of the same code is covered by tests/integration/test_generate.py."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from jobs.common.config import build
from jobs.generate.config import GenerateConfig
from jobs.generate.main import main

pytestmark = [pytest.mark.gpu, pytest.mark.integration]


def test_generate_on_gpu_with_seeds_is_reproducible(tmp_path, tiny_model, ray_session):
    def run(name):
        cfg = build(GenerateConfig, {
            "out_dir": str(tmp_path / name), "paths_per_problem": 2,
            "sources": [{"type": "reasoning_gym", "tasks": [{"name": "chain_sum", "size": 4}]}],
            "teacher": {"model": str(tiny_model), "use_gpu": True, "gpu_memory_utilization": 0.3},
            "sampling": {"max_tokens": 16},
        })
        assert cfg.teacher.seeds_to_engine()
        main(cfg, log=lambda *_: None)
        return {(r["problem_id"], r["path_index"]): r["chain"] for r in pq.read_table(tmp_path / name / "chains").to_pylist()}

    first, second = run("a"), run("b")
    assert len(first) == 8 and first == second  # per-chain seeds make GPU sampling reproducible
