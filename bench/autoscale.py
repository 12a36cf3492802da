"""`autoscale`: the agent-worker count under a load ramp (up, plateau, down, idle).

Open-loop Poisson arrivals whose rate ramps from a trickle to a plateau the starting
workers cannot hold and back down; tasks take about 1 s (a 1 s simulated provider). The
pool starts at `min_workers` and may grow to `max_workers`. Sampled every 0.25 s: demand
(loops running or queued), workers taking tasks, and the count the autoscaler wants.

- `peak_workers`, `final_workers`: the largest count, and the count once idle again.
- `scale_moves`: how many times the count changed; `reversals`: how often it turned from
  growing to shrinking or back (one of each is the least a ramp up and down can take).
- `succeeded_fraction`: every task submitted must succeed through the moves.
- `time_to_peak_s`: from the first sample with demand above what the starting workers
  target to the first sample at the peak count.
"""

from __future__ import annotations

import itertools
import random
import time
import uuid
from pathlib import Path
from typing import Any

import ray

from agentpool import AgentPool, AgentTask, AutoscaleConfig, PoolConfig, SimulatorConfig
from bench.report import _pyplot, write

CONCURRENCY = 8
TARGET = 6.0


def _ramp(t: float, span: float, peak_rate: float) -> float:
    """Arrivals per second at time t: up over the first quarter, plateau, down, then none."""
    q = span / 4
    if t < q:
        return peak_rate * max(0.1, t / q)
    if t < 2 * q:
        return peak_rate
    if t < 3 * q:
        return peak_rate * max(0.0, 1 - (t - 2 * q) / q)
    return 0.0


def _sample(pool: AgentPool, started: float) -> tuple[float, int, int, int]:
    """(seconds since the start, demand: loops running or queued, workers taking tasks, desired)."""
    s = pool.status()
    workers = s["workers"]
    return time.monotonic() - started, s["in_flight"] + s["queued"], workers["count"], workers["desired"]


def run(out: Path, quick: bool) -> dict[str, Any]:
    span = 24.0 if quick else 80.0
    peak_rate = 20.0  # tasks/s of ~1 s each: about 20 loops, 3-4 workers' worth at the target
    scaling = AutoscaleConfig(
        min_workers=1,
        max_workers=6,
        target_loops_per_worker=TARGET,
        upscale_delay_s=1.0 if quick else 3.0,
        downscale_delay_s=3.0 if quick else 10.0,
        interval_s=0.25,
    )
    config = PoolConfig(
        name=f"bench-autoscale-{uuid.uuid4().hex[:6]}",
        num_workers=1,
        worker_concurrency=CONCURRENCY,
        simulator=SimulatorConfig(latency_ms=1000, latency_sigma=0.2, seed=3),
        autoscale=scaling,
    )
    rng = random.Random(7)
    samples: list[tuple[float, int, int, int]] = []  # t, demand, workers, desired
    refs: list[ray.ObjectRef] = []
    with AgentPool.start(config) as pool:
        started = time.monotonic()
        next_arrival = started
        next_sample = started
        while (now := time.monotonic()) - started < span:
            rate = _ramp(now - started, span, peak_rate)
            if rate > 0 and now >= next_arrival:
                refs += pool.submit([AgentTask(tenant="ramp", prompt=f"sim: answer {len(refs)}", timeout_s=120)])
                next_arrival = now + rng.expovariate(rate)
            elif rate == 0:
                next_arrival = now
            if now >= next_sample:
                samples.append(_sample(pool, started))
                next_sample += 0.25
            time.sleep(max(0.0, min(next_arrival, next_sample) - time.monotonic()))
        results = ray.get(refs)
        settle_until = time.monotonic() + scaling.downscale_delay_s * 3 + 10
        while time.monotonic() < settle_until:  # idle: the count should come back to the minimum
            samples.append(_sample(pool, started))
            _, demand, count, _ = samples[-1]
            if count == scaling.min_workers and demand == 0:
                break
            time.sleep(0.25)
    counts = [w for _, _, w, _ in samples]
    moves = [b - a for a, b in itertools.pairwise(counts) if b != a]
    reversals = sum(1 for a, b in itertools.pairwise(moves) if (a > 0) != (b > 0))
    peak = max(counts)
    over = next((t for t, d, _, _ in samples if d > TARGET * (1 + scaling.tolerance)), None)
    at_peak = next((t for t, _, w, _ in samples if w == peak), None)
    figures: dict[str, Any] = {
        "peak_workers": peak,
        "final_workers": counts[-1],
        "scale_moves": len(moves),
        "reversals": reversals,
        "succeeded_fraction": round(sum(r.status == "succeeded" for r in results) / max(1, len(results)), 4),
        "tasks": len(results),
        "time_to_peak_s": round(at_peak - over, 2) if over is not None and at_peak is not None else None,
        "trace": [[round(t, 2), d, w, want] for t, d, w, want in samples[:: max(1, len(samples) // 400)]],
    }
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    ts = [t for t, *_ in samples]
    ax.plot(ts, [d / TARGET for _, d, _, _ in samples], label=f"demand / {TARGET:g} loops per worker", alpha=0.6)
    ax.step(ts, counts, where="post", label="workers taking tasks", linewidth=2)
    ax.step(ts, [w for *_, w in samples], where="post", label="desired", linestyle="--")
    ax.set_xlabel("seconds")
    ax.set_ylabel("workers")
    ax.legend()
    ax.set_title("agent workers under a load ramp")
    fig.tight_layout()
    fig.savefig(out / "autoscale_workers.png", dpi=110)
    plt.close(fig)
    notes = (
        f"Arrivals ramp to {peak_rate:g}/s over {span / 4:g}s, hold, ramp down and stop; tasks take ~1 s. "
        f"Workers of {CONCURRENCY} loops, target {TARGET:g} loops per worker, min {scaling.min_workers}, "
        f"max {scaling.max_workers}, upscale delay {scaling.upscale_delay_s:g}s, downscale delay "
        f"{scaling.downscale_delay_s:g}s. Single node: the Ray autoscaler adding nodes is out of scope here."
    )
    cfg = {"quick": quick, "span_s": span, "peak_rate": peak_rate, **scaling.model_dump()}
    write(out, "autoscale", figures=figures, notes=notes, config=cfg, plots=["autoscale_workers.png"])
    return figures
