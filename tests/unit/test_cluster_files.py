"""Cluster definitions parse, and the commands they run name configs that exist and validate."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from jobs.common.config import load_config
from jobs.generate.config import GenerateConfig

REPO = Path(__file__).resolve().parents[2]


def test_cluster_yamls_parse_and_point_at_real_configs():
    files = sorted((REPO / "cluster").glob("*.yaml"))
    assert files
    for f in files:
        text = f.read_text()
        assert isinstance(yaml.safe_load(text), dict), f
        for cfg in re.findall(r"--config (configs/\S+\.yaml)", text):
            load_config(GenerateConfig, REPO / cfg)


def test_rayjob_runs_the_generate_entrypoint():
    job = yaml.safe_load((REPO / "cluster" / "rayjob-generate.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["entrypoint"].startswith("python -m jobs.generate --config ")
