"""`batch`: a batch of one-call tasks through the pool vs. the same calls made directly.

Baseline, in the same run and against the same simulator: `AsyncAnthropic.messages.create`
from one process with the same concurrency. The ratio says what the pool's machinery
(admission, Ray hops, Redis writes, events) costs; the mixed demo batch's wall time is
reported beside it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import anthropic
import ray

from agentpool import AgentPool, AgentTask, PoolConfig
from agentpool.batch_view import demo_tasks
from agentpool.simulator import SimulatorConfig, SimulatorServer
from bench.report import latency_cdf, percentile, write


async def _direct(url: str, n: int, concurrency: int) -> tuple[float, list[float]]:
    client = anthropic.AsyncAnthropic(api_key="bench", base_url=url, max_retries=0)
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(i: int) -> None:
        started = time.monotonic()  # from submission, like the pool's total_ms: queue wait included
        async with gate:
            await client.messages.create(
                model="claude-sonnet-4-5",
                max_tokens=64,
                messages=[{"role": "user", "content": f"sim: answer direct {i}"}],
            )
            latencies.append((time.monotonic() - started) * 1000)

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(n)))
    return time.monotonic() - started, latencies


def _pool_batch(pool: AgentPool, tasks: list[AgentTask]) -> tuple[float, list[float], list[str]]:
    started = time.monotonic()
    results = ray.get(pool.submit(tasks))
    wall = time.monotonic() - started
    return wall, [r.timings.total_ms for r in results], [r.status for r in results]


def run(out: Path, quick: bool) -> dict[str, Any]:
    n = 200 if quick else 2000
    sim_config = SimulatorConfig(latency_ms=20, latency_sigma=0.3, seed=7)
    with SimulatorServer(sim_config) as sim:
        config = PoolConfig(
            name="bench-batch",
            anthropic_base_url=sim.url,
            anthropic_api_key="bench",
            num_workers=2,
            worker_concurrency=64,
        )
        concurrency = config.num_workers * config.worker_concurrency
        direct_wall, direct_lat = asyncio.run(_direct(sim.url, n, concurrency))
        with AgentPool.start(config) as pool:
            _pool_batch(pool, [AgentTask(tenant="warmup", prompt="sim: answer w") for _ in range(20)])
            tasks = [AgentTask(tenant=f"t{i % 3}", prompt=f"sim: answer pooled {i}") for i in range(n)]
            pool_wall, pool_lat, statuses = _pool_batch(pool, tasks)
            demo_wall, _, demo_statuses = _pool_batch(pool, demo_tasks(100, ["acme", "globex", "initech"]))
    figures = {
        "tasks": n,
        "pool_tasks_per_s": round(n / pool_wall, 2),
        "direct_tasks_per_s": round(n / direct_wall, 2),
        "throughput_ratio": round(direct_wall / pool_wall, 4),
        "pool_p50_ms": round(percentile(pool_lat, 0.5), 2),
        "pool_p99_ms": round(percentile(pool_lat, 0.99), 2),
        "direct_p50_ms": round(percentile(direct_lat, 0.5), 2),
        "direct_p99_ms": round(percentile(direct_lat, 0.99), 2),
        "succeeded_fraction": statuses.count("succeeded") / n,
        "demo_100_wall_s": round(demo_wall, 3),
        "demo_100_succeeded": demo_statuses.count("succeeded"),
    }
    out.mkdir(parents=True, exist_ok=True)
    plot = latency_cdf(out, "batch", {"agentpool": pool_lat, "direct AsyncAnthropic": direct_lat})
    notes = (
        "Latency is end to end per task (pool: admission to final record in Redis; direct: one "
        "SDK call). Both at the same concurrency against the same in-process simulator."
    )
    write(
        out,
        "batch",
        figures=figures,
        notes=notes,
        plots=[plot],
        config={"n": n, "quick": quick, "simulator": sim_config.model_dump(), "concurrency": concurrency},
    )
    return figures
