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
from tests.scenarios import cancel_background, start_in_background

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tests of modules with `SCENARIOS` run last, so that the rest of the suite runs
    while their scenarios run in the background (and their reports are ready when they come)."""
    if os.environ.get("AGENTPOOL_TEST_SCENARIOS_INLINE"):
        return
    items.sort(key=lambda item: bool(getattr(getattr(item, "module", None), "SCENARIOS", None)))


@pytest.fixture(scope="session", autouse=True)
def scenarios_in_background(request: pytest.FixtureRequest) -> Iterator[None]:
    """Starts the scenarios the selected test modules list in `SCENARIOS` (clusters of their
    own, in subprocesses) in a background thread, so that their waiting overlaps the rest of
    the suite (`tests/scenarios.py`)."""
    runs: list[tuple[str, ...]] = []
    seen: set[str] = set()
    for item in request.session.items:
        module = item.module
        if module is not None and module.__name__ not in seen:
            seen.add(module.__name__)
            runs += getattr(module, "SCENARIOS", [])
    if runs and not os.environ.get("AGENTPOOL_TEST_SCENARIOS_INLINE"):
        start_in_background(runs, request.getfixturevalue("redis_url"))
    yield
    cancel_background()


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
