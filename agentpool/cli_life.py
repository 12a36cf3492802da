"""A pool's life from the command line: `agentpool start`, `stop`, `drain` and `upgrade`."""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING, Annotated

import typer

from agentpool.cli_common import AddressOption, NameOption, _connect, console, friendly, stderr
from agentpool.cluster.acl import display_url

if TYPE_CHECKING:
    from agentpool.pool import AgentPool
    from agentpool.results import DrainReport

GraceOption = Annotated[
    float, typer.Option("--grace", min=0.0, help="Seconds the running tasks get to end before the stop.")
]


class _Stop(Exception):
    """SIGTERM or SIGINT reached a supervising `start`."""


def _signalled(*_: object) -> None:
    raise _Stop


def print_report(report: DrainReport) -> None:
    """A drain's report, one fact per line."""
    state = "drained" if report.drained else f"grace period ({report.grace_s:g}s) over"
    console.print(f"{state} after {report.elapsed_s:.1f}s: {report.finished} task(s) ended while draining")
    if report.running:
        shown = ", ".join(report.running[:10]) + (" ..." if len(report.running) > 10 else "")
        console.print(f"{len(report.running)} still running (they resume from their checkpoints): {shown}")
    console.print(f"{report.queued} queued (kept in the Redis backlog), {report.paused} awaiting approval")
    if report.refused:
        console.print(f"{report.refused} new task(s) refused while draining (reason `draining`)")


def _terminate(pool: AgentPool, name: str, grace: float | None) -> None:
    """Stops the pool (draining it first for `grace` seconds, if given) and says what is left."""
    report = pool.terminate(grace_s=grace)
    if report is not None:
        print_report(report)
    console.print(f"pool [bold]{name}[/] stopped")


@friendly
def start(
    detach: Annotated[bool, typer.Option("--detach", help="The pool outlives this command.")] = False,
    supervise: Annotated[
        bool,
        typer.Option(
            "--supervise",
            help="Stay in the foreground; on SIGTERM or Ctrl-C drain the pool for --grace seconds, then stop it.",
        ),
    ] = False,
    grace: GraceOption = 30.0,
) -> None:
    """Starts a pool on the Ray cluster at RAY_ADDRESS, or the one `ray start --head` runs on
    this machine (configured by AGENTPOOL_* variables): detached (--detach), or supervised
    by this command (--supervise: a container's or service manager's main process)."""
    from agentpool import AgentPool, PoolConfig

    if detach == supervise:
        stderr.print("[red]error:[/] pass one of --detach (the pool outlives this command) or --supervise")
        raise typer.Exit(2)
    config = PoolConfig()
    pool = AgentPool.start(config, detached=True)
    where = display_url(pool.redis_url)
    import ray

    if detach:
        console.print(f"pool [bold]{config.name}[/] running, detached; Redis at {where}")
        console.print("submit with `agentpool submit FILE --detach`; stop with `agentpool stop`")
        ray.shutdown()  # lets go of the cluster; the detached pool stays
        return
    console.print(f"pool [bold]{config.name}[/] running, supervised by this process; Redis at {where}")
    console.print(f"on SIGTERM or Ctrl-C: drain for up to {grace:g}s, then stop")
    previous = {sig: signal.signal(sig, _signalled) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            time.sleep(3600)
    except _Stop:
        for sig, handler in previous.items():  # a second signal stops at once
            signal.signal(sig, handler)
        console.print("stopping: draining")
        _terminate(pool, config.name, grace)


@friendly
def stop(
    name: NameOption = "agentpool",
    address: AddressOption = None,
    grace: Annotated[
        float | None,
        typer.Option("--grace", min=0.0, help="Drain first: seconds the running tasks get to end."),
    ] = None,
) -> None:
    """Stops a running (detached) pool: its actors and its embedded Redis, if any. With
    --grace, it drains first (no new work; running tasks get that long to end)."""
    _terminate(_connect(name, address), name, grace)


@friendly
def drain(
    grace: GraceOption = 30.0,
    undo: Annotated[bool, typer.Option("--undo", help="Take work again after a drain.")] = False,
    name: NameOption = "agentpool",
    address: AddressOption = None,
) -> None:
    """Stops a running pool taking work (new tasks are rejected with reason `draining` and a
    retry hint; queued ones stay in Redis) and waits up to --grace seconds for the running
    tasks to end; prints what is left. The pool keeps running: stop or upgrade it next, or
    take work again with --undo."""
    pool = _connect(name, address)
    if undo:
        taken = pool.undrain()
        console.print(f"pool [bold]{name}[/] " + ("takes work again" if taken else "was not draining"))
        return
    print_report(pool.drain(grace))


@friendly
def upgrade(
    grace: Annotated[
        float, typer.Option("--grace", min=0.0, help="Seconds each worker's running tasks get to end.")
    ] = 30.0,
    name: NameOption = "agentpool",
    address: AddressOption = None,
) -> None:
    """Restarts every process of a running pool in turn, without stopping it, so that it runs
    the code installed now: the agent workers one at a time (each drained first), the tool
    executors, then the control plane, the scheduler last. No accepted task is lost."""
    report = _connect(name, address).upgrade(grace)
    for worker in report["workers"]:
        cut = f", {worker['cut_short']} task(s) resumed elsewhere" if worker["cut_short"] else ""
        console.print(f"{worker['name']}: pid {worker['pid']} (drained and restarted in {worker['took_s']:.1f}s{cut})")
    for part in (*report["executors"], *report["control"]):
        console.print(f"{part['name']}: pid {part['pid']}")
    console.print(f"pool [bold]{name}[/] upgraded in {report['elapsed_s']:.1f}s")
