"""A rolling upgrade of a running pool (`pool.upgrade`, `agentpool upgrade`) on a real pool,
mid-batch: every process restarts in turn (workers, then executors, then the control plane)
and runs the code installed now, while no accepted task is lost or gets two records."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import ray
import redis
from typer.testing import CliRunner

from agentpool import AgentPool, AgentTask
from agentpool.cli import app
from tests.pools import small_config
from tests.toolkit import nap_tasks

pytestmark = pytest.mark.usefixtures("ray_session")

TESTS = Path(__file__).resolve().parent
#: A tool module as two releases would ship it: each call appends its release to a file.
RELEASE = '''"""A tool whose release an upgrade changes (written by tests/test_upgrade.py)."""

from agentpool import tool

RELEASE = "{release}"


@tool
def release(path: str) -> str:
    """Appends this release's name to a file.

    Args:
        path: The file.
    """
    with open(path, "a") as marks:
        marks.write(RELEASE + "\\n")
    return RELEASE
'''


def pids(pool: AgentPool) -> dict[str, int]:
    """Every restartable actor of the pool, by name: its process id."""
    names = ray.get(pool._scheduler.info.remote())["actors"]
    prefix = f"{pool.config.name}-"
    out = {}
    for name in names:
        if name.removeprefix(prefix) in ("simulator", "redis"):
            continue  # hosts are never restarted (a new one would have a new port)
        out[name] = ray.get(ray.get_actor(name, namespace="agentpool").pid.remote(), timeout=30)
    return out


def test_an_upgrade_mid_batch_restarts_every_process_onto_the_new_release_and_loses_nothing(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    module = f"_release_{uuid.uuid4().hex[:8]}"
    source = TESTS / f"{module}.py"
    source.write_text(RELEASE.format(release="v1"))
    marks = tmp_path / "marks"
    probe = AgentTask(
        tenant="acme", prompt=f'sim: tool release {{"path": "{marks}"}}\nsim: answer done', tools=["release"]
    )
    cfg = small_config(
        redis_url,
        tag="up",
        tool_modules=["tests.toolkit", f"tests.{module}"],
        num_workers=2,
        worker_concurrency=4,
        num_tool_executors=2,
        run_lease_s=5,  # a run cut short holds its lease until it lapses
    )
    try:
        with AgentPool.start(cfg) as pool:
            (first,) = pool.run([probe.model_copy(update={"task_id": "before"})])
            before = pids(pool)
            tasks = nap_tasks(24, 0.5)
            refs = pool.submit(tasks)
            ray.wait(refs, num_returns=2, timeout=30)
            source.write_text(RELEASE.format(release="v2-the-new-release"))  # installed on every node
            report = pool.upgrade(grace_s=10.0)
            results = ray.get(refs, timeout=180)
            (after,) = pool.run([probe.model_copy(update={"task_id": "after"})])
            after_pids = pids(pool)
    finally:
        source.unlink()
    assert first.status == after.status == "succeeded"
    assert marks.read_text().split() == ["v1", "v2-the-new-release"]  # the executors run the new code
    assert [r.status for r in results] == ["succeeded"] * len(tasks)
    stream = f"{cfg.key_prefix}:{{acme}}:results"
    counts = Counter(fields["task_id"] for _, fields in redis_client.xrange(stream))
    assert all(counts[t.task_id] == 1 for t in tasks), counts  # none lost, none twice
    assert set(before) == set(after_pids) and all(after_pids[n] != before[n] for n in before)  # every one restarted
    assert [w["name"] for w in report["workers"]] == [cfg.worker_name(0), cfg.worker_name(1)]
    assert all(w["pid"] == after_pids[w["name"]] and w["took_s"] < 60 for w in report["workers"])
    assert len(report["executors"]) == 2
    roles = [c["name"].removeprefix(f"{cfg.name}-") for c in report["control"]]
    assert roles[0] == "limiter" and roles[-1] == "scheduler" and {"tools", "relay", "webhooks-0"} <= set(roles)


def test_a_task_that_outlasts_its_workers_grace_period_resumes_elsewhere_from_its_checkpoint(
    redis_url: str, redis_client: redis.Redis
) -> None:
    cfg = small_config(
        redis_url, tag="ug", tool_modules=["tests.toolkit"], num_workers=2, worker_concurrency=2, run_lease_s=5
    )
    with AgentPool.start(cfg) as pool:
        tasks = nap_tasks(4, 6.0)
        refs = pool.submit(tasks)
        deadline = time.monotonic() + 30
        while pool.status()["in_flight"] < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        report = pool.upgrade(grace_s=1.0)
        results = ray.get(refs, timeout=180)
    assert sum(w["cut_short"] for w in report["workers"]) >= 2  # worker-0's naps outlasted its grace
    assert [r.status for r in results] == ["succeeded"] * 4
    assert sum(r.resumes for r in results) >= 2 and sum(r.llm_calls_saved for r in results) >= 2
    stream = f"{cfg.key_prefix}:{{acme}}:results"
    counts = Counter(fields["task_id"] for _, fields in redis_client.xrange(stream))
    assert all(counts[t.task_id] == 1 for t in tasks), counts


def test_agentpool_upgrade_prints_what_it_restarted(redis_url: str) -> None:
    cfg = small_config(redis_url, tag="uc", tool_modules=["tests.toolkit"])
    with AgentPool.start(cfg, detached=True) as pool:
        done = CliRunner().invoke(app, ["upgrade", "--grace", "5", "--name", cfg.name])
        assert done.exit_code == 0, done.output
        assert f"{cfg.worker_name(0)}: pid " in done.output and f"{cfg.name}-scheduler: pid " in done.output
        assert "upgraded in" in done.output
        (result,) = pool.run(nap_tasks(1, 0.1))
        assert result.status == "succeeded"
        pool.terminate()
