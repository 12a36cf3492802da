"""`scale`: batches far larger than Ray could hold as pending calls, and how many agent
loops the pool holds. Every phase runs one-call tasks against a simulator that answers at
once, on 2 workers x 256 loops, and checks that every task has its record.

Phase 1, `enqueue` (1,000,000 tasks; 20,000 with `--quick`): detached submission, chunks of
10,000 made as they are sent, the whole batch accepted before much of it runs.
- `enqueue_tasks_per_s`: tasks accepted per second, seen from the client.
- `enqueue_scheduler_rss_growth_mib`: the scheduler's largest resident memory during the
  phase over its memory before (the goal: at most 256 MB whatever the backlog).
- `redis_bytes_per_queued_task` at the largest backlog (`MEMORY USAGE` of the tenant's
  backlog structures over their tasks), `redis_payload_bytes` (the mean admission entry,
  the task itself) and `redis_overhead_bytes_per_task`, their difference (goal: 1 KB).
- `enqueue_lost` (tasks with no record, by id) and `enqueue_tasks_done_per_s`.

Phase 1b, `backlog` (1,000,000 tasks; 20,000 with `--quick`): the same detached submission
against a provider that takes 10 minutes per call, so the whole batch waits in the backlog;
then the scheduler is killed (SIGKILL) with it there.
- `backlog_tasks_per_s`: tasks accepted per second, seen from the client, with nothing else
  running; `backlog_scheduler_rss_growth_mib` at the full backlog (goal: 256 MB);
  `backlog_redis_bytes_per_task`, `backlog_redis_payload_bytes`.
- `backlog_lost_after_kill`: accepted tasks found neither in the backlog nor with a record
  once the restarted scheduler has counted the backlog again; `backlog_counted_after_kill`
  (queued plus running, as the new scheduler's `status()` says; the goal is the batch), and
  `backlog_recovery_s`, from the kill until it says so.

Phase 2, `map` (the same size): `pool.map` over a generator, window 10,000.
- `map_driver_rss_growth_mib`: this process's largest resident memory over before (goal:
  512 MB); `map_scheduler_rss_growth_mib`, `map_lost`, `map_tasks_per_s`.

Phase 3, `submit` (100,000; 3,000 with `--quick`): one `pool.submit`, one ref per task.
- `submit_100k_s`: until the pool has accepted every task; `complete_100k_s` and
  `tasks_per_s`: until every result is back. `completion_ratio`: `tasks_per_s` over the
  bare Ray client -> actor -> actor echo of `bench overhead`, 5,000 calls before the pool
  starts and after it stops, the mean (`bare_ray_calls_per_s`; goal: 0.5).
- `relay_bytes_per_held_ref`: the relay's resident memory over before, per waiting call,
  with the same number of `submit` calls all waiting (behind an hour-long provider call,
  none through the direct lane); `ray_bytes_per_pending_call` is the same for a bare async
  actor holding as many calls that only await an event, in the same run (Ray's own cost),
  and `pending_ref_cost_ratio` the first over the second (goal: 1.1).
  `relay_bytes_per_pending_ref` is the relay's high-water mark during the batch over its
  largest count of waiting calls: as tasks end meanwhile, it counts memory of answered calls.
- `submit_scheduler_rss_growth_mib` (goal: 256 MB).

Phase 3b, `default` (100,000 tasks; 5,000 with `--quick`): the pool with its default
configuration (2 workers x 64 loops, default admission; only the simulator answers at once),
a batch with no deadlines through `pool.map`.
- `default_batch_rejected`: tasks not run (goal: 0); `default_batch_tasks_per_s`.
- `many_tenants_time_ratio`: the time 10,000 tasks (1,000 with `--quick`) from 5,000 tenants
  (2 each) take through `submit` over the time the same tasks from one tenant take, each
  measured twice in the order one, many, many, one (goal: at most 1.1).

Phase 4, concurrency: 2,200 tasks against a simulator that takes 15 s per call (8 s with
`--quick`), with room for 2,400 loops in two workers. `max_concurrent_loops` is the largest
number of requests the simulator had open at once; every task must succeed.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import ray
import redis

from agentpool import AgentPool, AgentResult, AgentTask, PoolConfig, SimulatorConfig
from agentpool.cluster.keys import Keys
from bench.load import require_succeeded
from bench.overhead import bare_ray_tps
from bench.report import write

SLOW_CALL_MS = 15_000
LOOPS = 2_200


def _task(i: int, run: str = "", **fields: Any) -> AgentTask:
    """Task `i` of four tenants; with `run`, its id is `<run><i>` (so the bench can find its record)."""
    ids = {"task_id": f"{run}{i}"} if run else {}
    return AgentTask(tenant=f"t{i % 4}", prompt=f"sim: answer ok {i}", max_tokens=64, **ids, **fields)


def _process(prefix: str) -> psutil.Process:
    """An actor's process on this machine by its class (the bench runs a local cluster)."""
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and cmdline[0].startswith(f"ray::{prefix}"):
            return proc
    raise RuntimeError(f"no {prefix} process found")


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


def _config(name: str, **overrides: Any) -> PoolConfig:
    base: dict[str, Any] = {
        "name": name,
        "num_workers": 2,
        "worker_concurrency": 256,
        "simulator": SimulatorConfig(latency_ms=0, latency_sigma=0, seed=1),
        # Records of a million tasks: the stream keeps them all, so none is trimmed unread.
        "stream_maxlen": 2_000_000,
    }
    return PoolConfig(**{**base, **overrides})


def _finished(status: dict[str, Any]) -> int:
    return sum(status["finished_by_status"].values())


def _statuses(pool: AgentPool, run: str, n: int) -> Counter[str]:
    """The final status of each task of the run (ids `<run><i>`); `none` for no record yet."""
    client = redis.Redis.from_url(pool.redis_url, decode_responses=True)
    keys = Keys(pool.config.key_prefix)
    out: Counter[str] = Counter()
    try:
        for start in range(0, n, 10_000):
            pipe = client.pipeline(transaction=False)
            for i in range(start, min(n, start + 10_000)):
                pipe.get(keys.result(f"t{i % 4}", f"{run}{i}"))
            out.update(AgentResult.model_validate_json(raw).status if raw else "none" for raw in pipe.execute())
    finally:
        client.close()
    return out


def _backlog_bytes(pool: AgentPool) -> tuple[float, float, int]:
    """(bytes per task in the backlog structures, mean admission entry bytes, tasks there)."""
    client = redis.Redis.from_url(pool.redis_url, decode_responses=True)
    keys, name = Keys(pool.config.key_prefix), pool.config.name
    total, entries, payload = 0, 0, 0.0
    try:
        for tenant in (f"t{i}" for i in range(4)):
            structures = [keys.admitted(tenant, name), *keys.backlogs(tenant, name), keys.arrivals(tenant, name)]
            total += sum(int(client.memory_usage(k, samples=0) or 0) for k in structures)
            size = int(client.hlen(keys.admitted(tenant, name)))
            entries += size
            if size:
                sample = [f for _, f in zip(range(200), client.hscan_iter(keys.admitted(tenant, name)), strict=False)]
                payload += size * sum(len(v) for _, v in sample) / len(sample)
    finally:
        client.close()
    return total / max(1, entries), payload / max(1, entries), entries


def _chunks(n: int, run: str, size: int = 10_000, **fields: Any) -> Iterator[list[AgentTask]]:
    for start in range(0, n, size):
        yield [_task(i, run, **fields) for i in range(start, min(n, start + size))]


def _wait_finished(pool: AgentPool, target: int, sample: Callable[[], None], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while _finished(pool.status()) < target:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {_finished(pool.status())} of {target} tasks finished in {timeout_s:.0f} s")
        sample()
        time.sleep(1.0)


def _enqueue(n: int) -> dict[str, Any]:
    with AgentPool.start(_config("bench-scale-enqueue", max_queued=n + 10_000)) as pool:
        pool.run([_task(i) for i in range(200)])  # warm up
        scheduler = _process("Scheduler")
        before = scheduler.memory_info().rss
        peak = [before]

        def sample() -> None:
            peak[0] = max(peak[0], scheduler.memory_info().rss)

        done_before = _finished(pool.status())
        run = f"e{uuid.uuid4().hex[:6]}-"
        started = time.monotonic()
        for chunk in _chunks(n, run):
            replies = pool.enqueue(chunk, chunk=1000)
            if any(r["status"] != "accepted" for r in replies):
                raise RuntimeError(f"enqueue refused tasks: {sorted({r['status'] for r in replies})}")
            sample()
        admitted_s = time.monotonic() - started
        per_task, payload, backlog = _backlog_bytes(pool)
        _wait_finished(pool, done_before + n, sample, timeout_s=n / 50 + 600)
        complete_s = time.monotonic() - started
        lost = n - _statuses(pool, run, n)["succeeded"]
    return {
        "enqueue_tasks_per_s": round(n / admitted_s, 1),
        "enqueue_scheduler_rss_growth_mib": round((peak[0] - before) / 2**20, 1),
        "redis_bytes_per_queued_task": round(per_task, 1),
        "redis_payload_bytes": round(payload, 1),
        "redis_overhead_bytes_per_task": round(per_task - payload, 1),
        "redis_backlog_measured": backlog,
        "enqueue_lost": lost,
        "enqueue_tasks_done_per_s": round(n / complete_s, 1),
        "enqueue_batch": n,
    }


def _backlog(n: int) -> dict[str, Any]:
    cfg = _config(
        "bench-scale-backlog",
        max_queued=n + 10_000,
        num_workers=1,
        worker_concurrency=64,
        simulator=SimulatorConfig(latency_ms=600_000, latency_sigma=0, seed=1),
    )
    with AgentPool.start(cfg) as pool:
        scheduler = _process("Scheduler")
        before = scheduler.memory_info().rss
        peak = before
        run = f"b{uuid.uuid4().hex[:6]}-"
        started = time.monotonic()
        # A day's timeout: the tasks running when the scheduler is killed are still running
        # when the backlog is counted again (none ends while the phase lasts).
        for chunk in _chunks(n, run, timeout_s=86_400.0):
            replies = pool.enqueue(chunk, chunk=1000)
            if any(r["status"] != "accepted" for r in replies):
                raise RuntimeError(f"enqueue refused tasks: {sorted({r['status'] for r in replies})}")
            peak = max(peak, scheduler.memory_info().rss)
        admitted_s = time.monotonic() - started
        per_task, payload, held = _backlog_bytes(pool)
        os.kill(scheduler.pid, 9)
        killed = time.monotonic()
        counted, deadline = 0, killed + 600
        while time.monotonic() < deadline:
            try:
                status = pool.status()
            except Exception:  # the scheduler is restarting
                time.sleep(0.5)
                continue
            counted = status["queued"] + status["in_flight"]
            if counted >= n:
                break
            time.sleep(0.5)
        recovery_s = time.monotonic() - killed
        restarted = _process("Scheduler").memory_info().rss
        _, _, held_after = _backlog_bytes(pool)
        records = n - _statuses(pool, run, n)["none"]  # none is expected: a call takes 10 minutes
        lost = n - held_after - records
    return {
        "backlog_tasks_per_s": round(n / admitted_s, 1),
        "backlog_scheduler_rss_growth_mib": round((peak - before) / 2**20, 1),
        "backlog_redis_bytes_per_task": round(per_task, 1),
        "backlog_redis_payload_bytes": round(payload, 1),
        "backlog_measured": held,
        "backlog_lost_after_kill": lost,
        "backlog_counted_after_kill": counted,
        "backlog_records_after_kill": records,
        # The restarted scheduler's memory over the first one's before the batch: a count per
        # tenant and class, and its window, whatever the backlog.
        "backlog_restarted_scheduler_rss_over_before_mib": round((restarted - before) / 2**20, 1),
        "backlog_recovery_s": round(recovery_s, 1),
        "backlog_batch": n,
    }


def _default(n: int, pairs: int) -> dict[str, Any]:
    cfg = PoolConfig(
        name="bench-scale-default",
        simulator=SimulatorConfig(latency_ms=0, latency_sigma=0, seed=1),
        stream_maxlen=2 * n,
    )
    with AgentPool.start(cfg) as pool:
        pool.run([_task(i) for i in range(200)])  # warm up
        run = f"d{uuid.uuid4().hex[:6]}-"
        started = time.monotonic()
        statuses = Counter(r.status for r in pool.map((_task(i, run) for i in range(n)), window=10_000))
        batch_s = time.monotonic() - started

        def timed(tenant: Callable[[int], str]) -> float:
            tasks = [AgentTask(tenant=tenant(i), prompt=f"sim: answer ok {i}", max_tokens=64) for i in range(2 * pairs)]
            begun = time.monotonic()
            require_succeeded(ray.get(pool.submit(tasks)), "tenants")
            return time.monotonic() - begun

        solo = uuid.uuid4().hex[:6]
        one = timed(lambda i: f"solo-{solo}")
        many = timed(lambda i: f"m{i // 2}")
        many += timed(lambda i: f"n{i // 2}")
        one += timed(lambda i: f"solo-{solo}")
    return {
        "default_batch_rejected": n - statuses.get("succeeded", 0),
        "default_batch_statuses": dict(statuses),
        "default_batch_tasks_per_s": round(n / batch_s, 1),
        "default_batch": n,
        "many_tenants_time_ratio": round(many / one, 3),
        "many_tenants_s": round(many / 2, 2),
        "one_tenant_s": round(one / 2, 2),
        "many_tenants_tasks": 2 * pairs,
    }


def _map(n: int) -> dict[str, Any]:
    with AgentPool.start(_config("bench-scale-map", max_queued=n + 10_000)) as pool:
        pool.run([_task(i) for i in range(200)])  # warm up
        scheduler, driver = _process("Scheduler"), psutil.Process()
        before, driver_before = scheduler.memory_info().rss, driver.memory_info().rss
        peak, driver_peak = before, driver_before
        run = f"m{uuid.uuid4().hex[:6]}-"
        seen: set[str] = set()
        failed = 0
        started = time.monotonic()
        for k, result in enumerate(pool.map((_task(i, run) for i in range(n)), window=10_000)):
            seen.add(result.task_id)
            failed += result.status != "succeeded"
            if k % 2000 == 0:
                peak = max(peak, scheduler.memory_info().rss)
                driver_peak = max(driver_peak, driver.memory_info().rss)
        elapsed = time.monotonic() - started
    return {
        # The ids seen (up to 1M short strings, ~70 MB) are the bench's own, not map's: less them.
        "map_driver_rss_growth_mib": round((driver_peak - driver_before - _set_bytes(seen)) / 2**20, 1),
        "map_scheduler_rss_growth_mib": round((peak - before) / 2**20, 1),
        "map_lost": n - len(seen) + failed,
        "map_tasks_per_s": round(n / elapsed, 1),
        "map_batch": n,
    }


def _set_bytes(ids: set[str]) -> int:
    return sys.getsizeof(ids) + sum(sys.getsizeof(i) for i in ids)


def _submit(n: int) -> dict[str, Any]:
    bare_before, _ = bare_ray_tps(5_000)
    with AgentPool.start(_config("bench-scale", max_queued=n + 1000)) as pool:
        pool.run([_task(i) for i in range(200)])  # warm up
        scheduler, relay = _process("Scheduler"), _process("Relay")
        rss_before, relay_before = scheduler.memory_info().rss, relay.memory_info().rss
        done_before = _finished(pool.status())
        tasks = [_task(i) for i in range(n)]
        started = time.monotonic()
        refs = pool.submit(tasks)
        del tasks
        handle = ray.get_actor("bench-scale-relay", namespace="agentpool")
        peak_rss, peak_waiting, relay_at_peak, admitted_s = rss_before, 0, relay_before, None
        while True:
            status = pool.status()
            waiting = int(ray.get(handle.waiting.remote()))
            peak_rss = max(peak_rss, scheduler.memory_info().rss)
            if waiting > peak_waiting:
                peak_waiting, relay_at_peak = waiting, relay.memory_info().rss
            accepted = int(status["queued"]) + int(status["in_flight"]) + _finished(status) - done_before
            if admitted_s is None and accepted >= n:
                admitted_s = time.monotonic() - started
            if _finished(status) - done_before >= n:
                break
            time.sleep(0.2)
        results = ray.get(refs)
        complete_s = time.monotonic() - started
    require_succeeded(results, "scale batch")
    bare = (bare_before + bare_ray_tps(5_000)[0]) / 2
    return {
        "submit_100k_s": round((admitted_s or complete_s) * 100_000 / n, 2),
        "complete_100k_s": round(complete_s * 100_000 / n, 1),
        "tasks_per_s": round(n / complete_s, 1),
        "completion_ratio": round(n / complete_s / bare, 4),
        "bare_ray_calls_per_s": round(bare, 1),
        "relay_bytes_per_pending_ref": round((relay_at_peak - relay_before) / max(1, peak_waiting)),
        "relay_peak_waiting": peak_waiting,
        "submit_scheduler_rss_growth_mib": round((peak_rss - rss_before) / 2**20, 1),
        "batch_size": n,
    }


def _held(n: int) -> dict[str, Any]:
    """The relay's own cost per waiting call with every call waiting: `n` tasks submitted
    behind a provider that answers in an hour, none through the scheduler's direct lane, so
    the relay's growth is the calls it holds and nothing else (while a batch also drains,
    the relay's high-water mark counts the memory of calls already answered)."""
    with AgentPool.start(_config("bench-held", max_queued=n + 1000, submit_direct_calls=0)) as pool:
        pool.run([_task(i) for i in range(50)])  # warm up
        relay = _process("Relay")
        handle = ray.get_actor("bench-held-relay", namespace="agentpool")
        before = relay.memory_info().rss
        tasks = [
            AgentTask(tenant=f"t{i % 4}", prompt=f"sim: delay 3600000\nsim: answer ok {i}", max_tokens=64)
            for i in range(n)
        ]
        refs = pool.submit(tasks)
        del tasks
        deadline = time.monotonic() + 600
        while int(ray.get(handle.waiting.remote())) < n and time.monotonic() < deadline:
            time.sleep(0.5)
        waiting = int(ray.get(handle.waiting.remote()))
        time.sleep(2)
        grown = relay.memory_info().rss - before
        del refs
    return {"relay_bytes_per_held_ref": round(grown / max(1, waiting)), "relay_held_refs": waiting}


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
    # BENCH_SCALE_TASKS sets the enqueue and map batches' size (a partial run, said in the
    # report's config): a million one-call tasks take this machine about 1.5 hours each.
    big = int(os.environ.get("BENCH_SCALE_TASKS") or (20_000 if quick else 1_000_000))
    n = 3_000 if quick else 100_000
    slow_call_ms = 8_000 if quick else SLOW_CALL_MS
    held = int(os.environ.get("BENCH_SCALE_BACKLOG") or (20_000 if quick else 1_000_000))
    # BENCH_SCALE_PHASES: a comma-separated subset of the phases (a partial run, said in the config).
    phases = os.environ.get("BENCH_SCALE_PHASES", "enqueue,backlog,map,submit,default,loops").split(",")
    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "enqueue": lambda: _enqueue(big),
        "backlog": lambda: _backlog(held),
        "map": lambda: _map(big),
        "submit": lambda: _submit(n),
        "default": lambda: _default(5_000 if quick else 100_000, 500 if quick else 5_000),
        "loops": lambda: _loops(LOOPS, slow_call_ms),
    }
    figures: dict[str, Any] = {}
    for phase in phases:
        figures |= steps[phase]()
    if "submit" in phases:
        figures |= _held(n)
        figures["ray_bytes_per_pending_call"] = round(_ray_bytes_per_pending_call(n))
        figures["pending_ref_cost_ratio"] = round(
            figures["relay_bytes_per_held_ref"] / max(1, figures["ray_bytes_per_pending_call"]), 3
        )
    notes = (
        f"enqueue and map: {big:,} one-call tasks each, zero-latency simulator, 2 workers x 256 loops, "
        f"backlog: {held:,} tasks against a simulator taking 10 minutes per call, 1 worker x 64 loops, "
        "default: the default PoolConfig (2 workers x 64 loops) with a zero-latency simulator, "
        f"the scheduler's queue window at its default (2,000). submit: {n:,} tasks in one call, figures "
        "scaled to 100k where the batch is smaller (--quick). Memory: resident set sizes of the scheduler, "
        "relay and driver processes (psutil), Redis `MEMORY USAGE` of the backlog structures. Loops: "
        f"{LOOPS:,} tasks against a simulator taking {slow_call_ms / 1000:g} s per call, room for "
        f"{LOOPS + 200:,} loops in 2 workers. The relay's cost per waiting call: {n:,} `submit` calls held "
        f"behind an hour-long provider call; Ray's own: a bare async actor holding as many ({n:,})."
    )
    config = {"quick": quick, "phases": phases, "enqueue": big, "backlog": held, "map": big, "submit": n}
    config["loops"] = LOOPS
    write(out, "scale", figures=figures, notes=notes, config=config)
    return figures
