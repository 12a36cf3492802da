"""The `agentpool` command: demo, start/stop/drain (`cli_life`), serve (HTTP), keys, submit, cancel/approve,
results, status, trace, simulator; agents, eval and rollout (`cli_agents`)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from agentpool.batch_view import demo_tasks, redis_cli_command, summary_table
from agentpool.cli_agents import agents_app, eval_command, rollout_app
from agentpool.cli_common import (
    AddressOption,
    NameOption,
    PrefixOption,
    RedisUrlOption,
    _connect,
    _debug,
    console,
    friendly,
    stderr,
)
from agentpool.cli_http import keys_app, serve
from agentpool.cli_life import drain, start, stop, upgrade
from agentpool.cluster.acl import display_url
from agentpool.models import AgentResult, AgentTask

if TYPE_CHECKING:  # imported late at run time: `agentpool --help` starts without Ray
    from agentpool.pool import AgentPool

app = typer.Typer(
    help="A distributed pool of LLM agent workers on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
#: At most this many bad lines of a JSONL file are listed.
_MAX_BAD_LINES = 50


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks and Ray's own log lines.", envvar="AGENTPOOL_DEBUG")
    ] = False,
) -> None:
    """A distributed pool of LLM agent workers on Ray."""
    _debug["on"] = debug
    if not debug:  # Ray's INFO/WARNING lines are for operators debugging Ray, not for a command's output
        for name in ("ray", "ray._private", "ray.util", "ray.serve"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _run_with_progress(pool: AgentPool, tasks: list[AgentTask]) -> list[AgentResult]:
    import ray

    refs = pool.submit(tasks)
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[AgentResult | None] = [None] * len(refs)
    pending = list(refs)
    columns = (TextColumn("[bold]agents"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("run", total=len(refs))
        while pending:
            ready, pending = ray.wait(pending, num_returns=min(len(pending), 50), timeout=0.2)
            for ref, value in zip(ready, ray.get(ready), strict=True):
                results[index[ref]] = value
            progress.update(bar, advance=len(ready))
    return [r for r in results if r is not None]


def _where_in_redis(pool: AgentPool, tenants: list[str], embedded: bool) -> None:
    url = pool.redis_url
    prefix = pool.config.key_prefix
    console.print(f"\n[bold]Results in Redis[/] at {display_url(url)}")
    for tenant in tenants:
        console.print(
            f"  {prefix}:{{{tenant}}}:results   (stream)   {prefix}:{{{tenant}}}:result:<task_id>   "
            f"{prefix}:{{{tenant}}}:events"
        )
    if embedded:
        console.print("  (this Redis is embedded and stopped with the pool; set AGENTPOOL_REDIS_URL to keep results)")
        return
    console.print(f"  read them: {redis_cli_command(url)} XREAD COUNT 5 STREAMS '{prefix}:{{{tenants[0]}}}:results' 0")


@app.command()
@friendly
def demo(
    tasks: Annotated[int, typer.Option(help="How many tasks to run.")] = 100,
    tenants: Annotated[str, typer.Option(help="Comma-separated tenant names.")] = "acme,globex,initech",
    latency_ms: Annotated[float, typer.Option(help="Simulated provider's median latency.")] = 40.0,
) -> None:
    """Runs a demo batch through a local pool (simulated provider unless ANTHROPIC_API_KEY is set)."""
    from agentpool import AgentPool, PoolConfig

    names = [t.strip() for t in tenants.split(",") if t.strip()]
    config = PoolConfig()
    if config.uses_simulator and "AGENTPOOL_SIMULATOR__LATENCY_MS" not in os.environ:
        config.simulator.latency_ms = latency_ms
    provider = "the simulated provider" if config.uses_simulator else "the Anthropic API"
    console.print(f"[bold]agentpool demo[/]: {tasks} tasks, tenants {', '.join(names)}, against {provider}")
    started = time.monotonic()
    with AgentPool.start(config) as pool:
        console.print(
            f"pool up in {time.monotonic() - started:.1f}s: {config.num_workers} workers x "
            f"{config.worker_concurrency} loops, {config.num_tool_executors} tool executor(s)"
        )
        batch_started = time.monotonic()
        results = _run_with_progress(pool, demo_tasks(tasks, names))
        wall = time.monotonic() - batch_started
        console.print(summary_table(results))
        console.print(f"{len(results)} tasks in {wall:.2f}s ({len(results) / wall:.1f} tasks/s)")
        example = next((r for r in results if r.tool_calls), results[0])
        console.print(f"example: [cyan]{example.task_id}[/] {example.status}: {str(example.answer)[:100]!r}")
        _where_in_redis(pool, names, embedded=config.redis_url is None)


@app.command()
@friendly
def cancel(
    task_id: Annotated[str, typer.Argument(help="The task to stop.")],
    name: NameOption = "agentpool",
    address: AddressOption = None,
) -> None:
    """Cancels a queued, running or paused task and prints its final record (or, if it had
    ended already, the record it ended with)."""
    result = _connect(name, address).cancel(task_id)
    if result is None:
        stderr.print(f"[yellow]pool {name} has no task {task_id}, in progress or ended[/]")
        raise typer.Exit(1)
    if result.status != "cancelled":
        stderr.print(f"task {task_id} had already ended: {result.status}")
    print(result.model_dump_json())


@app.command()
@friendly
def approve(
    task_id: Annotated[str, typer.Argument(help="The paused task.")],
    deny: Annotated[bool, typer.Option("--deny", help="Deny instead of approve.")] = False,
    note: Annotated[str, typer.Option(help="Why; the model sees it with a denial.")] = "",
    name: NameOption = "agentpool",
    address: AddressOption = None,
) -> None:
    """Approves (or with --deny, denies) a task's tool calls waiting for a human."""
    answer = _connect(name, address).approve(task_id, not deny, note=note)
    console.print(f"{task_id}: {answer['status']}")
    if answer["status"] != "decided":
        raise typer.Exit(1)


@app.command()
@friendly
def submit(
    file: Annotated[Path, typer.Argument(help="JSON Lines, one AgentTask per line ('-' for stdin).")],
    output: Annotated[Path | None, typer.Option(help="Write results here as JSON Lines.")] = None,
    detach: Annotated[
        bool, typer.Option("--detach", help="Hand the tasks to a running pool and return at once.")
    ] = False,
    name: NameOption = "agentpool",
    address: AddressOption = None,
) -> None:
    """Submits a batch of tasks from a JSONL file, shows progress and a summary. With
    --detach, hands them to a running detached pool and returns: results land in Redis."""
    from agentpool import AgentPool, PoolConfig

    tasks = read_tasks(file)
    if detach:
        pool = _connect(name, address)
        answers = pool.enqueue(tasks)
        by_status: dict[str, int] = defaultdict(int)
        for answer in answers:
            by_status[answer["status"]] += 1
        console.print(", ".join(f"{n} {status}" for status, n in sorted(by_status.items())))
        where = display_url(pool.redis_url)
        named = "" if name == "agentpool" else f" --name {name}"
        console.print(f"results land in Redis at {where} (`agentpool results TENANT{named}`)")
        return
    config = PoolConfig()
    with AgentPool.start(config) as pool:
        results = _run_with_progress(pool, tasks)
        console.print(summary_table(results))
        if output is not None:
            output.write_text("".join(r.model_dump_json() + "\n" for r in results))
            console.print(f"results written to {output}")
        _where_in_redis(pool, sorted({t.tenant for t in tasks}), embedded=config.redis_url is None)


def read_tasks(file: Path) -> list[AgentTask]:
    """The tasks of a JSON Lines file ('-' for stdin). Every bad line is reported, in one
    pass, before anything is submitted (exit code 2)."""
    if str(file) == "-":
        lines = sys.stdin.read().splitlines()
    else:
        try:
            lines = file.read_text().splitlines()
        except OSError as exc:
            stderr.print(f"[red]error:[/] cannot read {escape(str(file))}: {escape(exc.strerror or str(exc))}")
            raise typer.Exit(2) from None
    tasks: list[AgentTask] = []
    bad: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            tasks.append(AgentTask.model_validate_json(line))
        except ValidationError as exc:
            for err in exc.errors(include_url=False, include_input=False):
                where = ".".join(str(p) for p in err["loc"]) or "(line)"
                bad.append(f"line {number}: {where}: {err['msg']}")
    if bad:
        stderr.print(f"[red]error:[/] {len(bad)} problem(s) in {escape(str(file))}; nothing was submitted")
        for problem in bad[:_MAX_BAD_LINES]:
            stderr.print(f"  {escape(problem)}")
        if len(bad) > _MAX_BAD_LINES:
            stderr.print(f"  ... and {len(bad) - _MAX_BAD_LINES} more")
        raise typer.Exit(2)
    if not tasks:
        stderr.print("[yellow]no tasks in the file[/]")
        raise typer.Exit(1)
    return tasks


def _redis_of(name: str, address: str | None, redis_url: str | None, prefix: str | None) -> tuple[str, str]:
    """The Redis URL and key prefix to read: those given, else the running pool's, by --name."""
    if redis_url:
        return redis_url, prefix or "agentpool"
    pool = _connect(name, address)
    return pool.redis_url, prefix or pool.config.key_prefix


@app.command()
@friendly
def results(
    tenant: Annotated[str, typer.Argument(help="Whose results to read.")],
    follow: Annotated[bool, typer.Option("--follow", help="Keep reading new results (consumer group).")] = False,
    group: Annotated[str, typer.Option(help="Consumer group used with --follow.")] = "agentpool-cli",
    redis_url: RedisUrlOption = None,
    prefix: PrefixOption = None,
    name: NameOption = "agentpool",
    address: AddressOption = None,
) -> None:
    """Prints a tenant's results from Redis as JSON Lines: the Redis of the running pool
    named --name, or the one --redis-url gives (a tenant's credentials, say)."""
    from agentpool.cluster.keys import Keys
    from agentpool.cluster.reader import ResultsReader

    redis_url, prefix = _redis_of(name, address, redis_url, prefix)
    reader = ResultsReader(redis_url, tenant, keys=Keys(prefix))
    stream = reader.follow(group=group) if follow else reader.read()
    try:
        for result in stream:
            print(json.dumps(result.model_dump(mode="json")), flush=True)
    except KeyboardInterrupt:
        pass


@app.command()
@friendly
def status(
    name: NameOption = "agentpool",
    address: AddressOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw status as JSON.")] = False,
    watch: Annotated[
        float | None, typer.Option("--watch", help="Refresh every this many seconds until interrupted.")
    ] = None,
) -> None:
    """Shows a running pool: tenants (queued, in flight, ends, errors, spend today, alerts),
    queues and shedding, rate-limit buckets, today's usage and the tools' breakers."""
    from rich.live import Live

    from agentpool.views import status_view

    pool = _connect(name, address)
    snapshot = pool.status()
    if as_json:
        print(json.dumps(snapshot, indent=2, default=str))
        return
    if watch is None:
        console.print(status_view(snapshot))
        return
    try:
        with Live(status_view(snapshot), console=console, refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(max(0.2, watch))
                live.update(status_view(pool.status()))
    except KeyboardInterrupt:
        pass


@app.command()
@friendly
def trace(
    task_id: Annotated[str, typer.Argument(help="The task to show.")],
    tenant: Annotated[str | None, typer.Option(help="Its tenant (found in Redis when not given).")] = None,
    redis_url: RedisUrlOption = None,
    prefix: PrefixOption = None,
    name: NameOption = "agentpool",
    address: AddressOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the events as JSON Lines.")] = False,
) -> None:
    """Shows a task's timeline from its events: each LLM call and tool call with its timing,
    tokens and cost, and how the task ended. Reads Redis only (the pool's, by --name, when no
    --redis-url is given)."""
    from agentpool.cluster.keys import Keys
    from agentpool.cluster.reader import ResultsReader, find_tenant
    from agentpool.views import timeline_table

    url, prefix = _redis_of(name, address, redis_url, prefix)
    keys = Keys(prefix)
    tenant = tenant or find_tenant(url, task_id, keys=keys)
    if tenant is None:
        console.print(f"[red]no task {task_id} in this Redis (prefix {prefix!r})[/]")
        raise typer.Exit(1)
    reader = ResultsReader(url, tenant, keys=keys)
    events, result = reader.task_events(task_id), reader.get(task_id)
    reader.close()
    if as_json:
        for event in events:
            print(json.dumps(event, default=str))
        return
    console.print(timeline_table(task_id, events, result))


@app.command("tenant-credentials")
@friendly
def tenant_credentials(
    tenant: Annotated[str, typer.Argument(help="The tenant whose consumers get the credentials.")],
    revoke: Annotated[bool, typer.Option("--revoke", help="Delete the tenant's ACL user instead.")] = False,
    redis_url: Annotated[
        str | None, typer.Option(envvar="AGENTPOOL_REDIS_URL", help="Admin Redis URL (else the pool's, by --name).")
    ] = None,
    prefix: PrefixOption = None,
    name: NameOption = "agentpool",
    address: AddressOption = None,
) -> None:
    """Prints a Redis URL that can read only TENANT's keys (a Redis ACL user; other keys give
    NOPERM), for `agentpool results TENANT --redis-url URL`. Running it again rotates the
    password; --revoke deletes the user."""
    from agentpool.cluster.acl import create_tenant_credentials, revoke_tenant_credentials
    from agentpool.cluster.keys import Keys

    url, prefix = _redis_of(name, address, redis_url, prefix)
    if revoke:
        existed = revoke_tenant_credentials(url, tenant, keys=Keys(prefix))
        console.print(f"tenant {tenant}: credentials {'revoked' if existed else 'did not exist'}")
        return
    print(create_tenant_credentials(url, tenant, keys=Keys(prefix)))


@app.command()
@friendly
def cost(
    name: NameOption = "agentpool",
    address: AddressOption = None,
    days: Annotated[int, typer.Option("--days", min=1, max=35, help="UTC days back, today included.")] = 7,
    tenant: Annotated[str | None, typer.Option("--tenant", help="One tenant only.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Shows what a running pool spent over a period: by tenant, model and lane, and what the
    response cache and the batch lane saved against list prices."""
    from agentpool.views import cost_view

    report = _connect(name, address).cost(days=days, tenant=tenant)
    if as_json:
        console.print_json(json.dumps(report))
        return
    console.print(cost_view(report))


@app.command("metrics-targets")
@friendly
def metrics_targets(name: NameOption = "agentpool", address: AddressOption = None) -> None:
    """Prints where the pool's processes serve /metrics (OTEL_METRICS_EXPORTER=prometheus), as a
    Prometheus file_sd_configs JSON file."""
    pool = _connect(name, address)
    print(json.dumps(pool.metrics_targets(), indent=2))


@app.command()
@friendly
def simulator(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8765,
    latency_ms: Annotated[float, typer.Option(help="Median latency per response.")] = 20.0,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute per model.")] = None,
    itpm: Annotated[int | None, typer.Option(help="Input tokens per minute per model.")] = None,
    otpm: Annotated[int | None, typer.Option(help="Output tokens per minute per model.")] = None,
    fault: Annotated[list[str] | None, typer.Option(help="STATUS=RATE, e.g. 529=0.01; repeatable.")] = None,
) -> None:
    """Serves the simulated Anthropic Messages API until interrupted."""
    from agentpool.simulator import SimulatorConfig, SimulatorServer

    rates = {int(k): float(v) for k, v in (f.split("=", 1) for f in fault or [])}
    config = SimulatorConfig(latency_ms=latency_ms, rpm=rpm, itpm=itpm, otpm=otpm, fault_rates=rates)
    server = SimulatorServer(config, port=port)
    url = server.start()
    console.print(f"simulated Anthropic API at {url}  (ANTHROPIC_BASE_URL={url}; stats at {url}/sim/stats)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


app.command()(start)
app.command()(stop)
app.command()(drain)
app.command()(upgrade)
app.add_typer(keys_app, name="keys")
app.command()(serve)
app.add_typer(agents_app, name="agents")
app.add_typer(rollout_app, name="rollout")
app.command("eval")(friendly(eval_command))


if __name__ == "__main__":
    app()
