"""What the command line shows of a batch, as plain functions: the demo's tasks, the summary
table per tenant, and a `redis-cli` command line that never shows a password."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from urllib.parse import urlsplit

from rich.table import Table

from agentpool.models import AgentResult, AgentTask

DEMO_PROMPTS: list[tuple[str, list[str], dict[str, object]]] = [
    ("What is {a}*{b}?", ["calculator"], {}),
    ("Search the web: what is a token bucket? ({i})", ["web_search"], {}),
    ("What is ({a}+{b})^2 - {a}?", ["calculator"], {}),
    ("Summarise what Redis streams are, in one line. ({i})", [], {}),
    ('sim: tool web_search {{"query": "capital of France"}}\nsim: answer Paris ({i})', ["web_search"], {}),
    (
        "Give the speed of light as structured data. ({i})",
        [],
        {
            "output_schema": {
                "type": "object",
                "properties": {"quantity": {"type": "string"}, "value": {"type": "number"}},
                "required": ["quantity", "value"],
            }
        },
    ),
    ("sim: fail 529\nsim: answer recovered after a retry ({i})", [], {}),
]


def demo_tasks(n: int, tenants: list[str]) -> list[AgentTask]:
    tasks = []
    for i in range(n):
        prompt, tools, extra = DEMO_PROMPTS[i % len(DEMO_PROMPTS)]
        tasks.append(
            AgentTask(
                tenant=tenants[i % len(tenants)], prompt=prompt.format(i=i, a=1000 + i, b=37 + i), tools=tools, **extra
            )
        )
    return tasks


def summary_table(results: list[AgentResult]) -> Table:
    by_tenant: dict[str, list[AgentResult]] = defaultdict(list)
    for r in results:
        by_tenant[r.tenant].append(r)
    table = Table(title="Results by tenant")
    for column in ("tenant", "tasks", "ok", "other", "tools", "tok in/out", "USD", "p50 ms", "p95 ms"):
        table.add_column(column, justify="left" if column in ("tenant", "other") else "right", no_wrap=True)
    for tenant, rs in sorted(by_tenant.items()):
        statuses: dict[str, int] = defaultdict(int)
        for r in rs:
            statuses[r.status] += 1
        ok = statuses.pop("succeeded", 0)
        latencies = sorted(r.timings.total_ms for r in rs)
        # Nearest rank: the p95 is a latency some task had, and never below the median.
        p95 = latencies[max(0, math.ceil(0.95 * len(latencies)) - 1)]
        tokens_in = sum(
            r.usage.input_tokens + r.usage.cache_read_input_tokens + r.usage.cache_creation_input_tokens for r in rs
        )
        table.add_row(
            tenant,
            str(len(rs)),
            str(ok),
            ", ".join(f"{k}={v}" for k, v in sorted(statuses.items())) or "-",
            str(sum(len(r.tool_calls) for r in rs)),
            f"{tokens_in}/{sum(r.usage.output_tokens for r in rs)}",
            f"{sum(r.usage.cost_usd for r in rs):.4f}",
            f"{statistics.median(latencies):.0f}",
            f"{p95:.0f}",
        )
    return table


def redis_cli_command(url: str) -> str:
    """A `redis-cli` command line for the server at `url` that never shows its password:
    with one, redis-cli asks for it (`--askpass`)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        command = f"redis-cli -s {parts.path}"
    else:
        command = f"redis-cli -h {parts.hostname or 'localhost'} -p {parts.port or 6379}"
        command += " --tls" if parts.scheme == "rediss" else ""
    db = parts.path.strip("/") if parts.scheme != "unix" else ""
    if db and db != "0":
        command += f" -n {db}"
    if parts.username:
        command += f" --user {parts.username}"
    if parts.password:
        command += " --askpass"
    return command
