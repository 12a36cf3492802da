"""`ray-cluster.yaml` validates against Ray's own autoscaler schema (no cloud access needed)."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent


def test_ray_cluster_yaml_is_valid() -> None:
    config = yaml.safe_load((ROOT / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    text = (ROOT / "ray-cluster.yaml").read_text()
    assert "sk-ant" not in text and "ANTHROPIC_API_KEY:" not in text  # no secrets in the file
    assert config["idle_timeout_minutes"] > 0
