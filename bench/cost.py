"""`cost`: one mixed workload run naively and with the pool's cost features, same run.

The workload, in blocks of 20 tasks (the same blocks in `--quick`, fewer of them):

- 6 repeated questions (3 distinct prompts, each asked twice per block, again in every block);
- 6 deferrable tasks (`deadline_s` of two hours: they can wait for the batch lane);
- 8 interactive tasks of varied difficulty: 4 any model can do, 2 the cheapest model cannot
  (`sim: unable claude-haiku`), 2 only the strongest can (`sim: unable claude-haiku,claude-sonnet`).
  Half of all tasks make a tool call before they answer.

Naive: every task real time on the strongest model (`claude-opus-4-5`), no cache. With the
features: the tenant's response cache on, `model="auto"` (the routing ladder, escalating
when a model says it cannot do the task), the batch lane for the deferrable tasks, and a
per-task dollar cap on every task. Costs are the simulator's usage at the pool's price
table, the same for both; the answers are checked against the expected ones.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from agentpool import AgentPool, AgentResult, AgentTask, CacheMode, PoolConfig, TenantPolicy
from agentpool.lanes import BatchLaneConfig
from agentpool.routing import Routing
from agentpool.simulator import SimulatorConfig, SimulatorServer
from bench.report import _pyplot, write

STRONGEST = "claude-opus-4-5"
#: What a model says when a task is beyond it (the simulator's `sim: unable` answer).
PHRASE = "cannot do this task"
CAP_USD = 0.05


def workload(blocks: int, salt: str) -> list[tuple[str, dict[str, Any], str]]:
    """(kind, task fields, expected answer) for `blocks` blocks of 20 tasks."""
    out: list[tuple[str, dict[str, Any], str]] = []
    for b in range(blocks):
        for q in range(6):
            question = q % 3
            out.append(("repeated", {"prompt": f"FAQ {question}\nsim: answer faq-{question}"}, f"faq-{question}"))
        for d in range(6):
            tool = f'sim: tool shout {{"text": "{salt}{b}{d}"}}\n' if d % 2 else ""
            out.append(("deferrable", {"prompt": f"{tool}sim: answer d{b}-{d}", "deadline_s": 7200}, f"d{b}-{d}"))
        for i in range(8):
            unable = [
                "",
                "",
                "",
                "",
                "claude-haiku",
                "claude-haiku",
                "claude-haiku,claude-sonnet",
                "claude-haiku,claude-sonnet",
            ][i]
            tool = f'sim: tool shout {{"text": "{salt}{b}{i}"}}\n' if i % 2 else ""
            line = f"sim: unable {unable}\n" if unable else ""
            out.append(("interactive", {"prompt": f"{line}{tool}sim: answer i{b}-{i}"}, f"i{b}-{i}"))
    return out


def _run(
    pool: AgentPool, tenant: str, work: list[tuple[str, dict[str, Any], str]], featured: bool, salt: str
) -> list[AgentResult]:
    tasks = []
    for n, (_, fields, _) in enumerate(work):
        extra: dict[str, Any] = {"model": "auto", "max_cost_usd": CAP_USD} if featured else {"model": STRONGEST}
        if not featured:
            fields = {k: v for k, v in fields.items() if k != "deadline_s"}
        tasks.append(
            AgentTask(tenant=tenant, tools=["shout"], timeout_s=600, **fields, **extra, metadata={"n": n, "salt": salt})
        )
    return pool.run(tasks)


def run(out: Path, quick: bool) -> dict[str, Any]:
    blocks = 5 if quick else 20
    sim_config = SimulatorConfig(latency_ms=5, latency_sigma=0, seed=7, batch_delay_ms=500)
    salt = f"s{time.time_ns() % 10**6}"
    warmup, work = workload(blocks + 1, salt)[:20], workload(blocks + 1, salt)[20:]
    with SimulatorServer(sim_config) as sim:
        config = PoolConfig(
            name="bench-cost",
            anthropic_base_url=sim.url,
            anthropic_api_key="bench",
            tool_modules=["tests.toolkit"],
            num_workers=2,
            worker_concurrency=64,
            max_queued=10_000,
            routing=Routing(escalate_when_answer_contains=PHRASE),
            batch_lane=BatchLaneConfig(enabled=True, window_s=0.5, poll_s=0.2, realtime_reserve_s=60),
            tenants={"naive": TenantPolicy(), "featured": TenantPolicy(cache=CacheMode.EXACT)},
        )
        with AgentPool.start(config) as pool:
            # Block after block (the tasks of a block at once): traffic over time, as the
            # cache sees it; naive and featured blocks take turns.
            # One block first, not measured, so the cache holds the repeated questions as it
            # would in steady state: every measured block is alike, however many there are.
            _run(pool, "naive", warmup, False, salt)
            _run(pool, "featured", warmup, True, salt)
            naive, featured, naive_s, featured_s = [], [], 0.0, 0.0
            for b in range(blocks):
                block = work[b * 20 : (b + 1) * 20]
                started = time.monotonic()
                naive += _run(pool, "naive", block, False, salt)
                naive_s += time.monotonic() - started
                started = time.monotonic()
                featured += _run(pool, "featured", block, True, salt)
                featured_s += time.monotonic() - started
            calls = {
                r.task_id: [e.data for e in pool.events(r.task_id, follow=False) if e.event == "llm_call"]
                for r in featured
            }
    kinds = [kind for kind, _, _ in work]
    expected = [answer for _, _, answer in work]

    def cost(results: list[AgentResult]) -> float:
        return sum(r.usage.cost_usd for r in results)

    def success(results: list[AgentResult]) -> float:
        return sum(r.ok and r.answer == e for r, e in zip(results, expected, strict=True)) / len(results)

    made = [c for r in featured for c in calls[r.task_id]]
    from_cache = [c for c in made if c["cached"]]
    on_batch = [c for c in made if c["lane"] == "batch" and not c["cached"]]
    deferrable = [calls[r.task_id] for r, k in zip(featured, kinds, strict=True) if k == "deferrable"]
    figures = {
        "tasks": len(work),
        "cost_per_1000_naive_usd": round(1000 * cost(naive) / len(work), 4),
        "cost_per_1000_featured_usd": round(1000 * cost(featured) / len(work), 4),
        "cost_ratio": round(cost(featured) / cost(naive), 4),
        "success_rate_naive": round(success(naive), 4),
        "success_rate_featured": round(success(featured), 4),
        "cache_hit_rate": round(len(from_cache) / max(1, len(made)), 4),
        "repeated_tasks_from_cache": round(
            sum(1 for r, k in zip(featured, kinds, strict=True) if k == "repeated" and r.usage.cached_responses)
            / max(1, kinds.count("repeated")),
            4,
        ),
        "batch_lane_share_of_calls": round(len(on_batch) / max(1, len(made) - len(from_cache)), 4),
        "deferrable_all_calls_on_batch_lane": round(
            sum(1 for c in deferrable if c and {x["lane"] for x in c} == {"batch"}) / len(deferrable), 4
        ),
        "deadlines_met": round(sum(1 for r in featured if r.status != "timed_out") / len(featured), 4),
        "escalations_per_task": round(sum(r.escalations for r in featured) / len(featured), 4),
        "dollar_caps_exceeded": sum(1 for r in featured if r.usage.cost_usd > CAP_USD),
        "saved_by_batch_lane_per_1000_usd": round(1000 * sum(c["cost_usd"] for c in on_batch) / len(work), 4),
        "saved_by_cache_per_1000_usd": round(1000 * sum(r.usage.saved_usd for r in featured) / len(work), 4),
        "naive_wall_s": round(naive_s, 2),
        "featured_wall_s": round(featured_s, 2),
    }
    out.mkdir(parents=True, exist_ok=True)
    plot = _plot(out, naive, featured, kinds)
    notes = (
        f"{len(work)} tasks ({blocks} blocks of 20: 6 repeated, 6 deferrable, 8 interactive of varied difficulty), "
        "naive then with the features, block after block (a block's tasks at once), against the same "
        "simulator and price table in one run. "
        f"Routing escalates on the phrase {PHRASE!r}; the batch lane groups calls for 0.5 s and the "
        "simulator's batches take 0.5 s; every featured task has a dollar cap of "
        f"${CAP_USD}. Success means the expected answer."
    )
    write(
        out,
        "cost",
        figures=figures,
        notes=notes,
        plots=[plot],
        config={"blocks": blocks, "quick": quick, "simulator": sim_config.model_dump(), "cap_usd": CAP_USD},
    )
    return figures


def _plot(out: Path, naive: list[AgentResult], featured: list[AgentResult], kinds: list[str]) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    groups = ["repeated", "deferrable", "interactive"]
    width = 0.38
    for offset, (label, results) in enumerate((("naive", naive), ("with features", featured))):
        per = [
            1000 * sum(r.usage.cost_usd for r, k in zip(results, kinds, strict=True) if k == g) / max(1, kinds.count(g))
            for g in groups
        ]
        ax.bar([i + offset * width for i in range(len(groups))], per, width, label=label)
    ax.set_xticks([i + width / 2 for i in range(len(groups))], groups)
    ax.set_ylabel("USD per 1,000 tasks")
    ax.set_title("cost by kind of task")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    file_name = "cost_by_kind.png"
    fig.savefig(out / file_name, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return file_name
