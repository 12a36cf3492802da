"""The smallest pool a test needs: one worker, a fast simulator, fresh names and keys."""

from __future__ import annotations

import uuid

from agentpool import PoolConfig, SimulatorConfig


def small_config(redis_url: str, *, tag: str = "p", **overrides: object) -> PoolConfig:
    """A one-worker pool on `redis_url`, named `<tag><random>` with a key prefix of its own."""
    base: dict[str, object] = {
        "name": f"{tag}{uuid.uuid4().hex[:8]}",
        "key_prefix": f"t{uuid.uuid4().hex[:8]}",
        "redis_url": redis_url,
        "simulator": SimulatorConfig(latency_ms=1, latency_sigma=0),
        "num_workers": 1,
        "worker_concurrency": 8,
    }
    return PoolConfig(**{**base, **overrides})
