"""Config loading: every YAML under configs/ validates; bad input names the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

import importlib

from jobs.cli import STAGES
from jobs.common.config import ConfigError, load_config
from jobs.generate.config import GenerateConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# configs/<stage>/... belongs to that stage's config class (the command's)
STAGE_CLASSES = {stage: getattr(importlib.import_module(mod), cls) for stage, (mod, cls, _) in STAGES.items()}
STAGE_CLASSES["experiments"] = STAGE_CLASSES.pop("experiment")
STAGE_CLASSES["pipelines"] = STAGE_CLASSES.pop("run")


def all_yamls():
    return sorted(p for p in CONFIGS.rglob("*.y*ml"))


def test_every_config_is_covered():
    files = all_yamls()
    assert files, "no YAML found under configs/"
    for p in files:
        assert p.relative_to(CONFIGS).parts[0] in STAGE_CLASSES, f"{p}: no stage owns this folder"


@pytest.mark.parametrize("path", all_yamls(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_file_loads(path):
    cls = STAGE_CLASSES[path.relative_to(CONFIGS).parts[0]]
    cfg = load_config(cls, path)
    assert cfg.out_dir if hasattr(cfg, "out_dir") else cfg.student and cfg.teacher


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = """
out_dir: runs/x
teacher: {model: smollm2-135m-instruct}
sources: [{type: reasoning_gym, tasks: [{name: chain_sum, size: 2}]}]
"""


def test_overrides_reach_nested_keys_and_keep_types(tmp_path):
    cfg = load_config(GenerateConfig, write(tmp_path, BASE), ["paths_per_problem=3", "sampling.temperature=0.5",
                                                              "teacher.concurrency=[1,4]", "out_dir=2024",
                                                              "prompt.granularity=5"])
    assert cfg.paths_per_problem == 3 and cfg.sampling.temperature == 0.5
    assert cfg.teacher.concurrency == (1, 4)
    assert cfg.out_dir == "2024"  # a string field keeps the text as typed
    assert cfg.prompt.granularity == 5


@pytest.mark.parametrize("extra, message", [
    ("paths_per_problm: 3", "unknown key 'paths_per_problm'"),
    ("sampling: {temprature: 1.0}", "unknown key 'sampling.temprature'"),
    ("paths_per_problem: many", "paths_per_problem: expected an integer, got 'many'"),
    ("sampling: {temperature: hot}", "sampling.temperature: expected a number"),
    ("prompt: {format: sideways}", "prompt.format: must be one of 'pre', 'post', 'adaptive'"),
    ("prompt: {granularity: medium}", "granularity must be 'coarse', 'fine' or a number"),
    ("teacher: {model: m, concurrency: [3, 1]}", "concurrency must be (min, max)"),
    ("teacher: {model: m, backend: openai}", "needs base_url"),
    ("overwrite: yes please", "overwrite: expected true or false"),
])
def test_bad_values_name_key_and_file(tmp_path, extra, message):
    path = write(tmp_path, BASE + extra + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(GenerateConfig, path)
    assert message in str(e.value)
    assert str(path) in str(e.value)


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'teacher'"):
        load_config(GenerateConfig, write(tmp_path, "out_dir: x\nsources: []\n"))


def test_source_type_must_be_known(tmp_path):
    text = BASE.replace("type: reasoning_gym", "type: csv")
    with pytest.raises(ConfigError, match=r"sources\[0\].type: must be one of 'reasoning_gym', 'jsonl', 'parquet', 'hf'"):
        load_config(GenerateConfig, write(tmp_path, text))


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(GenerateConfig, write(tmp_path, BASE), ["paths_per_problem"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(GenerateConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(GenerateConfig, write(tmp_path, "a: [1,\n"))


@pytest.mark.parametrize("path", sorted((CONFIGS / "pipelines").glob("*.yaml")) + sorted((CONFIGS / "experiments").glob("*.yaml")),
                         ids=lambda p: str(p.relative_to(CONFIGS)))
def test_pipelines_and_experiments_plan_every_stage(path):
    """A pipeline or experiment loads and checks every stage config it names, with its overrides
    applied and its paths pointed into its run directory, before anything runs."""
    from jobs.experiment.main import plan
    from jobs.pipeline.main import pipeline_stages

    cls = STAGE_CLASSES[path.parent.name]
    cfg = load_config(cls, path)
    if path.parent.name == "pipelines":
        stages = [pipeline_stages(cfg)]
    else:
        stages = list(plan(cfg).values())
    for s in stages:
        assert Path(s.curate.chains) == Path(s.generate.out_dir) / "chains"
        assert Path(s.train.data) == Path(s.curate.out_dir) and s.eval.student == s.train.out_dir
    if path.parent.name == "experiments":
        variants = {v.name: v for v in cfg.variants}
        for name, s in zip(variants, stages):
            for item in variants[name].curate:  # each variant's own overrides reach its stage
                key, value = item.split("=", 1)
                node = s.curate
                for part in key.split("."):
                    node = getattr(node, part)
                assert str(node) == value or float(node) == float(value), (name, item)
