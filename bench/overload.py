"""`overload`: open-loop arrivals at twice the peak the provider's limits allow, through the
pool and through a naive pool, against the same simulated tier.

The simulated tier: `claude-sonnet-4-5` limited server-side to RPM (the pool is configured
with the same limit), lognormal latency (median 400 ms, sigma 0.5), 1% 529s and 0.5% 500s.
Each task is one LLM call, so the peak is RPM / 60 tasks per second. Three tenants with
weights 1:2:5 each offer a third of the arrivals; each task tolerates `DEADLINE_S` of
queueing, and 20% are `sheddable`, 10% `critical`.

Phases, all in the same run: the pool at 0.5x peak (its latency baseline), at k x peak with
Poisson arrivals, at k x peak with bursty arrivals (Gamma gaps with a coefficient of
variation of `BURSTY_CV`, and output sizes spread lognormally: figures prefixed `bursty_`);
then a naive pool (Ray actors called round-robin, each with `AsyncAnthropic` and the SDK's
default retries, no admission control) at 0.5x and k x peak against a fresh simulator with
the same limits. Before each measured phase the run spends the buckets' burst (a minute's
worth of requests, as Anthropic's buckets start full) right before the k x phase, so that
k x peak is an overload from its first second.

Figures: `goodput_ratio` (tasks that succeeded per second of the k x phase after its first
second, over the peak; only those that ended within the phase count, so that the naive pool's retries after it do
not lend it capacity it never had),
`admitted_p99_ratio` (p99 end-to-end latency of the tasks that ran, k x over 0.5x),
`reject_p99_ms` (time to a rejection on arrival; `dropped_p99_ms` for queued tasks dropped
once past their deadline), `rejected_at_arrival_fraction` (rejections within `ARRIVAL_MS`
of arrival, over all rejections), `shed_fraction` (by reason), `queue_timeout_by_priority` (the
share of each class's arrivals dropped after waiting), `provider_429`,
`lost_tasks` and `duplicate_results` (every submitted task reconciled against Redis), and
`baseline_goodput_ratio`, `baseline_p99_ratio`, `baseline_provider_429`.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import ray
import redis

from agentpool import AgentPool, AgentResult, AgentTask, PoolConfig, RateLimit, SimulatorConfig, TenantPolicy
from agentpool.actors.simulator_host import SimulatorHost
from agentpool.cluster.keys import Keys
from agentpool.simulator.config import ModelLimitsConfig
from bench.load import Gaps, MakeTask, Timeline, bursty, open_loop, poisson, wait_idle
from bench.report import latency_cdf, percentile, timeseries, write

MODEL = "claude-sonnet-4-5"
#: 40 tasks a second at peak: a quick run's 15 s phase then admits about 600 tasks, enough
#: for its p99 to agree with the full run's (at 600 RPM it admitted 150, and its p99 was
#: the second slowest task: one of the 1.5% retried after a fault, 24-34% over the full
#: run's). The pool still refuses 99.5% of its rejections at arrival on 2 cores at this
#: rate; at 6,000 RPM it no longer did.
RPM = 2400
PEAK = RPM / 60  # tasks per second: one call per task
WEIGHTS = {"gold": 5.0, "silver": 2.0, "bronze": 1.0}
DEADLINE_S = 0.5
OUTPUT_TOKENS = 30
#: The bursty phase: Gamma inter-arrival gaps with this coefficient of variation (Poisson: 1).
BURSTY_CV = 3.0
#: A rejection this soon after arrival counts as refused at arrival.
ARRIVAL_MS = 10.0
#: Goodput is counted over the phase less its first second, while the pipeline fills (the
#: first answers come a service time after the first arrivals): a short run and a long one
#: then measure the same steady rate.
RAMP_S = 1.0


def _goodput(ended_at: list[float], duration_s: float) -> float:
    """Tasks that succeeded per second of the phase after its ramp, over the peak."""
    return round(sum(RAMP_S <= at <= duration_s for at in ended_at) / (duration_s - RAMP_S) / PEAK, 4)


def _sim_config(seed: int) -> SimulatorConfig:
    return SimulatorConfig(
        latency_ms=400,
        latency_sigma=0.5,
        seed=seed,
        fault_rates={529: 0.01, 500: 0.005},
        model_limits={MODEL: ModelLimitsConfig(rpm=RPM, itpm=10**9, otpm=10**9)},
    )


def _task(tenant: str, k: int, rng: random.Random) -> AgentTask:
    roll = rng.random()
    priority = "sheddable" if roll < 0.2 else "critical" if roll > 0.9 else "standard"
    return AgentTask(
        tenant=tenant,
        prompt=f"sim: output_tokens {OUTPUT_TOKENS}\nsim: answer {tenant}-{k}",
        model=MODEL,
        fallback_models=[],
        max_tokens=64,
        priority=priority,
        deadline_s=DEADLINE_S,
    )


def _spread_task(tenant: str, k: int, rng: random.Random) -> AgentTask:
    """As `_task`, with output sizes spread as real answers are: lognormal around
    `OUTPUT_TOKENS` (sigma 0.8: about 8% under a third of it), capped a little under
    `max_tokens` (60 tokens, reached by about a fifth) so that no answer is cut short."""
    task = _task(tenant, k, rng)
    tokens = max(1, min(task.max_tokens - 4, round(rng.lognormvariate(math.log(OUTPUT_TOKENS), 0.8))))
    return task.model_copy(update={"prompt": f"sim: output_tokens {tokens}\nsim: answer {tenant}-{k}"})


def _rates(load: float) -> dict[str, float]:
    return dict.fromkeys(WEIGHTS, load * PEAK / len(WEIGHTS))


# --- the naive pool ---------------------------------------------------------------------------


@ray.remote
class _NaiveWorker:
    """What a pool without admission control does: call the SDK, let its retries cope."""

    def __init__(self, base_url: str) -> None:
        self._client = anthropic.AsyncAnthropic(api_key="bench", base_url=base_url)  # default max_retries=2

    async def run(self, prompt: str) -> tuple[bool, float]:
        started = time.monotonic()
        try:
            await self._client.messages.create(
                model=MODEL, max_tokens=64, messages=[{"role": "user", "content": prompt}]
            )
            ok = True
        except anthropic.APIError:
            ok = False
        return ok, (time.monotonic() - started) * 1000


def _naive_phase(workers: list[Any], rate: float, duration_s: float, seed: int) -> list[tuple[bool, float, float]]:
    """(succeeded, latency ms, arrival s from the phase start) per request."""
    rng = random.Random(seed)
    refs, arrivals = [], []
    begin = time.monotonic()
    at, k = rng.expovariate(rate), 0
    while at < duration_s:
        delay = begin + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        refs.append(workers[k % len(workers)].run.remote(f"sim: output_tokens {OUTPUT_TOKENS}\nsim: answer n{k}"))
        arrivals.append(at)
        at, k = at + rng.expovariate(rate), k + 1
    return [(ok, ms, at) for (ok, ms), at in zip(ray.get(refs), arrivals, strict=True)]


def _naive(duration_s: float, warm_s: float, load: float) -> tuple[dict[str, Any], list[float], list[float]]:
    """The naive pool's figures, and the latencies and end times of the tasks it completed at
    k x peak."""
    host = SimulatorHost.options(num_cpus=0).remote(_sim_config(seed=8))
    url = ray.get(host.start.remote())
    workers = [_NaiveWorker.options(num_cpus=0, max_concurrency=10_000).remote(url) for _ in range(2)]
    low = _naive_phase(workers, 0.5 * PEAK, warm_s, seed=1)
    _spend_burst_naive(url, host)
    before = ray.get(host.stats.remote())
    high = _naive_phase(workers, load * PEAK, duration_s, seed=2)
    after = ray.get(host.stats.remote())
    ray.get(host.stop.remote())
    for actor in (*workers, host):
        ray.kill(actor)
    ok_low = [ms for ok, ms, _ in low if ok]
    ok_high = [ms for ok, ms, _ in high if ok]
    figures = {
        "baseline_goodput_ratio": _goodput([at + ms / 1000 for ok, ms, at in high if ok], duration_s),
        "baseline_p99_ratio": round(percentile(ok_high, 0.99) / percentile(ok_low, 0.99), 4),
        "baseline_provider_429": int(after.get("rate_limited", 0)) - int(before.get("rate_limited", 0)),
        "baseline_failed_fraction": round(sum(not ok for ok, _, _ in high) / max(1, len(high)), 4),
    }
    return figures, ok_high, [at + ms / 1000 for ok, ms, at in high if ok]


def _spend_burst_naive(url: str, host: Any) -> None:
    """Sends requests until the provider starts refusing them: its bucket is empty. The first
    round is the bucket's whole content at once, then rounds of two seconds' refill; straight
    over HTTP from here, as only their number matters."""
    first_429 = int(ray.get(host.stats.remote()).get("rate_limited", 0))
    size = RPM
    while int(ray.get(host.stats.remote()).get("rate_limited", 0)) == first_429:
        asyncio.run(_post_many(url, size))
        size = int(2 * PEAK)


async def _post_many(url: str, n: int) -> None:
    body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "sim: answer burst"}]}
    headers = {"x-api-key": "bench", "anthropic-version": "2023-06-01"}
    async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one() -> None:
            async with session.post(f"{url}/v1/messages", json=body) as response:
                await response.read()

        await asyncio.gather(*(one() for _ in range(n)))


# --- the pool ---------------------------------------------------------------------------------


def _spend_burst(pool: AgentPool) -> list[ray.ObjectRef]:
    """Takes what the request bucket holds with tasks that are not measured, so that the k x
    phase starts with it empty, as after a minute at full rate. Returns once every one of them
    holds its request permit (some may still be running: their refs are returned).

    The bucket's level is read only once the tasks sent before hold their permits: a task
    still queued, or waiting at the limiter, has not taken its token yet, and counting the
    level then would send more than the bucket holds. Those extra tasks would wait for the
    refill ahead of the phase's own (the quick run's first seconds measured them)."""
    refs: list[ray.ObjectRef] = []
    while True:
        status = _settled(pool)
        spare = _requests_left(status)
        if spare <= PEAK:
            return refs
        refs += pool.submit([_burst_task(len(refs) + i) for i in range(int(spare))])
        time.sleep(0.2)


def _settled(pool: AgentPool) -> dict[str, Any]:
    """The pool's status once no task waits in its queue or at its limiter."""
    while True:
        status = pool.status()
        if not status["queued"] and not status["limits"]["waiting"]:
            return status
        time.sleep(0.05)


def _requests_left(status: dict[str, Any]) -> float:
    level: float = status["limits"]["models"][MODEL]["dimensions"]["requests"]["level"]
    return level


def _burst_task(k: int) -> AgentTask:
    return AgentTask(tenant="burst", prompt=f"sim: answer b{k}", model=MODEL, fallback_models=[], max_tokens=16)


def _reconcile(pool: AgentPool, submitted: list[AgentResult]) -> tuple[int, int]:
    """(lost, duplicated): tasks without exactly one record and one results-stream entry."""
    client = redis.Redis.from_url(pool.redis_url, decode_responses=True)
    keys = Keys(pool.config.key_prefix)
    lost = duplicated = 0
    for tenant in WEIGHTS:
        entries = Counter(f["task_id"] for _, f in client.xrange(keys.results(tenant)))
        for result in (r for r in submitted if r.tenant == tenant):
            if client.get(keys.result(tenant, result.task_id)) is None or entries[result.task_id] == 0:
                lost += 1
            elif entries[result.task_id] > 1:
                duplicated += 1
    client.close()
    return lost, duplicated


@dataclass
class _Phase:
    """One measured phase of the pool at k x peak: its results, timeline and 429s."""

    results: list[AgentResult]
    timeline: Timeline
    elapsed_s: float
    provider_429: int
    #: Each task's priority class, by task_id.
    priorities: dict[str, str]

    @property
    def succeeded(self) -> list[AgentResult]:
        return [r for r in self.results if r.status == "succeeded"]

    @property
    def rejected(self) -> list[AgentResult]:
        return [r for r in self.results if r.status == "rejected"]


def _phase(pool: AgentPool, load: float, duration_s: float, seed: int, gaps: Gaps, make: MakeTask) -> _Phase:
    """Spends the buckets' burst, then offers `load` x peak for `duration_s`."""
    wait_idle(pool)
    burst = _spend_burst(pool)
    before = int((pool.simulator_stats() or {}).get("rate_limited", 0))
    started = time.monotonic()
    timeline = Timeline()
    priorities: dict[str, str] = {}

    def noted(tenant: str, k: int, rng: random.Random) -> AgentTask:
        task = make(tenant, k, rng)
        priorities[task.task_id] = task.priority
        return task

    offered = open_loop(pool, _rates(load), duration_s, seed, noted, timeline=timeline, gaps=gaps)
    elapsed = max(duration_s, time.monotonic() - started)
    ray.get(burst)
    after = int((pool.simulator_stats() or {}).get("rate_limited", 0))
    return _Phase([r for rs in offered.values() for r in rs], timeline, elapsed, after - before, priorities)


def _phase_figures(phase: _Phase, ran_low: list[float], duration_s: float) -> dict[str, Any]:
    high, succeeded, rejected = phase.results, phase.succeeded, phase.rejected
    ran_high = [r.timings.total_ms for r in succeeded]
    reasons = Counter(str(r.error.reason if r.error else None) for r in rejected)
    # Refused on arrival, versus dropped from the queue once their deadline had passed
    # (those waited, by definition, and are timed apart).
    at_once = [r.timings.total_ms for r in rejected if r.error is None or r.error.reason != "queue_timeout"]
    late = [r for r in rejected if r.error is not None and r.error.reason == "queue_timeout"]
    dropped = [r.timings.total_ms for r in late]
    arrivals = Counter(phase.priorities[r.task_id] for r in high)
    return {
        "goodput_ratio": _goodput([phase.timeline.ended_at(r) for r in succeeded], duration_s),
        "admitted_p99_ratio": round(percentile(ran_high, 0.99) / percentile(ran_low, 0.99), 4),
        "reject_p99_ms": round(percentile(at_once, 0.99), 2) if at_once else 0.0,
        "dropped_p99_ms": round(percentile(dropped, 0.99), 2) if dropped else 0.0,
        # Of all rejections, those that came within 10 ms of arrival (the rest waited first).
        "rejected_at_arrival_fraction": round(
            sum(r.timings.total_ms <= ARRIVAL_MS for r in rejected) / len(rejected), 4
        )
        if rejected
        else 1.0,
        "shed_fraction": round(len(rejected) / max(1, len(high)), 4),
        "shed_fraction_by_reason": {k: round(v / max(1, len(high)), 4) for k, v in sorted(reasons.items())},
        # Per class: the share of its arrivals dropped after waiting (the late rejections).
        "queue_timeout_by_priority": {
            p: round(sum(phase.priorities[r.task_id] == p for r in late) / max(1, arrivals[p]), 4)
            for p in sorted(arrivals)
        },
        "provider_429": phase.provider_429,
        "failed_fraction": round(sum(r.status not in ("succeeded", "rejected") for r in high) / max(1, len(high)), 4),
        "admitted_p99_ms": round(percentile(ran_high, 0.99), 1),
        "phase_s": round(phase.elapsed_s, 1),
    }


def run(out: Path, quick: bool, load: float = 2.0) -> dict[str, Any]:
    # Quick: long enough for the bursty phase's gaps to average out and for the unloaded p99
    # to be more than the slowest of a handful (7 s and 3 s read 10-15% low on both).
    duration_s = 15.0 if quick else 60.0
    warm_s = 10.0 if quick else 30.0
    config = PoolConfig(
        name="bench-overload",
        num_workers=2,
        worker_concurrency=64,
        simulator=_sim_config(seed=7),
        limits={MODEL: RateLimit(rpm=RPM)},
        tenants={t: TenantPolicy(weight=w) for t, w in WEIGHTS.items()},
    )
    with AgentPool.start(config) as pool:
        low = [r for rs in open_loop(pool, _rates(0.5), warm_s, 1, _task).values() for r in rs]
        poisson_phase = _phase(pool, load, duration_s, 2, poisson, _task)
        bursty_phase = _phase(pool, load, duration_s, 3, bursty(BURSTY_CV), _spread_task)
        lost, duplicated = _reconcile(pool, low + poisson_phase.results + bursty_phase.results)
        status = pool.status()
    ran_low = [r.timings.total_ms for r in low if r.status == "succeeded"]
    figures: dict[str, Any] = _phase_figures(poisson_phase, ran_low, duration_s)
    figures |= {f"bursty_{k}": v for k, v in _phase_figures(bursty_phase, ran_low, duration_s).items()}
    figures |= {
        "lost_tasks": lost,
        "duplicate_results": duplicated,
        "unloaded_p99_ms": round(percentile(ran_low, 0.99), 1),
        "model_capacity": status.get("model_capacity", {}),
    }
    timeline, succeeded, rejected = poisson_phase.timeline, poisson_phase.succeeded, poisson_phase.rejected
    ran_high = [r.timings.total_ms for r in succeeded]
    naive_figures, naive_ok, naive_ended = _naive(duration_s, warm_s, load)
    figures |= naive_figures
    over_time = timeseries(
        out,
        "overload",
        completed={
            "agentpool: succeeded": [timeline.ended_at(r) for r in succeeded],
            "agentpool: rejected": [timeline.ended_at(r) for r in rejected],
            "naive pool: succeeded": naive_ended,
        },
        by_tenant={t: [timeline.ended_at(r) for r in succeeded if r.tenant == t] for t in WEIGHTS},
        queue=timeline.queue,
        duration_s=duration_s,
        title=f"overload: {load:g}x peak (peak = {PEAK:g} tasks/s; arrivals stop at the dotted line)",
    )
    plot = latency_cdf(
        out,
        "overload",
        {
            "agentpool, 0.5x peak": ran_low,
            f"agentpool, {load:g}x peak (admitted)": ran_high,
            f"agentpool, {load:g}x peak, bursty (admitted)": [r.timings.total_ms for r in bursty_phase.succeeded],
            f"naive pool, {load:g}x peak (completed)": naive_ok,
        },
        title=f"overload: latency of completed tasks at {load:g}x peak",
    )
    notes = (
        f"Simulated tier: {MODEL} at {RPM} RPM server-side and in the pool, lognormal latency (median 400 ms, "
        f"sigma 0.5), 1% 529 and 0.5% 500. One call per task, so peak = {PEAK:g} tasks/s. Arrivals: Poisson, "
        f"{load:g} x peak for {duration_s:g} s (0.5 x for {warm_s:g} s as the latency baseline), three tenants "
        f"(weights {WEIGHTS}), 20% sheddable and 10% critical, deadline_s={DEADLINE_S}. The buckets' burst "
        "(a minute of requests) is spent first. The bursty phase: the same mean rate with Gamma inter-arrival "
        f"gaps (coefficient of variation {BURSTY_CV:g}) and output sizes spread lognormally around "
        f"{OUTPUT_TOKENS} tokens; its figures are prefixed bursty_. The naive baseline: 2 Ray actors called "
        "round-robin, AsyncAnthropic with default retries, no admission control, same arrivals, a fresh simulator."
    )
    write(out, "overload", figures=figures, notes=notes, plots=[plot, over_time], config={"quick": quick, "load": load})
    return figures
