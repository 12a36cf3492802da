"""`ratelimit`: achieved rate over configured rate, per dimension, with the provider enforcing
the same limits server-side; and how many 429s the provider had to send.

Three models run at once through one pool, each with one binding dimension: requests
(sonnet), input tokens (haiku) and output tokens (opus). Every model's buckets start full,
as Anthropic's do, so the window opens only once each binding bucket has been drained to
less than one request's worth; from then on the offered load stays far above the limit.
Achieved amounts are counted by the simulator (what it admitted), not by us.

Baseline, same run: the SDK's own retries (which honour `retry-after`) at the same
concurrency against a fresh simulator with the same request limit and no client-side
limiter: the 429s a pool without admission control costs the provider and itself.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import anthropic
import ray

from agentpool import AgentPool, AgentTask, PoolConfig, RateLimit
from agentpool.config import AdmissionConfig
from agentpool.simulator import SimulatorConfig, SimulatorServer
from agentpool.simulator.config import ModelLimitsConfig
from bench.report import write

BIG = 10**9
PADDING = "token bucket " * 46  # ~600 characters, about 150 input tokens at the simulator's 4 chars/token

# model -> (binding dimension, per-minute limit, the task that exercises it)
PHASES: dict[str, tuple[str, int, dict[str, Any]]] = {
    "claude-sonnet-4-5": ("requests", 300, {"prompt": "sim: answer r", "max_tokens": 16}),
    "claude-haiku-4-5": ("input_tokens", 45_000, {"prompt": f"sim: answer i\n{PADDING}", "max_tokens": 16}),
    "claude-opus-4-5": (
        "output_tokens",
        36_000,
        {"prompt": "sim: output_tokens 100\nsim: answer o", "max_tokens": 120},
    ),
}
#: Steady state before the window opens, once the burst is spent.
SETTLE_S = 3.0
#: Tasks kept outstanding per model: about 30 s of its limit, and all of them fit in the slots.
DEPTH = 150
_LIMIT_FIELD = {"requests": "rpm", "input_tokens": "itpm", "output_tokens": "otpm"}


def _limit(dim: str, value: int) -> dict[str, int]:
    limits = {"rpm": BIG, "itpm": BIG, "otpm": BIG}
    limits[_LIMIT_FIELD[dim]] = value
    return limits


def _tasks(model: str, n: int, start: int) -> list[AgentTask]:
    _, _, spec = PHASES[model]
    tenant = model.split("-")[1]
    return [
        AgentTask(
            tenant=tenant, model=model, fallback_models=[], **{**spec, "prompt": f"{spec['prompt']} #{start + i}"}
        )
        for i in range(n)
    ]


def _admitted(pool: AgentPool) -> dict[str, dict[str, int]]:
    stats = pool.simulator_stats() or {}
    return stats.get("admitted_by_model", {})


class _Feeder:
    """Keeps `depth` tasks outstanding per model, topping up as they finish.

    Far more than a minute's worth submitted at once would not test the limiter better: tasks
    waiting for a permit hold worker slots, and the scheduler hands freed slots to the tenant
    with the cheapest tasks (it is fair in tokens, and the wait is not service), so the other
    models' backlogs would thin out of the slots and their rates fall for want of offered load.
    """

    def __init__(self, pool: AgentPool, depth: int) -> None:
        self.pool = pool
        self.depth = depth
        self.outstanding: dict[str, list[ray.ObjectRef]] = {m: [] for m in PHASES}
        self.submitted = 0
        self._next = 0.0

    def top_up(self) -> None:
        if time.monotonic() < self._next:
            return
        self._next = time.monotonic() + 0.2
        for model, refs in self.outstanding.items():
            if refs:
                _, refs[:] = ray.wait(refs, num_returns=len(refs), timeout=0)
            missing = self.depth - len(refs)
            if missing > 0:
                refs += self.pool.submit(_tasks(model, missing, self.submitted))
                self.submitted += missing

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.top_up()
            time.sleep(min(0.02, max(0.0, end - time.monotonic())))

    def cancel(self) -> None:
        for refs in self.outstanding.values():
            for ref in refs:
                ray.cancel(ref)


def _wait_drained(pool: AgentPool, feeder: _Feeder, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if _drained(pool):
            return True
        feeder.sleep(0.02)
    return False


def _drained(pool: AgentPool) -> bool:
    """Every binding bucket is saturated: below half a request over the grant margin."""
    models = pool.status()["limits"]["models"]
    margin_s = pool.config.limit_margin_s
    for model, (dim, value, spec) in PHASES.items():
        half_request = {"requests": 1, "input_tokens": 210, "output_tokens": spec["max_tokens"]}[dim] / 2
        level = models.get(model, {}).get("dimensions", {}).get(dim, {}).get("level", BIG)
        if level > value / 60 * margin_s + half_request:
            return False
    return True


async def _baseline(rpm: int, concurrency: int, window_s: float) -> dict[str, float]:
    config = SimulatorConfig(latency_ms=20, latency_sigma=0.3, seed=3, rpm=rpm)
    with SimulatorServer(config) as sim:
        client = anthropic.AsyncAnthropic(api_key="bench", base_url=sim.url, max_retries=2)
        give_up = time.monotonic() + 60  # the burst is always spent long before this
        marks: dict[str, float] = {}  # taken at the first 429: the burst is spent

        def going() -> bool:
            if "start" not in marks:
                return time.monotonic() < give_up
            return time.monotonic() < marks["start"] + window_s

        async def caller(k: int) -> None:
            i = 0
            while going():
                i += 1
                try:
                    await client.messages.create(
                        model="claude-sonnet-4-5",
                        max_tokens=16,
                        messages=[{"role": "user", "content": f"sim: answer b{k}-{i}"}],
                    )
                except anthropic.RateLimitError:
                    pass
                if "start" not in marks and sim.sim.stats["status_429"] > 0:
                    marks["start"] = time.monotonic()
                    marks["requests"] = sim.sim.admitted.get("claude-sonnet-4-5", {}).get("requests", 0)
                    marks["429"] = sim.sim.stats["status_429"]

        await asyncio.gather(*(caller(k) for k in range(concurrency)))
        elapsed = time.monotonic() - marks["start"]
        admitted = sim.sim.admitted["claude-sonnet-4-5"]["requests"] - marks["requests"]
        rejected = sim.sim.stats["status_429"] - marks["429"]
        await client.close()
    return {
        "baseline_rpm_ratio": round(admitted / elapsed * 60 / rpm, 4),
        "baseline_provider_429_per_min": round(rejected / elapsed * 60, 1),
    }


def run(out: Path, quick: bool) -> dict[str, Any]:
    window_s = 15.0 if quick else 60.0
    sim_config = SimulatorConfig(
        latency_ms=20,
        latency_sigma=0.3,
        seed=11,
        model_limits={m: ModelLimitsConfig(**_limit(dim, value)) for m, (dim, value, _) in PHASES.items()},
    )
    config = PoolConfig(
        name="bench-ratelimit",
        num_workers=2,
        # Tasks waiting for a permit hold a worker slot: slots are cheap coroutines, so have
        # plenty and let the limiter, not the slot count, decide who goes next.
        worker_concurrency=256,
        simulator=sim_config,
        limits={m: RateLimit(**_limit(dim, value)) for m, (dim, value, _) in PHASES.items()},
        admission=AdmissionConfig(max_queue_wait_s=3600),
    )
    with AgentPool.start(config) as pool:
        # Each model's backlog is several times what its limit lets through in the drain and
        # in the window, so every binding bucket stays saturated throughout.
        feeder = _Feeder(pool, DEPTH)
        started = time.monotonic()
        drained = _wait_drained(pool, feeder, started + 60)
        drain_s = time.monotonic() - started
        # Calls granted in the burst are reserved at max_tokens and refunded the difference
        # when they end: let those refunds come in (and be used) before the window opens.
        feeder.sleep(SETTLE_S)
        drained = drained and _wait_drained(pool, feeder, time.monotonic() + 10)
        t1, first = time.monotonic(), _admitted(pool)
        feeder.sleep(window_s)
        _wait_drained(pool, feeder, time.monotonic() + 10)  # close the window in the same state it opened
        t2, last = time.monotonic(), _admitted(pool)
        stats = pool.simulator_stats() or {}
        status = pool.status()
        feeder.cancel()  # the rest of the offered load is not needed
    if not drained:
        raise RuntimeError(f"binding buckets not drained after {drain_s:.0f}s: the window would include the burst")
    elapsed = t2 - t1
    figures: dict[str, Any] = {}
    for model, (dim, value, _) in PHASES.items():
        achieved = (last[model][dim] - first[model][dim]) / elapsed * 60
        figures[f"{_LIMIT_FIELD[dim]}_ratio"] = round(achieved / value, 4)
    figures["provider_429"] = stats.get("rate_limited", 0)
    figures["provider_429_by"] = stats.get("rate_limited_by", {})
    figures["window_s"] = round(elapsed, 2)
    figures["burst_drain_s"] = round(drain_s, 2)
    figures["leases_granted"] = status["limits"]["stats"]["granted"]
    figures |= asyncio.run(_baseline(PHASES["claude-sonnet-4-5"][1], 128, 8.0 if quick else 30.0))
    notes = (
        "Each `*_ratio` is what the simulator admitted on that model's binding dimension over the "
        "window, per minute, divided by the configured limit (client and server limits are equal). "
        "The window opens and closes with every binding bucket saturated, so its ends can differ by "
        "half a request: about 1% of a 15 s quick window, 0.25% of a 60 s one. "
        "`provider_429` counts every 429 the simulator sent during the pool's whole run, burst included. "
        "The baseline is the bare SDK (max_retries=2, honouring retry-after) at concurrency 128 "
        f"against the same request limit; {DEPTH} pool tasks kept outstanding per model, "
        f"{feeder.submitted} offered in all."
    )
    write(
        out,
        "ratelimit",
        figures=figures,
        notes=notes,
        config={"quick": quick, "window_s": window_s, "phases": {m: [d, v] for m, (d, v, _) in PHASES.items()}},
    )
    return figures
