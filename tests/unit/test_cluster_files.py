"""Cluster definitions: the launcher YAML validates against Ray's own autoscaler schema, the KubeRay
manifests parse and run commands that name configs which exist and validate, and the image's pins
match pyproject.toml's."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
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
        for module, cfg, overrides in re.findall(r"python -m (jobs\.\w+) --config (configs/\S+\.yaml)((?: [\w.]+=\S+)*)", text):
            mod, cls, _ = STAGES[MODULE_STAGE[module]]
            load_config(getattr(importlib.import_module(mod), cls), REPO / cfg, overrides.split())


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


def _k8s_documents():
    docs = []
    for f in sorted((REPO / "cluster" / "k8s").rglob("*.yaml")):
        docs += [(f.relative_to(REPO), d) for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def test_the_kuberay_manifests_validate_against_the_v1_api():
    from kuberay_v1 import SCHEMAS

    docs = _k8s_documents()
    kinds = {}
    for path, d in docs:
        if d.get("apiVersion") == "ray.io/v1":
            jsonschema.validate(d, SCHEMAS[d["kind"]])
        kinds.setdefault(d["kind"], []).append((path, d))
    assert {"RayCluster", "RayJob", "RayService", "PersistentVolumeClaim"} <= set(kinds), sorted(kinds)
    # the long-lived cluster autoscales GPU groups from zero
    (_, cluster), = kinds["RayCluster"]
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] and spec["rayVersion"] == ray.__version__
    gpu = [g for g in spec["workerGroupSpecs"] if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert len(gpu) >= 2 and all(g["minReplicas"] < g["maxReplicas"] for g in gpu)
    # a RayJob for every stage and one for the pipeline, each on a cluster that exists
    clusters = {d["metadata"]["name"] for _, d in kinds["RayCluster"]}
    modules = set()
    for path, job in kinds["RayJob"]:
        s = job["spec"]
        modules.add(re.match(r"python -m (jobs\.\w+) ", s["entrypoint"]).group(1))
        assert ("rayClusterSpec" in s) != ("clusterSelector" in s), f"{path}: a cluster of its own or a selected one"
        if "clusterSelector" in s:
            assert s["clusterSelector"]["ray.io/cluster"] in clusters, path
        if "rayClusterSpec" in s:
            assert s["rayClusterSpec"]["rayVersion"] == ray.__version__, path
    assert modules == {"jobs.generate", "jobs.curate", "jobs.train", "jobs.evaluate", "jobs.pipeline"}
    # every volume claim a pod names is defined, and every image is the one infra/docker builds
    claims = {d["metadata"]["name"] for _, d in kinds["PersistentVolumeClaim"]}
    text = "\n".join(f.read_text() for f in (REPO / "cluster" / "k8s").rglob("*.yaml"))
    assert set(re.findall(r"claimName: ([\w-]+)", text)) <= claims
    built = re.search(r"docker build -f infra/docker/Dockerfile -t (\S+) \.", (REPO / "infra/docker/Dockerfile").read_text())
    assert set(re.findall(r"image: (\S+)", text)) == {built.group(1)}


def test_the_rayservice_deploys_cotds_router_from_a_serve_config_that_validates():
    import importlib

    from ray.serve.schema import ServeDeploySchema

    from serve.config import ServeConfig

    services = [(p, d) for p, d in _k8s_documents() if d["kind"] == "RayService"]
    assert services
    for path, svc in services:
        app_spec = ServeDeploySchema.parse_obj(yaml.safe_load(svc["spec"]["serveConfigV2"]))
        for app in app_spec.applications:
            module, _, attr = app.import_path.partition(":")
            assert callable(getattr(importlib.import_module(module), attr)), path
            cfg = load_config(ServeConfig, REPO / app.args["config"], app.args.get("overrides", []))
            needed = cfg.student.scaling.gpus * cfg.student.scaling.min_replicas + cfg.teacher.scaling.gpus * cfg.teacher.scaling.min_replicas
            groups = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
            have = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) * g["maxReplicas"]
                       for g in groups)
            assert needed <= have, f"{path}: the router's minimum replicas need {needed} GPUs, its cluster has at most {have}"


def test_the_v1_schema_refuses_what_kuberay_would():
    import copy

    from kuberay_v1 import SCHEMAS

    (_, cluster), = [(p, d) for p, d in _k8s_documents() if d["kind"] == "RayCluster"]
    jsonschema.validate(cluster, SCHEMAS["RayCluster"])
    bad = []
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3              # not a v1 field
    bad.append(typo)
    number = copy.deepcopy(cluster)
    number["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 4  # rayStartParams values are strings
    bad.append(number)
    quantity = copy.deepcopy(cluster)
    quantity["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "64 GB"
    bad.append(quantity)
    mode = copy.deepcopy(cluster)
    mode["spec"]["autoscalerOptions"]["upscalingMode"] = "Fast"
    bad.append(mode)
    for b in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(b, SCHEMAS["RayCluster"])
