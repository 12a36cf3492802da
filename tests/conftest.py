"""Real parts only: one local Ray for the session, a real redis-server, and the simulated
provider over HTTP with the official SDK as its client."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import ray
import redis
from hypothesis import Phase, settings

from agentpool.cluster.redis_server import EmbeddedRedis
from agentpool.launch import start_local_ray
from agentpool.simulator import SimulatorConfig, SimulatorServer

# `python -m bench mutation` judges mutants with this profile: the same examples every run,
# and no example database, so a verdict depends on the code and the tests alone; no
# shrinking, since a mutant needs one failing example, not the smallest.
settings.register_profile(
    "mutation",
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    report_multiple_bugs=False,
)
if os.environ.get("HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    if not ray.is_initialized():
        start_local_ray(
            num_cpus=2, namespace="agentpool", include_dashboard=False, log_to_driver=False, configure_logging=False
        )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("AGENTPOOL_REDIS_URL")
    if url:
        yield url
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def key_prefix() -> str:
    """A fresh key prefix per test, so tests sharing one Redis never see each other's keys."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def sim_server() -> Iterator[SimulatorServer]:
    server = SimulatorServer(SimulatorConfig(latency_ms=1, latency_sigma=0))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def sim(sim_server: SimulatorServer) -> Iterator[SimulatorServer]:
    """The session's simulator, reset to a fast, limit-free configuration for this test."""
    sim_server.sim.configure(SimulatorConfig(latency_ms=1, latency_sigma=0))
    yield sim_server
