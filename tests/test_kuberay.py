"""The KubeRay manifests (`cluster/kuberay/`) validate against KubeRay v1.7.0's CRD schemas
(`tests/data/kuberay/`, see its PROVENANCE.md) the way `kubectl apply` checks them with its
default strict field validation (an unknown field is an error; the CRDs' CEL rules are not
evaluated here), and keep to what the pool relies on, as `ray-cluster.yaml` does: the same
groups and custom resources, autoscaling on, secrets from Kubernetes Secrets, token auth on,
and room for the drain before a stop."""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

from tests.test_readme import _parse_agentpool

ROOT = Path(__file__).resolve().parent.parent
KUBERAY = ROOT / "cluster" / "kuberay"
SCHEMAS = Path(__file__).resolve().parent / "data" / "kuberay"
MANIFESTS = {"raycluster.yaml": "raycluster", "rayjob.yaml": "rayjob"}


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever the CRD lists an object's fields and
    does not keep unknown ones (`x-kubernetes-preserve-unknown-fields`), as the API server
    does under strict field validation."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    keeps = out.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in out
    if "properties" in out and not keeps:
        out["additionalProperties"] = False
    return out


def validator(kind: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(strict(json.loads((SCHEMAS / f"{kind}.v1.schema.json").read_text())))


def load(name: str) -> tuple[str, dict[str, Any]]:
    text = (KUBERAY / name).read_text()
    return text, yaml.safe_load(text)


def problems(kind: str, manifest: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(kind).iter_errors(manifest)]


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_validates_against_the_kuberay_crd(name: str) -> None:
    _, manifest = load(name)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert problems(MANIFESTS[name], manifest) == []


def test_the_validation_catches_an_unknown_field_and_a_wrong_type() -> None:
    _, manifest = load("raycluster.yaml")
    typo = copy.deepcopy(manifest)
    typo["spec"]["workerGroupSpec"] = typo["spec"].pop("workerGroupSpecs")
    assert any("workerGroupSpec" in p for p in problems("raycluster", typo))
    wrong = copy.deepcopy(manifest)
    wrong["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "16"
    assert any(p.startswith("spec.workerGroupSpecs.0.maxReplicas") for p in problems("raycluster", wrong))
    deep = copy.deepcopy(manifest)
    deep["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["envv"] = []
    assert any("envv" in p for p in problems("raycluster", deep))
    mode = copy.deepcopy(manifest)
    mode["spec"]["authOptions"]["mode"] = "tokens"
    assert any(p.startswith("spec.authOptions.mode") for p in problems("raycluster", mode))


def groups(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["groupName"]: g for g in manifest["spec"]["workerGroupSpecs"]}


def containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    spec = manifest["spec"]
    pods = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
    return [c for pod in pods for c in pod["spec"]["containers"]]


def test_the_groups_carry_the_resources_the_pool_places_by_as_ray_cluster_yaml_does() -> None:
    _, manifest = load("raycluster.yaml")
    aws = yaml.safe_load((ROOT / "ray-cluster.yaml").read_text())["available_node_types"]
    spec = manifest["spec"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and int(head["resources"]["agentpool_head"]) >= 1  # no agent work
    by_name = groups(manifest)
    assert set(by_name) == {"agent-worker", "tool-executor"}
    for group, node_type in (("agent-worker", "agent_worker"), ("tool-executor", "tool_executor")):
        declared = by_name[group]
        resources = {k: int(v) for k, v in declared["resources"].items()}
        assert resources == {node_type: aws[node_type]["resources"][node_type]}  # the same slots per node
        assert int(declared["rayStartParams"]["num-cpus"]) == aws[node_type]["resources"]["CPU"]
        assert declared["maxReplicas"] == aws[node_type]["max_workers"]
        assert declared["minReplicas"] == aws[node_type]["min_workers"]
        assert declared["minReplicas"] <= declared["replicas"] <= declared["maxReplicas"]
    assert by_name["agent-worker"]["maxReplicas"] > by_name["agent-worker"]["minReplicas"]  # it autoscales
    assert by_name["tool-executor"]["minReplicas"] == 0
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0


def test_secrets_come_from_kubernetes_secrets_and_auth_stays_on() -> None:
    text, manifest = load("raycluster.yaml")
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"sk-ant|rediss?://", code)
    assert manifest["spec"]["authOptions"] == {"mode": "token"}
    for container in containers(manifest):
        env = {e["name"]: e for e in container["env"]}
        for name in ("ANTHROPIC_API_KEY", "AGENTPOOL_REDIS_URL"):
            assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["key"] == name
        assert "RAY_AUTH_MODE" not in env  # KubeRay sets it, with the token, from authOptions


def test_the_image_is_rays_own_at_the_clusters_version_with_the_project_installed() -> None:
    _, manifest = load("raycluster.yaml")
    version = manifest["spec"]["rayVersion"]
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(version)}-py3\d+$", dockerfile, re.M)
    assert "pip install --no-cache-dir /home/ray/agentpool" in dockerfile
    images = {c["image"] for c in containers(manifest)}
    assert len(images) == 1  # one image everywhere: the same code on every pod
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ray = next(Requirement(d) for d in project["dependencies"] if d.startswith("ray["))
    assert ray.specifier.contains(version)


def test_a_stop_leaves_the_pool_room_to_drain_and_the_commands_parse() -> None:
    _, cluster = load("raycluster.yaml")
    _, job = load("rayjob.yaml")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    entry = shlex.split(job["spec"]["entrypoint"])
    assert entry[:3] == ["agentpool", "start", "--supervise"]
    _parse_agentpool(entry)
    grace = float(entry[entry.index("--grace") + 1])
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in head["containers"][0]["env"]}
    assert float(env["RAY_JOB_STOP_WAIT_TIME_S"]) > grace  # SIGKILL only after the drain's grace
    stop = shlex.split(head["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1])
    stop = stop[: stop.index("||")]
    _parse_agentpool(stop)
    assert stop[:2] == ["agentpool", "stop"] and head["terminationGracePeriodSeconds"] > float(stop[-1])
    assert json.loads(job["spec"]["entrypointResources"]) == {"agentpool_head": 0.01}
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["AGENTPOOL_NAME"] == env["AGENTPOOL_NAME"]
