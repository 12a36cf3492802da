"""`fairness`: weighted fair sharing across tenants, and a noisy neighbour.

The contended resource is the pool's worker slots (32 slots, ~400 ms per task: about 80
tasks/s, far below what the machine can push, so CPU is not what is shared).

1. Shares: three tenants with weights 1:2:5, each with a standing backlog of tasks of
   different sizes (tokens per task differ, so a fair share is a share of tokens, not of
   tasks). Service is counted in VTC units (input + 2 x output tokens) of the tasks that
   finish inside the window; `jain_index` is Jain's index of the weight-normalised shares
   and `max_share_error` the largest |share - weight share| in absolute terms.
2. Noisy neighbour: two well-behaved tenants (weights 2 and 5) offer Poisson arrivals well
   inside their shares; the p99 of their end-to-end latency is measured alone (baseline, same
   run) and then while a third tenant (weight 1) offers 10x its share.
   `noisy_neighbour_p99_ratio` is the second p99 over the first.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import ray

from agentpool import AgentPool, AgentTask, PoolConfig, SimulatorConfig, TenantPolicy
from agentpool.config import AdmissionConfig
from bench.load import open_loop, require_succeeded, wait_idle
from bench.report import percentile, write

WEIGHTS = {"j1": 1.0, "j2": 2.0, "j5": 5.0}
OUTPUT_TOKENS = {"j1": 60, "j2": 20, "j5": 40}  # different task sizes per tenant
SLOTS = 32
TASK_MS = 400  # mean service time of a task
#: Spread of service times (lognormal sigma), as with real responses of varying length. With
#: near-constant times (sigma ~0.05) a saturated pool starts and ends its tasks in waves, and a
#: newcomer waits up to a whole task for a slot: no non-preemptive queue can avoid that.
SIGMA = 0.5


def _service_ms(rng: random.Random) -> int:
    """One task's service time: lognormal with mean TASK_MS."""
    return round(TASK_MS * math.exp(rng.gauss(0, SIGMA) - SIGMA**2 / 2))


def _task(tenant: str, i: int, service_ms: int, output_tokens: int = 20) -> AgentTask:
    # The service time rides in the task (`sim: delay`), so the same task takes the same time
    # in every phase: the phases differ only in who else is using the pool.
    prompt = f"sim: delay {service_ms}\nsim: output_tokens {output_tokens}\nsim: answer {tenant}-{i}"
    return AgentTask(tenant=tenant, prompt=prompt, max_tokens=100)


def _cost(result: Any) -> float:
    u = result.usage
    return u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens + 2 * u.output_tokens


def _shares(pool: AgentPool, window_s: float) -> dict[str, Any]:
    capacity_per_s = SLOTS / (TASK_MS / 1000)
    per_tenant = int(capacity_per_s * (window_s + 6))
    done_at: dict[ray.ObjectRef, float] = {}
    refs: list[ray.ObjectRef] = []
    rng = random.Random(7)
    for n in range(per_tenant):  # interleaved, so every tenant is backlogged from the start
        refs += pool.submit([_task(t, n, _service_ms(rng), OUTPUT_TOKENS[t]) for t in WEIGHTS])
    pending = list(refs)
    start = time.monotonic() + 2.0  # let the fair queue settle first
    end = start + window_s
    while time.monotonic() < end and pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0.05)
        now = time.monotonic()
        for ref in ready:
            done_at[ref] = now
    for ref in pending:  # the rest of the backlog is not needed
        ray.cancel(ref)
    in_window = [ref for ref, at in done_at.items() if start <= at <= end]
    service = dict.fromkeys(WEIGHTS, 0.0)
    tasks = dict.fromkeys(WEIGHTS, 0)
    for result in ray.get(in_window):
        service[result.tenant] += _cost(result)
        tasks[result.tenant] += 1
    total = sum(service.values())
    target = {t: w / sum(WEIGHTS.values()) for t, w in WEIGHTS.items()}
    share = {t: service[t] / total for t in WEIGHTS}
    x = [share[t] / target[t] for t in WEIGHTS]
    return {
        "jain_index": round(sum(x) ** 2 / (len(x) * sum(v * v for v in x)), 5),
        "max_share_error": round(max(abs(share[t] - target[t]) for t in WEIGHTS), 5),
        "shares": {t: round(share[t], 4) for t in WEIGHTS},
        "tasks_in_window": tasks,
    }


def _open_loop(pool: AgentPool, rates: dict[str, float], duration_s: float, seed: int) -> dict[str, list[float]]:
    """Each measured tenant's end-to-end latencies (ms), in arrival order; the noisy tenant's
    backlog is not measured."""

    def make(tenant: str, k: int, rng: random.Random) -> AgentTask:
        return _task(tenant, k, _service_ms(rng))

    results = open_loop(pool, rates, duration_s, seed, make, measured=set(rates) - {"noisy"})
    latencies: dict[str, list[float]] = {}
    for tenant, tenant_results in results.items():
        require_succeeded(tenant_results, tenant)
        latencies[tenant] = [r.timings.total_ms for r in tenant_results]
    return latencies


def run(out: Path, quick: bool) -> dict[str, Any]:
    window_s = 8.0 if quick else 30.0
    capacity_per_s = SLOTS / (TASK_MS / 1000)
    config = PoolConfig(
        name="bench-fairness",
        num_workers=2,
        worker_concurrency=SLOTS // 2,
        simulator=SimulatorConfig(latency_ms=0, latency_sigma=0, seed=5),  # service times come with the tasks
        tenants={
            **{t: TenantPolicy(weight=w) for t, w in WEIGHTS.items()},
            "calm2": TenantPolicy(weight=2),
            "calm5": TenantPolicy(weight=5),
            "noisy": TenantPolicy(weight=1),
        },
        admission=AdmissionConfig(max_queue_wait_s=3600),
    )
    with AgentPool.start(config) as pool:
        pool.run([_task("warmup", i, TASK_MS) for i in range(SLOTS)])
        shares = _shares(pool, window_s)
        calm = {"calm2": capacity_per_s * 0.1, "calm5": capacity_per_s * 0.1}  # well inside 2/8 and 5/8
        wait_idle(pool)
        alone = _open_loop(pool, calm, window_s, seed=1)
        noisy_rate = 10 * capacity_per_s * 1 / 8  # ten times the noisy tenant's share
        wait_idle(pool)
        crowded = _open_loop(pool, {**calm, "noisy": noisy_rate}, window_s, seed=1)
        shed = pool.status()["shed_by_reason"]
    p99_alone = percentile([v for vs in alone.values() for v in vs], 0.99)
    p99_crowded = percentile([v for vs in crowded.values() for v in vs], 0.99)
    # The same tasks (same arrival times, same service times) in both phases: what the noisy
    # tenant added to each one.
    added = [c - a for t in alone for a, c in zip(alone[t], crowded[t], strict=True)]
    figures: dict[str, Any] = {
        "jain_index": shares["jain_index"],
        "max_share_error": shares["max_share_error"],
        "noisy_neighbour_p99_ratio": round(p99_crowded / p99_alone, 4),
        "calm_p99_ms_alone": round(p99_alone, 1),
        "calm_p99_ms_with_noisy": round(p99_crowded, 1),
        "calm_added_ms_p50": round(percentile(added, 0.5), 1),
        "calm_added_ms_p99": round(percentile(added, 0.99), 1),
        "calm_tasks_measured": sum(len(v) for v in crowded.values()),
        "shares": shares["shares"],
        "tasks_in_window": shares["tasks_in_window"],
        "shed_by_reason": shed,
    }
    notes = (
        f"Weights {WEIGHTS}; output tokens per task {OUTPUT_TOKENS}; window {window_s}s; "
        f"{SLOTS} slots; service times lognormal, mean {TASK_MS} ms, sigma {SIGMA}, carried by each task "
        f"(~{capacity_per_s:.0f} tasks/s). Noisy phase: the same calm tasks "
        f"at {calm} tasks/s, noisy at {noisy_rate:.0f} tasks/s (ten times its 1/8 share)."
    )
    write(out, "fairness", figures=figures, notes=notes, config={"quick": quick, "window_s": window_s})
    return figures
