"""`overhead`: what the pipeline costs on top of Ray and of the SDK, with a provider that costs nothing.

The simulator answers at once (zero latency) and every task is one LLM call, so what is
measured is ours: admission, queueing, dispatch, the worker's loop, the rate-limit lease,
the result write and the events.

- `throughput_ratio`: tasks per second through the pool (a batch submitted at once) over
  a bare Ray client -> actor -> actor echo of the same size, measured in the same run (the
  least any Ray pipeline of this shape costs). The two alternate, `ROUNDS` times, each
  batch between two runs of the echo and set against their mean; the figure is the median
  of the rounds' ratios (`throughput_ratio_rounds`). On this shared machine the echo's rate
  moved by a fifth between runs minutes apart, and the pool's by less: one echo before the
  pool and one after it, as this bench did first, let that drift decide the ratio. The
  echo runs while the pool idles (an idle pool did not slow a bare round trip: 2.39 ms
  against 2.31-2.46 without it).
- `map_throughput_ratio`: the same batch through `pool.map` (detached submission, records
  read from Redis) over the same echoes, the same way.
- `cpu_ms_per_task`, `cpu_ms_per_task_by_role`, `map_cpu_ms_per_task`: what the `submit`
  (and `map`) batches cost in CPU per task, over this process and every process it started
  (Ray's, Redis, the simulator's), by role: `driver`, `relay`, `scheduler`, `workers`,
  `simulator`, `redis`, and `ray_other` (raylet, GCS, the pool's idle actors). Medians of
  the rounds. Both runs are CPU-bound on a small machine, so where a throughput ratio
  misses, this says which process to look at.
- `echo_cpu_ms_per_call`: the same for a call through the bare echo (what the pool's
  figure is set against); `sdk_cpu_ms_per_call`: what one LLM call costs the SDK's client
  alone, made as a worker makes it (the SDK's aiohttp transport, 256 calls in flight, on
  uvloop as Ray runs an async actor) from this process to the same simulator: a part of
  every task the echo does not have.
- `added_p50_ms`, `added_p99_ms`: at low load (one task at a time), the pool's end-to-end
  latency minus that of the same request made directly with `AsyncAnthropic`.
- `floor_p50_ms`: the least a pipeline of this design can add, measured in the same run:
  one call at a time through a bare client -> actor -> actor echo whose middle actor makes
  two Redis round trips (a task's admission and its record); `added_over_floor` is
  `added_p50_ms` over it (goal: at most 1.5). `latency_parts_p50_ms` splits the pool's
  one-at-a-time latency by each task's own `timings`: `worker_run` (the worker's run, its
  LLM call among it, up to its final record), `admission_to_dispatch` (from the scheduler
  taking the call to the worker starting: the admission's Redis write, the queue, the
  dispatch hop), and `hops_and_record` (the rest: the client's call to the scheduler, the
  record's write, the answer back through the scheduler to the client).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import psutil
import ray

from agentpool import AgentPool, AgentTask, PoolConfig, SimulatorConfig
from agentpool.config import AdmissionConfig
from bench.load import require_succeeded
from bench.report import cpu_seconds, percentile, write

#: Rounds of (echo, `submit` batch, `map` batch), then a last echo: the ratios' medians are
#: the figures (`--quick`: 2).
ROUNDS = 3
#: LLM calls in flight when measuring the SDK's own cost: a worker's concurrency here.
SDK_CONCURRENCY = 256
#: Processes by what they do, from the start of their command lines (Ray names an actor's
#: process `ray::<Class>`).
_ROLES = (
    ("ray::AgentWorker", "workers"),
    ("ray::Relay", "relay"),
    ("ray::Scheduler", "scheduler"),
    ("ray::SimulatorHost", "simulator"),
    ("ray::_Front", "echo"),
    ("ray::_Back", "echo"),
)


def _role(line: str) -> str:
    for prefix, role in _ROLES:
        if line.startswith(prefix):
            return role
    return "redis" if "redis-server" in line else "ray_other"


def _cpu_now() -> dict[int, tuple[str, float]]:
    """pid -> (role, CPU seconds so far) of this process and every one it started: Ray's
    (a local cluster), the actors', Redis's."""
    me = psutil.Process()
    out = {me.pid: ("driver", cpu_seconds([me]))}
    for proc in me.children(recursive=True):
        try:
            line = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        out[proc.pid] = (_role(line), cpu_seconds([proc]))
    return out


def _cpu_since(before: dict[int, tuple[str, float]], n: int) -> dict[str, float]:
    """Milliseconds of CPU per item (of `n`) by role since `before` (a process that exited
    meanwhile is left out)."""
    spent: Counter[str] = Counter()
    for pid, (role, now) in _cpu_now().items():
        spent[role] += now - before.get(pid, (role, 0.0))[1]
    return {role: seconds * 1000 / n for role, seconds in spent.items()}


@ray.remote
class _Back:
    async def echo(self, payload: dict[str, Any]) -> dict[str, Any]:
        return payload


@ray.remote
class _Front:
    """Stands in for the scheduler: takes a call, forwards it to a worker, returns the answer."""

    def __init__(self, back: Any) -> None:
        self.back = back

    async def run(self, payload: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.back.echo.remote(payload)
        return result

    async def run_with_redis(self, payload: dict[str, Any], redis_url: str) -> dict[str, Any]:
        if not hasattr(self, "redis"):
            import redis.asyncio as aioredis

            self.redis = aioredis.Redis.from_url(redis_url)
        await self.redis.set("bench:floor", "x")
        result: dict[str, Any] = await self.back.echo.remote(payload)
        await self.redis.get("bench:floor")
        return result


def _floor_latencies(redis_url: str, n: int) -> list[float]:
    back = _Back.options(num_cpus=0).remote()
    front = _Front.options(num_cpus=0).remote(back)
    payload = {"tenant": "t", "prompt": "sim: answer ok", "max_tokens": 64}
    ray.get(front.run_with_redis.remote(payload, redis_url))
    out = []
    for _ in range(n):
        started = time.perf_counter()
        ray.get(front.run_with_redis.remote(payload, redis_url))
        out.append((time.perf_counter() - started) * 1000)
    for actor in (front, back):
        ray.kill(actor)
    return out


def bare_ray_tps(n: int) -> tuple[float, float]:
    """Calls per second through the bare echo, and the CPU milliseconds each cost over every
    process of the cluster."""
    back = _Back.options(num_cpus=0, max_concurrency=1000).remote()
    front = _Front.options(num_cpus=0, max_concurrency=1000).remote(back)
    ray.get(front.run.remote({"warm": True}))
    payload = {"tenant": "t", "prompt": "sim: answer ok", "max_tokens": 64}
    cpu = _cpu_now()
    started = time.monotonic()
    ray.get([front.run.remote({**payload, "i": i}) for i in range(n)])
    elapsed = time.monotonic() - started
    spent = sum(_cpu_since(cpu, n).values())
    for actor in (front, back):
        ray.kill(actor)
    return n / elapsed, spent


def _task(i: int) -> AgentTask:
    return AgentTask(tenant="t", prompt=f"sim: answer ok {i}", max_tokens=64)


def _pool_tps(pool: AgentPool, n: int) -> tuple[float, dict[str, float]]:
    """Tasks per second of one batch through `submit`, and its CPU per task by role."""
    tasks = [_task(i) for i in range(n)]
    cpu = _cpu_now()
    started = time.monotonic()
    results = ray.get(pool.submit(tasks))
    elapsed = time.monotonic() - started
    spent = _cpu_since(cpu, n)
    require_succeeded(results, "throughput batch")
    return n / elapsed, spent


def _map_tps(pool: AgentPool, n: int) -> tuple[float, float]:
    """Tasks per second of one batch through `map`, and its CPU per task."""
    cpu = _cpu_now()
    started = time.monotonic()
    results = list(pool.map(_task(i) for i in range(n)))
    elapsed = time.monotonic() - started
    spent = sum(_cpu_since(cpu, n).values())
    require_succeeded(results, "map batch")
    return n / elapsed, spent


def _pool_latencies(pool: AgentPool, n: int) -> tuple[list[float], dict[str, list[float]]]:
    """End-to-end milliseconds of n tasks one at a time, and each split in parts by its
    record's `timings` (see the module's docstring)."""
    out: list[float] = []
    parts: dict[str, list[float]] = {"hops_and_record": [], "admission_to_dispatch": [], "worker_run": []}
    for i in range(n):
        started = time.perf_counter()
        (result,) = ray.get(pool.submit([_task(i)]))
        took = (time.perf_counter() - started) * 1000
        out.append(took)
        if result.status != "succeeded":
            raise RuntimeError(f"task {i} ended {result.status}: {result.error}")
        timings = result.timings
        parts["hops_and_record"].append(took - timings.total_ms)
        parts["admission_to_dispatch"].append(timings.total_ms - timings.run_ms)
        parts["worker_run"].append(timings.run_ms)
    return out, parts


async def _sdk_calls(url: str, n: int) -> float:
    """CPU milliseconds per LLM call of this process's SDK client alone, made as a worker
    makes it (`actors.provider_calls`): `SDK_CONCURRENCY` in flight, raw responses."""
    limits = httpx2.Limits(max_connections=SDK_CONCURRENCY, max_keepalive_connections=SDK_CONCURRENCY)
    client = anthropic.AsyncAnthropic(
        api_key="bench", base_url=url, max_retries=0, http_client=anthropic.DefaultAioHttpClient(limits=limits)
    )
    room = asyncio.Semaphore(SDK_CONCURRENCY)

    async def call(i: int) -> None:
        async with room:
            raw = await client.messages.with_raw_response.create(
                model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": f"sim: answer ok {i}"}]
            )
            raw.http_response.read()

    await asyncio.gather(*(call(i) for i in range(SDK_CONCURRENCY)))  # connections open
    started = time.process_time()
    await asyncio.gather(*(call(i) for i in range(n)))
    spent = time.process_time() - started
    await client.close()
    return spent * 1000 / n


def _on_uvloop(coroutine: Coroutine[Any, Any, float]) -> float:
    """Runs it on uvloop where it is installed, as Ray runs an async actor's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


async def _direct_latencies(url: str, n: int) -> list[float]:
    client = anthropic.AsyncAnthropic(api_key="bench", base_url=url, max_retries=0)
    out = []
    for i in range(n):
        started = time.perf_counter()
        await client.messages.create(
            model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": f"sim: answer ok {i}"}]
        )
        out.append((time.perf_counter() - started) * 1000)
    await client.close()
    return out


def run(out: Path, quick: bool) -> dict[str, Any]:
    # Quick: the same batch (a smaller one measures another thing: 1,000 tasks went through
    # at a fifth less per second, most of them admitted in one chunk rather than streaming
    # in), in fewer rounds and with fewer tasks one at a time.
    batch = 5000
    rounds = 2 if quick else ROUNDS
    sequential = 100 if quick else 500
    config = PoolConfig(
        name="bench-overhead",
        num_workers=2,
        worker_concurrency=256,
        simulator=SimulatorConfig(latency_ms=0, latency_sigma=0, seed=1),
        # A batch far above what the pool runs at once is the point here, not an overload to shed.
        admission=AdmissionConfig(max_queue_wait_s=3600, target_wait_s=3600),
    )
    echoes: list[float] = []
    echo_cpu: list[float] = []
    pool_rates: list[float] = []
    pool_cpu: list[dict[str, float]] = []
    map_rates: list[float] = []
    map_cpu: list[float] = []

    def echo() -> None:
        rate, cpu = bare_ray_tps(batch)
        echoes.append(rate)
        echo_cpu.append(cpu)

    with AgentPool.start(config) as pool:
        warm = [_task(i) for i in range(2 * config.num_workers * config.worker_concurrency)]
        for _ in range(rounds):
            echo()
            # Every process warm, and every connection a worker holds to the provider open at
            # its full concurrency (a worker closes one idle for 5 s; an echo takes about 4):
            # the batches measure a pool at work rather than one opening connections.
            pool.run(warm)
            rate, by_role = _pool_tps(pool, batch)
            pool_rates.append(rate)
            pool_cpu.append(by_role)
            rate, cpu = _map_tps(pool, batch)
            map_rates.append(rate)
            map_cpu.append(cpu)
        echo()
        url = pool.provider_url
        assert url is not None
        sdk_cpu = _on_uvloop(_sdk_calls(url, batch))
        direct = asyncio.run(_direct_latencies(url, sequential))
        ours, parts = _pool_latencies(pool, sequential)
        floor = _floor_latencies(pool.redis_url, sequential)
    # Each round's batches against the mean of the echoes either side of them.
    around = [(echoes[r] + echoes[r + 1]) / 2 for r in range(rounds)]
    ratios = [p / e for p, e in zip(pool_rates, around, strict=True)]
    map_ratios = [m / e for m, e in zip(map_rates, around, strict=True)]
    added_p50 = percentile(ours, 0.5) - percentile(direct, 0.5)
    roles = sorted({role for spent in pool_cpu for role in spent})
    figures: dict[str, Any] = {
        "throughput_ratio": round(statistics.median(ratios), 4),
        "map_throughput_ratio": round(statistics.median(map_ratios), 4),
        "throughput_ratio_rounds": [round(r, 4) for r in ratios],
        "map_throughput_ratio_rounds": [round(r, 4) for r in map_ratios],
        "added_p50_ms": round(added_p50, 2),
        "floor_p50_ms": round(percentile(floor, 0.5), 2),
        "added_over_floor": round(added_p50 / percentile(floor, 0.5), 3),
        "added_p99_ms": round(percentile(ours, 0.99) - percentile(direct, 0.99), 2),
        "pool_tasks_per_s": round(statistics.median(pool_rates), 1),
        "map_tasks_per_s": round(statistics.median(map_rates), 1),
        "bare_ray_calls_per_s": round(statistics.median(echoes), 1),
        "bare_ray_calls_per_s_rounds": [round(e, 1) for e in echoes],
        "cpu_ms_per_task": round(statistics.median(sum(spent.values()) for spent in pool_cpu), 3),
        "cpu_ms_per_task_by_role": {
            role: round(statistics.median(spent.get(role, 0.0) for spent in pool_cpu), 3) for role in roles
        },
        "map_cpu_ms_per_task": round(statistics.median(map_cpu), 3),
        "echo_cpu_ms_per_call": round(statistics.median(echo_cpu), 3),
        "sdk_cpu_ms_per_call": round(sdk_cpu, 3),
        "pool_p50_ms": round(percentile(ours, 0.5), 2),
        "direct_p50_ms": round(percentile(direct, 0.5), 2),
        "pool_p99_ms": round(percentile(ours, 0.99), 2),
        "direct_p99_ms": round(percentile(direct, 0.99), 2),
        "latency_parts_p50_ms": {part: round(percentile(values, 0.5), 2) for part, values in parts.items()},
    }
    notes = (
        f"Zero-latency simulator, one LLM call per task. Throughput: {batch} tasks submitted at once (and through "
        f"map), against {batch} calls through a bare Ray client -> actor -> actor echo, alternating {rounds} times "
        "(each batch against the mean of the echoes either side of it; the figures are the medians of the rounds). "
        f"Latency: {sequential} tasks one at a "
        "time, against the same request made directly with AsyncAnthropic to the same simulator; the floor, "
        "one call at a time through the bare echo with two Redis round trips in its middle actor. CPU: over "
        f"every process of the cluster during each batch, per task; the SDK's alone over {batch} calls, "
        f"{SDK_CONCURRENCY} in flight."
    )
    write(out, "overhead", figures=figures, notes=notes, config={"quick": quick, "batch": batch, "rounds": rounds})
    return figures
