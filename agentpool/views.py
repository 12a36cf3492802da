"""Rich views of a pool for operators: the status tables (`agentpool status`, live with
`--watch`) and a task's timeline from its events (`agentpool trace TASK_ID`)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from rich.console import Group
from rich.markup import escape
from rich.table import Table

from agentpool.models import AgentResult
from agentpool.vocabulary import EventType


def tenants_table(status: dict[str, Any]) -> Table:
    """Per tenant: queued, running, how its tasks ended, spend today and firing alerts."""
    table = Table(title="tenants", show_header=True)
    for column in (
        "tenant",
        "queued",
        "in flight",
        "succeeded",
        "errors",
        "rejected",
        "other",
        "spend today USD",
        "alerts",
    ):
        table.add_column(column, justify="left" if column in ("tenant", "alerts") else "right")
    depth: dict[str, dict[str, int]] = status.get("queued_by_tenant") or {}
    running: dict[str, int] = status.get("in_flight_by_tenant") or {}
    ends: dict[str, dict[str, int]] = status.get("finished_by_tenant") or {}
    errors: dict[str, int] = status.get("errors_by_tenant") or {}
    budgets: dict[str, Any] = status.get("budgets_today") or {}
    firing: dict[str, list[str]] = status.get("alerts_firing") or {}
    tenants = sorted(set(depth) | set(running) | set(ends) | {t for t, v in budgets.items() if isinstance(v, dict)})
    for tenant in tenants:
        ended = ends.get(tenant, {})
        entry = budgets.get(tenant)
        spent: dict[str, Any] = entry if isinstance(entry, dict) else {}
        other = sum(ended.values()) - ended.get("succeeded", 0) - errors.get(tenant, 0) - ended.get("rejected", 0)
        table.add_row(
            tenant,
            str(sum(depth.get(tenant, {}).values())),
            str(running.get(tenant, 0)),
            str(ended.get("succeeded", 0)),
            f"[red]{errors[tenant]}[/]" if errors.get(tenant) else "0",
            str(ended.get("rejected", 0)),
            str(other),
            f"{spent.get('cost_usd', 0):.4f}",
            ", ".join(firing.get(tenant, [])) or "-",
        )
    return table


def status_tables(status: dict[str, Any]) -> list[Table]:
    """The pool's status as tables: queues and shedding, buckets, budgets, tools."""
    queues = Table(title="queues", show_header=True)
    for column in ("tenant", "critical", "standard", "sheddable", "in flight"):
        queues.add_column(column, justify="right" if column != "tenant" else "left")
    depth: dict[str, dict[str, int]] = status.get("queued_by_tenant", {})
    running: dict[str, int] = status.get("in_flight_by_tenant", {})
    for tenant in sorted(set(depth) | set(running)):
        by_class = depth.get(tenant, {})
        queues.add_row(
            tenant,
            *(str(by_class.get(p, 0)) for p in ("critical", "standard", "sheddable")),
            str(running.get(tenant, 0)),
        )
    workers: dict[str, Any] = status.get("workers") or {}
    queues.caption = (
        f"queued {status.get('queued')}, in flight {status.get('in_flight')}/{status.get('capacity')}, "
        f"workers {workers.get('count')} (wanted {workers.get('desired')}, starting {workers.get('starting')}, "
        f"draining {workers.get('draining')}), "
        f"overload level {status.get('overload_level')}, shed {status.get('shed_by_reason') or {}}, "
        f"loop lag {status.get('loop_lag_ms')} ms"
    )
    buckets = Table(title="global rate limits", show_header=True)
    for column in ("limit", "dimension", "level", "capacity", "waiting", "paused s"):
        buckets.add_column(column)
    limits: dict[str, Any] = status.get("limits", {})
    for key, model in (limits.get("models") or {}).items():
        for dim, level in model["dimensions"].items():
            buckets.add_row(
                key,
                dim,
                f"{level['level']:.0f}",
                f"{level['capacity']:.0f}",
                str(model["waiting"]),
                str(model["paused_for_s"]),
            )
    buckets.caption = f"leases outstanding {limits.get('outstanding')}, waiting {limits.get('waiting')}"
    budgets = Table(title="usage today (UTC)", show_header=True)
    for column in ("tenant", "tokens", "cost USD", "reserved tokens", "calls", "cache hits", "saved USD"):
        budgets.add_column(column)
    for tenant, spent in (status.get("budgets_today") or {}).items():
        if not isinstance(spent, dict):  # {"error": ...} while Redis is away
            continue
        budgets.add_row(
            tenant,
            f"{spent.get('tokens', 0):.0f}",
            f"{spent.get('cost_usd', 0):.4f}",
            f"{spent.get('reserved_tokens', 0):.0f}",
            f"{spent.get('calls', 0):.0f}",
            _hit_rate(spent),
            f"{spent.get('cache_saved_usd', 0):.4f}",
        )
    tools = Table(title="tools", show_header=True)
    for column in ("tool", "breaker", "outcomes"):
        tools.add_column(column)
    board: dict[str, Any] = status.get("tools", {})
    for name, entry in (board.get("tools") or {}).items():
        breaker = entry.get("breaker") or {}
        state = str(breaker.get("state", "none"))
        if "retry_after_s" in breaker:
            state += f" ({breaker['retry_after_s']:.0f}s left)"
        outcomes = ", ".join(f"{kind} {n}" for kind, n in sorted(entry.get("outcomes", {}).items()))
        tools.add_row(name, state, outcomes)
    return [queues, buckets, budgets, tools]


def status_view(status: dict[str, Any], *, now: dt.datetime | None = None) -> Group:
    """Everything `agentpool status` shows, as one renderable (what `--watch` refreshes)."""
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%d %H:%M:%S UTC")
    tenants = tenants_table(status)
    tenants.caption = f"as of {stamp}"
    return Group(*redis_warning(status), tenants, *status_tables(status))


def redis_trouble(status: dict[str, Any]) -> str | None:
    """What is wrong with Redis while it does not answer or writes wait for it, else None."""
    health: dict[str, Any] = status.get("redis") or {}
    if health.get("reachable", True) and not health.get("pending_writes"):
        return None
    return (
        f"{health.get('error') or 'unreachable'}; {health.get('pending_writes', 0)} final records and "
        f"{health.get('pending_events', 0)} events wait in the pool's memory until it is back"
    )


def redis_warning(status: dict[str, Any]) -> list[str]:
    """That, as a line in red; nothing while Redis is well."""
    trouble = redis_trouble(status)
    return [] if trouble is None else [f"[bold red]Redis: {escape(trouble)}[/]"]


def _tokens(data: dict[str, Any]) -> str:
    parts = [f"in {data.get('input_tokens', 0)}", f"out {data.get('output_tokens', 0)}"]
    if data.get("cache_read_input_tokens"):
        parts.append(f"cache read {data['cache_read_input_tokens']}")
    if data.get("cache_creation_input_tokens"):
        parts.append(f"cache write {data['cache_creation_input_tokens']}")
    return ", ".join(parts)


def _detail(event: str, data: dict[str, Any]) -> tuple[str, str, str, str]:
    """(what, tokens, cost, took) of one event's row."""
    if event == EventType.LLM_CALL:
        what = f"{data.get('model')} -> {data.get('stop_reason')}"
        if data.get("attempts", 1) > 1:
            what += f" ({data['attempts']} attempts)"
        return what, _tokens(data), f"{data.get('cost_usd', 0):.6f}", f"{data.get('latency_ms', 0):.0f} ms"
    if event == EventType.TOOL_CALL:
        return f"{data.get('tool')} ({data.get('tool_use_id')})", "", "", ""
    if event == EventType.TOOL_RESULT:
        outcome = "ok" if data.get("ok") else f"[red]{data.get('error_kind')}[/]"
        return f"{data.get('tool')}: {outcome}", "", "", f"{data.get('duration_ms', 0):.0f} ms"
    if event == EventType.RETRY:
        what = f"{data.get('model')} attempt {data.get('attempt')}: {data.get('status')} {data.get('error_type')}"
        return what, "", "", f"wait {data.get('delay_s')} s"
    if event == EventType.FALLBACK:
        return f"{data.get('from_model')} -> {data.get('to_model')}: {data.get('reason', '')[:60]}", "", "", ""
    if event == EventType.TASK_END:
        usage = data.get("usage") or {}
        timings = data.get("timings") or {}
        return (
            f"[bold]{data.get('status')}[/] after {data.get('iterations')} iterations",
            _tokens(usage),
            f"{data.get('cost_usd', usage.get('cost_usd', 0)):.6f}",
            f"{timings.get('total_ms', 0):.0f} ms",
        )
    shown = {k: v for k, v in data.items() if k not in ("iteration",)}
    return ", ".join(f"{k}={v}" for k, v in shown.items())[:100], "", "", ""


def timeline_table(task_id: str, events: list[dict[str, Any]], result: AgentResult | None) -> Table:
    """A task's events in order, with the time since its admission, tokens, cost and timing."""
    table = Table(title=f"task {task_id}", show_header=True)
    for column in ("+ms", "event", "it", "what", "tokens", "cost USD", "took"):
        table.add_column(column, justify="right" if column in ("+ms", "it", "cost USD", "took") else "left")
    start = events[0]["ts"] if events else 0.0
    for event in events:
        data = event["data"]
        what, tokens, cost, took = _detail(event["event"], data)
        iteration = data.get("iteration")
        table.add_row(
            f"{(event['ts'] - start) * 1000:.0f}",
            event["event"],
            "" if iteration is None else str(iteration),
            what,
            tokens,
            cost,
            took,
        )
    if result is not None:
        u, t = result.usage, result.timings
        table.caption = (
            f"{result.status}: {result.iterations} iterations, {len(result.tool_calls)} tool calls, "
            f"tokens in {u.input_tokens} out {u.output_tokens} cache read {u.cache_read_input_tokens} "
            f"write {u.cache_creation_input_tokens}, cost ${u.cost_usd:.6f}; queued {t.queued_ms:.0f} ms, "
            f"ran {t.run_ms:.0f} ms, total {t.total_ms:.0f} ms; trace {result.trace_id}"
        )
    elif events:
        table.caption = f"still running; trace {events[0].get('trace_id', '')}"
    return table


def _hit_rate(spent: dict[str, float]) -> str:
    """The response cache's hits of its lookups today, e.g. `12/40 (30%)`; `-` if none."""
    hits, misses = spent.get("cache_hits", 0), spent.get("cache_misses", 0)
    if not hits + misses:
        return "-"
    return f"{hits:.0f}/{hits + misses:.0f} ({hits / (hits + misses):.0%})"


def cost_view(report: dict[str, Any]) -> Group:
    """`agentpool cost`: spend over the period by tenant, model and lane, and the savings."""
    days = report["days"]
    saved = report["saved"]
    cache = report["cache"]
    rate = f"{cache['hit_rate']:.0%}" if cache["hit_rate"] is not None else "-"
    whose = f" for tenant {escape(report['tenant'])}" if report.get("tenant") else ""
    head = (
        f"spent ${report['total_usd']:.4f} on {report['calls']} LLM calls{whose}, {days[-1]} .. {days[0]} (UTC)\n"
        f"saved ${saved['batch_lane_usd']:.4f} by the batch lane and ${saved['response_cache_usd']:.4f} by the "
        f"response cache ({cache['hits']} hits of {cache['hits'] + cache['misses']} lookups, {rate})"
    )
    tables = []
    for group, title in (("by_tenant", "tenant"), ("by_model", "model"), ("by_lane", "lane")):
        table = Table(title=f"by {title}", show_header=True)
        for column in (title, "spend USD", "list USD", "calls"):
            table.add_column(column)
        for key, row in report[group].items():
            table.add_row(key, f"{row['spend_usd']:.4f}", f"{row['list_usd']:.4f}", str(row["calls"]))
        tables.append(table)
    return Group(head, *tables)
