"""`rollout`: canaries and shadows of an agent's new version on a real pool, in one run.

1. A canary whose candidate fails 20% of its tasks (`sim: fail_share 0.2`), against a
   healthy stable version, steps 5 -> 25 -> 50 -> 100% with a 2 s hold and a minimum of 20
   candidate tasks. Live traffic comes in waves of 100 tasks from 2,000 users (the canary is
   sticky by user); the rule looks once a second. Figures: the canary tasks until the
   rollback, the users who saw a failure, the seconds it took. Several trials (other users
   and prompts each).
2. A healthy candidate (a reworded system prompt) under the same rule: is it promoted to
   100%, after how many canary tasks and seconds.
3. A shadow at 10% against none, in alternating blocks of the same open-loop load (100
   tasks/s, about half of what this pool sustains on two cores): the stable tasks' p99 and
   p50 time from admission to record with the shadow over without. Then a shadow whose
   copies cost ~$0.003 each (a cap of $0.025 a copy) under a $0.2 budget: what the copies
   spent against the budget.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import ray

from agentpool import AgentPool, AgentResult, AgentTask, PoolConfig, TenantPolicy
from agentpool.rollouts import Rollout, RolloutRule
from agentpool.simulator import SimulatorConfig
from agentpool.vocabulary import TaskStatus, Variant
from bench.report import _pyplot, write

SYSTEM = "You are the support agent."
USERS = 2000
WAVE = 100
RULE = RolloutRule(steps=[5, 25, 50, 100], hold_s=2.0, min_tasks=20)
RATE_PER_S = 100
BLOCK_S = 2.0


def _wave(pool: AgentPool, trial: str, wave: int) -> list[tuple[str, AgentResult]]:
    """One wave of live tasks: (the task's user, its result) each."""
    users = [f"{trial}-u{(wave * WAVE + j * 37) % USERS}" for j in range(WAVE)]
    tasks = [
        AgentTask(
            tenant="live",
            prompt=f"Question {trial}-{wave}-{j}: where is my order?",
            agent="support",
            metadata={"user_id": user},
        )
        for j, user in enumerate(users)
    ]
    return list(zip(users, pool.run(tasks), strict=True))


def _canary(pool: AgentPool, candidate: str, trial: str, max_waves: int) -> dict[str, Any]:
    """One canary trial: waves until the rollout ends (or `max_waves`)."""
    pool.rollouts.start(Rollout(agent="support", stable="v1", canary=candidate, rule=RULE))
    started = time.monotonic()
    canary: list[tuple[str, AgentResult]] = []
    shares: list[float] = []
    for wave in range(max_waves):
        done = _wave(pool, trial, wave)
        canary += [(user, r) for user, r in done if r.variant is Variant.CANARY]
        shares.append(sum(r.variant is Variant.CANARY for _, r in done) / len(done))
        time.sleep(1.05)  # the rule looks once a second
        status = pool.rollouts.status("support")["support"]
        if status["phase"] != "canary":
            break
    return {
        "phase": status["phase"],
        "seconds": time.monotonic() - started,
        "canary_tasks": len(canary),
        "canary_failures": sum(not r.ok for _, r in canary),
        "users_who_saw_a_failure": len({user for user, r in canary if not r.ok}),
        "shares": shares,
        "reason": status["transitions"][-1]["reason"],
    }


def _open_loop(pool: AgentPool, seconds: float, tag: str) -> list[AgentResult]:
    """Tasks at RATE_PER_S for `seconds`, sent every 100 ms; their results."""
    refs: list[ray.ObjectRef] = []
    per_tick = RATE_PER_S // 10
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < seconds:
        batch = [
            AgentTask(
                tenant="live", prompt=f"{tag} question {n + j}", agent="support", metadata={"user_id": f"u{n + j}"}
            )
            for j in range(per_tick)
        ]
        n += per_tick
        refs += pool.submit(batch)
        next_at = start + (n / per_tick) * 0.1
        time.sleep(max(0.0, next_at - time.monotonic()))
    return list(ray.get(refs))


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(out: Path, quick: bool) -> dict[str, Any]:
    trials_bad, trials_good, pairs = (2, 1, 8) if quick else (10, 4, 20)
    sim_config = SimulatorConfig(latency_ms=20, latency_sigma=0.25, seed=11)
    salt = f"r{time.time_ns() % 10**6}"
    config = PoolConfig(
        name="bench-rollout",
        # The pool's own simulator actor: the provider in a process of its own, not in this
        # driver, where it would share the interpreter with the load generator.
        simulator=sim_config,
        num_workers=2,
        worker_concurrency=64,
        max_queued=20_000,
        tenants={"live": TenantPolicy(), "shadow": TenantPolicy()},
    )
    with AgentPool.start(config) as pool:
        spec = {"system": SYSTEM, "model": "claude-sonnet-4-5", "max_tokens": 256}
        pool.agents.register("support", spec, label="v1")
        pool.agents.register("support", {**spec, "system": SYSTEM + "\nsim: fail_share 0.2 400"}, label="v2")
        pool.agents.register("support", {**spec, "system": SYSTEM + " Be brief."}, label="v3")
        dear = {**spec, "system": SYSTEM + "\nsim: output_tokens 200", "fallback_models": []}
        pool.agents.register("support", dear, label="v4")
        bad = [_canary(pool, "v2", f"{salt}b{t}", 40) for t in range(trials_bad)]
        good = [_canary(pool, "v3", f"{salt}g{t}", 60) for t in range(trials_good)]
        pool.agents.use("support@v1")
        # Shadow at 10% against none, alternating blocks of the same load.
        plain: list[AgentResult] = []
        shadowed: list[AgentResult] = []
        #: Each block's p99 (ms), by arm: a block's hiccup (a pause of this shared machine)
        #: shows in one block, not in the median of them.
        block_p99: dict[bool, list[float]] = {True: [], False: []}
        copies = 0
        for p in range(pairs):  # which comes first alternates: no drift favours either
            for shadow_on in (p % 2 == 0, p % 2 == 1):
                if not shadow_on:
                    block = _open_loop(pool, BLOCK_S, f"{salt}p{p}")
                    block_p99[False].append(_pct([r.timings.total_ms for r in block], 0.99))
                    plain += block
                    continue
                pool.rollouts.start(Rollout(agent="support", stable="v1", shadow="v3", fraction=0.1))
                block = _open_loop(pool, BLOCK_S, f"{salt}s{p}")
                block_p99[True].append(_pct([r.timings.total_ms for r in block], 0.99))
                shadowed += block
                time.sleep(0.5)  # the last copies end
                copies += pool.rollouts.status("support")["support"]["sides"].get("shadow", {}).get("tasks", 0)
                pool.rollouts.rollback("support", reason="block over")
        # A shadow whose copies are dear, under a small budget.
        budget, cap = 0.2, 0.025
        pool.rollouts.start(
            Rollout(
                agent="support",
                stable="v1",
                shadow="v4",
                fraction=1.0,
                shadow_budget_usd=budget,
                shadow_task_cap_usd=cap,
            )
        )
        _open_loop(pool, 3.0, f"{salt}budget")
        time.sleep(2.0)
        budget_status = pool.rollouts.status("support")["support"]
        spent_status = budget_status["shadow"]
        pool.rollouts.rollback("support", reason="bench over")
    bad_tasks = [t["canary_tasks"] for t in bad]
    failures_seen = [t["users_who_saw_a_failure"] for t in bad]
    figures: dict[str, Any] = {
        "bad_canary_trials": len(bad),
        "bad_canary_rolled_back_share": round(sum(t["phase"] == "rolled_back" for t in bad) / len(bad), 4),
        "bad_canary_tasks_to_rollback_max": max(bad_tasks),
        "bad_canary_tasks_to_rollback_mean": round(sum(bad_tasks) / len(bad_tasks), 2),
        "bad_canary_users_who_saw_a_failure_max": max(failures_seen),
        "bad_canary_users_who_saw_a_failure_mean": round(sum(failures_seen) / len(failures_seen), 2),
        "bad_canary_seconds_to_rollback_mean": round(sum(t["seconds"] for t in bad) / len(bad), 2),
        "healthy_canary_trials": len(good),
        "healthy_canary_promoted_share": round(sum(t["phase"] == "promoted" for t in good) / len(good), 4),
        "healthy_canary_tasks_to_promotion_mean": round(sum(t["canary_tasks"] for t in good) / len(good), 1),
        "healthy_canary_seconds_to_promotion_mean": round(sum(t["seconds"] for t in good) / len(good), 2),
        # The median over blocks of each block's p99, with the shadow over without.
        "shadow_stable_p99_ratio": round(statistics.median(block_p99[True]) / statistics.median(block_p99[False]), 4),
        # The p99 of all of an arm's tasks together (one slow block moves it).
        "shadow_stable_pooled_p99_ratio": round(
            _pct([r.timings.total_ms for r in shadowed], 0.99) / _pct([r.timings.total_ms for r in plain], 0.99), 4
        ),
        "shadow_stable_p50_ratio": round(
            _pct([r.timings.total_ms for r in shadowed], 0.5) / _pct([r.timings.total_ms for r in plain], 0.5), 4
        ),
        "stable_p99_ms_without_shadow": round(_pct([r.timings.total_ms for r in plain], 0.99), 2),
        "stable_p99_ms_with_shadow": round(_pct([r.timings.total_ms for r in shadowed], 0.99), 2),
        # Copies that ran (not shed) per stable task of the shadow blocks.
        "shadow_copy_share": round(copies / max(1, len(shadowed)), 4),
        "shadow_results_returned_to_callers": sum(r.variant is Variant.SHADOW for r in shadowed + plain),
        "stable_failures_during_shadow": sum(r.status != TaskStatus.SUCCEEDED for r in shadowed),
        "shadow_budget_usd": budget,
        "shadow_spent_usd": round(float(spent_status["spent_usd"]), 6),
        "shadow_spent_over_budget": round(float(spent_status["spent_usd"]) / budget, 4),
        "shadow_copies_under_budget": spent_status["copies"],
        "shadow_copies_that_ran_under_budget": budget_status["sides"].get("shadow", {}).get("tasks", 0),
        "shadow_copy_failure_rate_under_budget": budget_status["sides"].get("shadow", {}).get("failure_rate"),
    }
    out.mkdir(parents=True, exist_ok=True)
    plot = _plot(out, bad[0]["shares"], plain, shadowed)
    notes = (
        f"Canary trials: {len(bad)} with a candidate failing 20% of tasks, {len(good)} with a healthy one; "
        f"steps {RULE.steps}, hold {RULE.hold_s} s, at least {RULE.min_tasks} candidate tasks before a decision; "
        f"waves of {WAVE} tasks from {USERS} users, the rule looking once a second. "
        "Users who saw a failure: the distinct users of the failed canary tasks. "
        f"Shadow: {pairs} pairs of {BLOCK_S} s blocks at {RATE_PER_S} tasks/s, shadow at 10% then none; "
        f"time from admission to record. Budget: copies costing ~$0.003 each, cap ${cap}, budget ${budget}. "
        f"Simulator latency {sim_config.latency_ms} ms (sigma {sim_config.latency_sigma}). "
        f"Bad canary ends: {[t['reason'] for t in bad][:3]}. "
        f"Healthy canary ends: {[(t['phase'], t['canary_tasks'], t['reason']) for t in good]}. "
        f"Shadow blocks' p99 (ms), with: {[round(x, 1) for x in block_p99[True]]}; "
        f"without: {[round(x, 1) for x in block_p99[False]]}."
    )
    write(
        out,
        "rollout",
        figures=figures,
        notes=notes,
        plots=[plot],
        config={"quick": quick, "rule": RULE.model_dump(), "simulator": sim_config.model_dump(), "rate": RATE_PER_S},
    )
    return figures


def _plot(out: Path, shares: list[float], plain: list[AgentResult], shadowed: list[AgentResult]) -> str:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(range(1, len(shares) + 1), [100 * s for s in shares], marker="o")
    left.set_xlabel("wave of 100 tasks")
    left.set_ylabel("% of the wave on the canary")
    left.set_title("a canary failing 20%: rolled back")
    left.grid(alpha=0.3)
    for label, results in (("no shadow", plain), ("shadow at 10%", shadowed)):
        times = sorted(r.timings.total_ms for r in results)
        right.plot(times, [i / len(times) for i in range(len(times))], label=label)
    right.set_xscale("log")
    right.set_xlabel("stable task: admission to record, ms")
    right.set_ylabel("share of tasks")
    right.set_title("stable traffic with and without a shadow")
    right.legend()
    right.grid(alpha=0.3)
    file_name = "rollout.png"
    fig.savefig(out / file_name, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return file_name
