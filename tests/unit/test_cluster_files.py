"""Cluster definitions: the launcher YAML validates against Ray's own autoscaler schema, the KubeRay
manifests parse and run commands that name configs which exist and validate, and the image's pins
match pyproject.toml's."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import jsonschema
import ray
import yaml

from jobs.cli import STAGES
from jobs.common.config import load_config

REPO = Path(__file__).resolve().parents[2]
MODULE_STAGE = {"jobs.generate": "generate", "jobs.curate": "curate", "jobs.train": "train", "jobs.evaluate": "eval",
                "jobs.pipeline": "run", "jobs.experiment": "experiment"}


def test_the_launcher_yaml_validates_against_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    for f in sorted((REPO / "cluster" / "aws").glob("*.yaml")):
        cfg = yaml.safe_load(f.read_text())
        jsonschema.validate(cfg, schema)
        types = cfg["available_node_types"]
        assert cfg["head_node_type"] in types and sum(t["max_workers"] for t in types.values()) <= cfg["max_workers"]
        assert any(t["resources"].get("GPU") for t in types.values())


def test_every_command_in_the_cluster_files_names_a_config_that_validates():
    import importlib

    files = sorted((REPO / "cluster").rglob("*.yaml"))
    assert files
    for f in files:
        text = f.read_text()
        assert all(isinstance(d, dict) for d in yaml.safe_load_all(text)), f
        for module, cfg in re.findall(r"python -m (jobs\.\w+) --config (configs/\S+\.yaml)", text):
            mod, cls, _ = STAGES[MODULE_STAGE[module]]
            load_config(getattr(importlib.import_module(mod), cls), REPO / cfg)


def test_the_image_pins_what_pyproject_pins():
    docker = (REPO / "infra" / "docker" / "Dockerfile").read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {re.split(r"[\[=<>]", d)[0].lower(): d for d in project["dependencies"] if "==" in d}
    found = re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^"]+)"', docker)
    assert found
    for name, version in found:
        assert name.lower() in pins, f"the image pins {name}, which pyproject.toml does not"
        assert pins[name.lower()].endswith(f"=={version}"), f"{name}: image {version}, pyproject {pins[name.lower()]}"
    assert "pip install --no-cache-dir -e '.[gpu]'" in docker and "COPY serve ./serve" in docker
