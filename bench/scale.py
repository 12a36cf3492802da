"""`scale`: a 100,000-task batch submitted at once, and how many agent loops the pool holds.

Phase 1, the batch: 100,000 one-call tasks (3,000 with `--quick`) submitted in one
`pool.submit`, against a simulator that answers at once.
- `submit_100k_s`: from the `submit` call until the scheduler has taken in every task
  (queued, running or finished).
- `bytes_per_queued_task`: the scheduler process's resident memory at the largest queue,
  minus before the batch, per queued task, minus the task's own pickled size (the payload,
  reported as `payload_bytes`): what holding a task in the queue costs (Ray's pending call,
  the coroutine, the queue entry). `ray_bytes_per_pending_call` is the same measure for a
  bare async actor whose calls only await an event, in the same run: what Ray itself costs.
- `complete_100k_s` and `tasks_per_s`: until every result is back.

Phase 2, concurrency: 2,200 tasks against a simulator that takes 15 s per call (8 s with
`--quick`), with room
for 2,400 loops in two workers. `max_concurrent_loops` is the largest number of requests
the simulator had open at once (each is an agent loop waiting on its LLM call); every task
must succeed.
"""

from __future__ import annotations

import asyncio
import pickle
import time
from pathlib import Path
from typing import Any

import psutil
import ray

from agentpool import AgentPool, AgentTask, PoolConfig, SimulatorConfig
from agentpool.config import AdmissionConfig
from bench.load import require_succeeded
from bench.report import write

SLOW_CALL_MS = 15_000
LOOPS = 2_200


def _task(i: int) -> AgentTask:
    return AgentTask(tenant=f"t{i % 4}", prompt=f"sim: answer ok {i}", max_tokens=64)


def _scheduler_process(pool_name: str) -> psutil.Process:
    """The scheduler's process on this machine (the bench runs a local cluster)."""
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and cmdline[0].startswith("ray::Scheduler"):
            return proc
    raise RuntimeError(f"no scheduler process found for pool {pool_name}")


@ray.remote
class _Holder:
    """A bare async actor whose calls wait until released."""

    def __init__(self) -> None:
        self.released = asyncio.Event()
        self.holding = 0

    async def hold(self, payload: AgentTask) -> int:
        self.holding += 1
        await self.released.wait()
        return 1

    def count(self) -> int:
        return self.holding

    def rss(self) -> int:
        return int(psutil.Process().memory_info().rss)

    def release(self) -> None:
        self.released.set()


def _ray_bytes_per_pending_call(n: int) -> float:
    holder = _Holder.options(num_cpus=0, max_concurrency=n + 100).remote()
    before = ray.get(holder.rss.remote())
    refs = [holder.hold.remote(_task(i)) for i in range(n)]
    while ray.get(holder.count.remote()) < n:
        time.sleep(0.2)
    after = ray.get(holder.rss.remote())
    ray.get(holder.release.remote())
    ray.get(refs)
    ray.kill(holder)
    return (after - before) / n


def _admitted(status: dict[str, Any]) -> int:
    return int(status["queued"]) + int(status["in_flight"]) + sum(status["finished_by_status"].values())


def _batch(n: int) -> dict[str, Any]:
    config = PoolConfig(
        name="bench-scale",
        num_workers=2,
        worker_concurrency=256,
        max_queued=n + 1000,
        simulator=SimulatorConfig(latency_ms=0, latency_sigma=0, seed=1),
        # The whole batch waits its turn: this measures holding it, not shedding it.
        admission=AdmissionConfig(max_queue_wait_s=86_400, target_wait_s=3600),
    )
    with AgentPool.start(config) as pool:
        pool.run([_task(i) for i in range(200)])  # warm up
        scheduler = _scheduler_process(config.name)
        rss_before = scheduler.memory_info().rss
        done_before = _admitted(pool.status())
        tasks = [_task(i) for i in range(n)]
        payload = len(pickle.dumps(tasks[0]))
        started = time.monotonic()
        refs = pool.submit(tasks)
        peak_queued, peak_rss, admitted_s = 0, rss_before, None
        while admitted_s is None:
            status = pool.status()
            rss = scheduler.memory_info().rss
            if status["queued"] > peak_queued:
                peak_queued, peak_rss = int(status["queued"]), rss
            if _admitted(status) - done_before >= n:
                admitted_s = time.monotonic() - started
            else:
                time.sleep(0.2)
        results = ray.get(refs)
        complete_s = time.monotonic() - started
    require_succeeded(results, "scale batch")
    per_task = (peak_rss - rss_before) / max(1, peak_queued)
    return {
        "submit_100k_s": round(admitted_s * 100_000 / n, 2),
        "bytes_per_queued_task": round(per_task - payload),
        "payload_bytes": payload,
        "complete_100k_s": round(complete_s * 100_000 / n, 1),
        "tasks_per_s": round(n / complete_s, 1),
        "batch_size": n,
        "submit_s": round(admitted_s, 2),
        "peak_queued": peak_queued,
        "scheduler_rss_mib_before": round(rss_before / 2**20, 1),
        "scheduler_rss_mib_at_peak": round(peak_rss / 2**20, 1),
    }


def _loops(n: int, slow_call_ms: int) -> dict[str, Any]:
    config = PoolConfig(
        name="bench-loops",
        num_workers=2,
        worker_concurrency=(n + 200) // 2,
        max_queued=n + 1000,
        simulator=SimulatorConfig(latency_ms=slow_call_ms, latency_sigma=0, seed=2),
        llm_request_timeout_s=slow_call_ms / 1000 * 4,
    )
    with AgentPool.start(config) as pool:
        started = time.monotonic()
        results = pool.run([_task(i) for i in range(n)])
        elapsed = time.monotonic() - started
        stats = pool.simulator_stats() or {}
    require_succeeded(results, "concurrent loops")
    return {
        "max_concurrent_loops": int(stats.get("max_in_flight", 0)),
        "loops_offered": n,
        "loops_wall_s": round(elapsed, 1),
        "slow_call_s": slow_call_ms / 1000,
    }


def run(out: Path, quick: bool) -> dict[str, Any]:
    n = 3_000 if quick else 100_000
    slow_call_ms = 8_000 if quick else SLOW_CALL_MS
    figures = _batch(n) | _loops(LOOPS, slow_call_ms)
    figures["ray_bytes_per_pending_call"] = round(_ray_bytes_per_pending_call(5_000 if quick else 20_000))
    notes = (
        f"Batch: {n:,} one-call tasks in one submit, zero-latency simulator, 2 workers x 256 loops; figures "
        "scaled to 100k where the batch is smaller (--quick). Memory: the scheduler's RSS at the largest queue "
        f"over its RSS before, per queued task, less the pickled task. Loops: {LOOPS:,} tasks against a "
        f"simulator taking {slow_call_ms / 1000:g} s per call, room for {LOOPS + 200:,} loops in 2 workers. Ray's "
        "own cost per waiting call: a bare async actor holding 20,000 of them (5,000 with --quick)."
    )
    write(out, "scale", figures=figures, notes=notes, config={"quick": quick, "batch": n, "loops": LOOPS})
    return figures
