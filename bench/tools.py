"""`tools`: healthy tools stay healthy while a hanging and a crashing tool take half the calls.

Healthy tasks call `calculator` twice (default executor group). Three phases, with the very
same healthy tasks at the same times in each (seeded open-loop arrivals):

1. alone;
2. baseline: beside as many other tasks, the same traffic to a well-behaved tool of the
   `chaos` group (`chaos_echo`);
3. beside as many misbehaving tasks instead: half call `hang_sync` (a sync tool that ignores
   its 0.5 s timeout), half `crash_process` (kills the process it runs in), twice each, as
   the healthy ones call theirs: half the calls asked for go to misbehaving tools.

The `chaos` group runs its tools under process isolation, as a deployment should run tools
it does not trust: each call in a forked child, killed at its timeout, whose crash takes
only itself. A full run repeats phases 2 and 3 with thread isolation (`*_thread_isolation`):
there a hung call keeps its thread until the executor is replaced, and a crash takes the
executor's process, and with it the CPU of a new Ray worker's start on a 2-core machine.

- `healthy_p99_ratio`: p99 end-to-end latency of the healthy tasks in phase 3 over phase 2,
  so that only the tools' behaviour differs (`healthy_p99_ratio_vs_alone` is over phase 1,
  and also counts the doubled LLM traffic of the other tasks).
- `breaker_open_after_calls`: how many calls of a misbehaving tool had run, across every
  worker and executor, when its breaker first opened (the largest of the two tools; a
  breaker truly shared by the cluster opens after `minimum_calls` = 10 failures, plus the
  calls already let through while those 10 were running).
- `max_task_overrun_s`: the largest time any task ran past its `timeout_s` (the bad tasks
  have 0.8 s and two calls of up to 0.5 s each, so those whose calls run hit it).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from agentpool import AgentPool, AgentResult, AgentTask, ExecutorGroupConfig, PoolConfig, SimulatorConfig
from bench.load import open_loop, require_succeeded, wait_idle
from bench.report import percentile, write

TOOLS = ["calculator", "hang_sync", "crash_process", "chaos_echo"]
HEALTHY_RATE = 8.0  # tasks/s, and as many bad ones beside them
BAD_TIMEOUT_S = 0.8
HEALTHY_TIMEOUT_S = 30.0


def _healthy(stream: str, k: int, rng: random.Random) -> AgentTask:
    a, b = rng.randint(1, 10**6), rng.randint(1, 10**6)
    prompt = (
        f'sim: tool calculator {{"expression": "{a}*{b}"}}\n'
        f'sim: tool calculator {{"expression": "{a}+{b}"}}\n'
        f"sim: answer {a * b} {a + b}"
    )
    return AgentTask(tenant="healthy", prompt=prompt, tools=TOOLS, timeout_s=HEALTHY_TIMEOUT_S)


def _bad(stream: str, k: int, rng: random.Random) -> AgentTask:
    if stream == "hang":
        calls = ['sim: tool hang_sync {"seconds": 3600}'] * 2
    else:
        calls = ['sim: tool crash_process {"code": 1}'] * 2
    prompt = "\n".join([*calls, "sim: answer done"])
    return AgentTask(tenant="bad", prompt=prompt, tools=TOOLS, timeout_s=BAD_TIMEOUT_S)


def _decoy(stream: str, k: int, rng: random.Random) -> AgentTask:
    """Stands in for a bad task in the baseline: the same traffic, to a well-behaved tool of
    the same executor group."""
    calls = [f'sim: tool chaos_echo {{"text": "{stream}-{k}"}}'] * 2
    return AgentTask(tenant="bad", prompt="\n".join([*calls, "sim: answer done"]), tools=TOOLS, timeout_s=BAD_TIMEOUT_S)


def _make(stream: str, k: int, rng: random.Random) -> AgentTask:
    return _healthy(stream, k, rng) if stream == "healthy" else _bad(stream, k, rng)


def _make_baseline(stream: str, k: int, rng: random.Random) -> AgentTask:
    return _healthy(stream, k, rng) if stream == "healthy" else _decoy(stream, k, rng)


def _overrun_s(results: list[AgentResult], timeout_s: float) -> float:
    return max((r.timings.run_ms / 1000 - timeout_s for r in results), default=0.0)


def _phases(isolation: str, duration_s: float, *, alone: bool) -> tuple[list[AgentResult], ...]:
    """Runs the phases on a fresh pool whose `chaos` group has the given isolation: the
    healthy tasks alone (when asked), beside well-behaved tools, beside misbehaving ones."""
    config = PoolConfig(
        name=f"bench-tools-{isolation}",
        num_workers=2,
        worker_concurrency=64,
        simulator=SimulatorConfig(latency_ms=50, latency_sigma=0.3, seed=9),
        tool_modules=["agentpool.chaos_tools"],
        # threads: 8 stuck threads get an executor replaced; processes: calls are killed
        executor_groups={"chaos": ExecutorGroupConfig(executors=2, concurrency=16, isolation=isolation)},
    )
    rates = {"healthy": HEALTHY_RATE, "hang": HEALTHY_RATE / 2, "crash": HEALTHY_RATE / 2}
    with AgentPool.start(config) as pool:
        pool.run([_healthy("healthy", i, random.Random(i)) for i in range(16)])  # warm up
        alone_results: list[AgentResult] = []
        if alone:
            alone_results = open_loop(pool, {"healthy": HEALTHY_RATE}, duration_s, 1, _make)["healthy"]
            wait_idle(pool)
        baseline = open_loop(pool, rates, duration_s, 1, _make_baseline)["healthy"]
        wait_idle(pool)
        crowded = open_loop(pool, rates, duration_s, 1, _make)
        status = pool.status()["tools"]
    for results in (alone_results, baseline, crowded["healthy"]):
        require_succeeded(results, "healthy tasks")
    return alone_results, baseline, crowded["healthy"], crowded["hang"] + crowded["crash"], status


def _p99(results: list[AgentResult]) -> float:
    return percentile([r.timings.total_ms for r in results], 0.99)


def run(out: Path, quick: bool) -> dict[str, Any]:
    duration_s = 10.0 if quick else 40.0
    alone, baseline, beside, bad, tools_status = _phases("process", duration_s, alone=True)
    thread_figures: dict[str, Any] = {}
    if not quick:  # the same with the misbehaving tools in the executors' own threads
        _, t_baseline, t_beside, t_bad, t_status = _phases("thread", duration_s, alone=False)
        thread_figures = {
            "healthy_p99_ratio_thread_isolation": round(_p99(t_beside) / _p99(t_baseline), 4),
            "max_task_overrun_s_thread_isolation": round(_overrun_s(t_bad, BAD_TIMEOUT_S), 3),
            "outcomes_thread_isolation": {
                name: t_status["tools"].get(name, {}).get("outcomes", {}) for name in ("hang_sync", "crash_process")
            },
        }
    p99_alone, p99_baseline, p99_beside = _p99(alone), _p99(baseline), _p99(beside)
    outcomes = {name: tools_status["tools"].get(name, {}).get("outcomes", {}) for name in TOOLS}
    opened_after: dict[str, int] = {}
    for entry in tools_status["transitions"]:  # the first opening of each tool
        if entry["to"] == "open":
            opened_after.setdefault(str(entry["tool"]), int(entry["calls_ran_so_far"]))
    overrun = max(_overrun_s(bad, BAD_TIMEOUT_S), _overrun_s(alone + baseline + beside, HEALTHY_TIMEOUT_S))
    figures: dict[str, Any] = {
        "healthy_p99_ratio": round(p99_beside / p99_baseline, 4),
        "breaker_open_after_calls": max(opened_after.values(), default=-1),
        "max_task_overrun_s": round(overrun, 3),
        "healthy_p99_ms_beside_good_tools": round(p99_baseline, 1),
        "healthy_p99_ms_beside_bad_tools": round(p99_beside, 1),
        "healthy_p99_ms_alone": round(p99_alone, 1),
        "healthy_p99_ratio_vs_alone": round(p99_beside / p99_alone, 4),
        "breaker_open_after_calls_by_tool": opened_after,
        "bad_task_statuses": {s: sum(r.status == s for r in bad) for s in sorted({r.status for r in bad})},
        "slowest_healthy_beside_bad_tools": [
            {
                "total_ms": round(r.timings.total_ms),
                "queued_ms": round(r.timings.queued_ms),
                "tool_ms": [round(c.duration_ms) for c in r.tool_calls],
            }
            for r in sorted(beside, key=lambda r: -r.timings.total_ms)[:5]
        ],
        "outcomes": outcomes,
        "transitions": tools_status["transitions"],
        **thread_figures,
    }
    notes = (
        f"{HEALTHY_RATE} healthy tasks/s (two calculator calls each) for {duration_s}s: alone, beside "
        f"{HEALTHY_RATE} tasks/s calling chaos_echo twice, then beside {HEALTHY_RATE} bad tasks/s (two hang_sync "
        f"or two crash_process calls each, timeout_s={BAD_TIMEOUT_S}); the same healthy tasks at the same times "
        "in every phase. The chaos group runs under process isolation (each call a forked child, killed at "
        "its timeout; a crash takes only the child); full runs repeat phases 2 and 3 on a pool whose chaos group "
        "runs tools in the executors' threads (`*_thread_isolation`). Breakers: the pool default (count window of "
        "20, minimum 10 calls, 50% failures, 30 s open)."
    )
    config = {"quick": quick, "duration_s": duration_s, "chaos_group_isolation": "process"}
    write(out, "tools", figures=figures, notes=notes, config=config)
    return figures
