"""The cluster configs validate against Ray's own autoscaler schema (no cloud access needed),
and keep to what the pool and its operators rely on."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ["ray-cluster.yaml", "cluster/onprem.yaml"]


def _load(name: str) -> tuple[str, dict[str, Any]]:
    text = (ROOT / name).read_text()
    return text, yaml.safe_load(text)


@pytest.mark.parametrize("name", CONFIGS)
def test_validates_against_rays_schema(name: str) -> None:
    _, config = _load(name)
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("name", CONFIGS)
def test_secrets_stay_out_and_auth_stays_on(name: str) -> None:
    text, config = _load(name)
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"sk-ant|ANTHROPIC_API_KEY\s*[:=]\s*\S|AGENTPOOL_REDIS_URL\s*[:=]\s*redis", text)
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = [c for c in commands if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start)
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # the dashboard is never exposed
    assert any(target.endswith(".ray/auth_token") for target in config["file_mounts"])


def test_aws_node_types_carry_the_resources_the_pool_places_by() -> None:
    _, config = _load("ray-cluster.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and head["resources"]["agentpool_head"] >= 1  # no agent work
    assert types["agent_worker"]["resources"]["agent_worker"] >= 1
    assert types["agent_worker"]["max_workers"] > types["agent_worker"]["min_workers"]  # it autoscales
    assert types["tool_executor"]["min_workers"] == 0 and types["tool_executor"]["resources"]["tool_executor"] >= 1
    installs = " ".join(config["setup_commands"])
    assert "pip install -e /home/ubuntu/agentpool" in installs
