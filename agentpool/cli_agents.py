"""Agents' commands: `agentpool agents register/list/show/diff/use`, `agentpool eval` and
`agentpool rollout start/status/promote/rollback`."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from agentpool.cli_common import AddressOption, NameOption, _connect, console, friendly, stderr

if TYPE_CHECKING:
    from agentpool.eval_run import EvalOutcome
    from agentpool.pool import AgentPool

agents_app = typer.Typer(help="Versioned agent specs: register, list, show, diff, use.")
rollout_app = typer.Typer(help="Shadow and canary rollouts of an agent's new version.")


def _version_line(version: Any) -> str:
    made = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(version.created_unix))
    return f"{version.ref}  sha:{version.short}  {made} UTC"


@agents_app.command("register")
@friendly
def agents_register(
    spec_file: Annotated[Path, typer.Argument(help="YAML or JSON: name, optional label, and the spec's fields.")],
    label: Annotated[str | None, typer.Option("--label", help="Its label (else the file's, else v<n>).")] = None,
    current: Annotated[bool, typer.Option("--current", help="Make it the agent's current version now.")] = False,
    name: NameOption = "agentpool",
    address: AddressOption = None,
) -> None:
    """Registers a version of an agent from SPEC_FILE (the same spec again is the same version)."""
    from agentpool.pool_agents import read_spec_file

    agent, file_label, spec = read_spec_file(spec_file)
    version = _connect(name, address).agents.register(agent, spec, label=label or file_label, current=current)
    print(_version_line(version))


@agents_app.command("list")
@friendly
def agents_list(name: NameOption = "agentpool", address: AddressOption = None) -> None:
    """Lists every agent, its current version and its versions."""
    for agent in _connect(name, address).agents.list():
        refs = ", ".join(v["ref"].split("@")[1] for v in agent["versions"])
        print(f"{agent['name']}  current {agent['current']}  versions: {refs}")


@agents_app.command("show")
@friendly
def agents_show(
    ref: Annotated[str, typer.Argument(help="name, name@label or name@sha:<hex>.")],
    name: NameOption = "agentpool",
    address: AddressOption = None,
) -> None:
    """Shows one version: its reference, hash and spec."""
    version = _connect(name, address).agents.get(ref)
    print(_version_line(version))
    print(json.dumps(version.spec.model_dump(mode="json"), indent=2, sort_keys=True))


@agents_app.command("diff")
@friendly
def agents_diff(
    old: Annotated[str, typer.Argument(help="The first version.")],
    new: Annotated[str, typer.Argument(help="The second version.")],
    name: NameOption = "agentpool",
    address: AddressOption = None,
) -> None:
    """A unified diff of two versions' specs."""
    print(_connect(name, address).agents.diff(old, new) or "(the same spec)", end="")


@agents_app.command("use")
@friendly
def agents_use(
    ref: Annotated[str, typer.Argument(help="The version to run for all of the agent's traffic, now.")],
    name: NameOption = "agentpool",
    address: AddressOption = None,
) -> None:
    """Makes a version the agent's current one at once (a rollout does it in steps)."""
    print(f"current: {_connect(name, address).agents.use(ref).ref}")


@contextlib.contextmanager
def _pool_for(local: bool, name: str, address: str | None) -> Iterator[AgentPool]:
    if not local:
        yield _connect(name, address)
        return
    from agentpool import AgentPool, PoolConfig

    with AgentPool.start(PoolConfig()) as pool:
        yield pool


def _outcome_table(outcome: EvalOutcome) -> Table:
    report = outcome.report
    changes = {d.id: d for d in outcome.diff}
    table = Table(title=f"{report.suite} on {report.agent} {report.version} ({report.reps} run(s) per case)")
    for column in ("case", "pass rate", "score (± sd)", "cost $", "run ms", "failed checks"):
        table.add_column(column, justify="left" if column in ("case", "failed checks") else "right")
    if outcome.baseline is not None:
        table.add_column(f"vs {outcome.baseline.version}")
    for case in report.cases:
        failed = ", ".join(f"{k} x{n}" for k, n in sorted(case.failed_checks.items()))
        row = [case.id, f"{case.pass_rate:.0%}", f"{case.mean_score:.2f} ± {case.score_std:.2f}"]
        row += [f"{case.cost_usd:.5f}", f"{case.mean_run_ms:.0f}", failed]
        if outcome.baseline is not None:
            d = changes.get(case.id)
            row.append(f"{d.change} ({d.baseline:.0%})" if d is not None and d.baseline is not None else "new")
        table.add_row(*row)
    return table


def eval_command(
    suite: Annotated[Path, typer.Argument(help="The suite: JSONL (a case a line) or YAML.")],
    agent: Annotated[str, typer.Option("--agent", help="The version to evaluate (name@label or name@sha:...).")],
    baseline: Annotated[str | None, typer.Option("--baseline", help="The version to compare with.")] = None,
    spec: Annotated[
        list[Path] | None, typer.Option("--spec", help="Register this agent spec file first (repeatable).")
    ] = None,
    reps: Annotated[int | None, typer.Option("--reps", min=1, max=100, help="Runs per case.")] = None,
    min_pass_rate: Annotated[float, typer.Option("--min-pass-rate", min=0, max=1, help="Gate: least pass rate.")] = 0.0,
    max_drop: Annotated[
        float, typer.Option("--max-drop", min=0, max=1, help="Gate: most the pass rate may drop below the baseline's.")
    ] = 0.05,
    tenant: Annotated[str, typer.Option("--tenant", help="The tenant the eval's tasks run as.")] = "eval",
    rerun_baseline: Annotated[
        bool, typer.Option("--rerun-baseline", help="Run the baseline again, not its stored report.")
    ] = False,
    local: Annotated[
        bool, typer.Option("--local", help="Start a local pool for the run (in CI), instead of connecting.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the outcome as JSON.")] = False,
    name: NameOption = "agentpool",
    address: AddressOption = None,
) -> None:
    """Runs an eval suite through the pool on one version of an agent, compares it with a
    baseline, and exits 1 when the gate fails (so a CI job fails)."""
    from agentpool.evals import Gate
    from agentpool.pool_agents import read_spec_file

    with _pool_for(local, name, address) as pool:
        for path in spec or []:
            agent_name, label, agent_spec = read_spec_file(path)
            print(f"registered {_version_line(pool.agents.register(agent_name, agent_spec, label=label))}")
        gate = Gate(min_pass_rate=min_pass_rate, max_drop=max_drop)
        outcome = pool.evaluate(
            suite, agent, baseline=baseline, gate=gate, tenant=tenant, reps=reps, rerun_baseline=rerun_baseline
        )
    report = outcome.report
    if as_json:
        body = {
            "report": report.model_dump(mode="json"),
            "baseline": outcome.baseline.model_dump(mode="json") if outcome.baseline else None,
            "diff": [d.model_dump(mode="json") for d in outcome.diff],
            "gate_failures": outcome.failures,
        }
        print(json.dumps(body, indent=2))
    else:
        console.print(_outcome_table(outcome))
        line = f"pass rate {report.pass_rate:.1%}, mean score {report.mean_score:.2f}, cost ${report.cost_usd:.5f}"
        line += f" (judge ${report.judge_cost_usd:.5f}), p50 {report.p50_run_ms:.0f} ms, p95 {report.p95_run_ms:.0f} ms"
        console.print(line, highlight=False)
        if outcome.baseline is not None:
            counts = outcome.counts()
            summary = ", ".join(f"{counts.get(k, 0)} {k}" for k in ("improved", "regressed", "unchanged"))
            console.print(
                f"vs {outcome.baseline.version} ({outcome.baseline.pass_rate:.1%}): {summary}", highlight=False
            )
    if outcome.failures:
        for failure in outcome.failures:
            stderr.print(f"[red]gate failed:[/] {failure}")
        raise typer.Exit(1)
    if not as_json:
        console.print("gate passed")


@rollout_app.command("start")
@friendly
def rollout_start(
    agent: Annotated[str, typer.Argument(help="The agent.")],
    stable: Annotated[str, typer.Option("--stable", help="The version live traffic runs on (v3, sha:...).")],
    shadow: Annotated[str | None, typer.Option("--shadow", help="Shadow this version.")] = None,
    canary: Annotated[str | None, typer.Option("--canary", help="Canary this version.")] = None,
    fraction: Annotated[float, typer.Option("--fraction", help="Shadow: share of tasks copied.")] = 0.1,
    budget_usd: Annotated[float, typer.Option("--shadow-budget-usd", help="Shadow: spend cap of the copies.")] = 10.0,
    steps: Annotated[str, typer.Option("--steps", help="Canary: shares in percent, step by step.")] = "5,25,50,100",
    hold_s: Annotated[float, typer.Option("--hold-s", help="Canary: least time at each step.")] = 300.0,
    min_tasks: Annotated[int, typer.Option("--min-tasks", help="Canary: least tasks before a decision.")] = 50,
    sticky_key: Annotated[str, typer.Option("--sticky-key", help="Canary: the metadata key of a user.")] = "user_id",
    online: Annotated[
        str | None,
        typer.Option(
            "--online", help='Checks of live answers, as an eval\'s expect (JSON): \'{"contains": "total"}\'.'
        ),
    ] = None,
    name: NameOption = "agentpool",
    address: AddressOption = None,
) -> None:
    """Starts a shadow (--shadow) or a canary (--canary) of a new version against --stable."""
    from agentpool.evals import Expect
    from agentpool.rollouts import Rollout, RolloutRule

    checks = Expect.model_validate_json(online) if online else None
    rule = RolloutRule(steps=[float(s) for s in steps.split(",") if s.strip()], hold_s=hold_s, min_tasks=min_tasks)
    rollout = Rollout(
        agent=agent,
        stable=stable,
        shadow=shadow,
        canary=canary,
        fraction=fraction,
        shadow_budget_usd=budget_usd,
        sticky_key=sticky_key,
        rule=rule,
        online=checks,
    )
    _print_rollout(agent, _connect(name, address).rollouts.start(rollout))


@rollout_app.command("status")
@friendly
def rollout_status(
    agent: Annotated[str | None, typer.Argument(help="One agent (else all).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print it as JSON.")] = False,
    name: NameOption = "agentpool",
    address: AddressOption = None,
) -> None:
    """Shows the pool's rollouts: phase, share, each side's figures, the rule's look, transitions."""
    found = _connect(name, address).rollouts.status(agent)
    if as_json:
        print(json.dumps(found, indent=2))
        return
    if not found:
        print("no rollouts")
    for each, status in found.items():
        _print_rollout(each, status)


@rollout_app.command("promote")
@friendly
def rollout_promote(
    agent: Annotated[str, typer.Argument(help="The agent.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (in the transition).")] = "",
    name: NameOption = "agentpool",
    address: AddressOption = None,
) -> None:
    """Takes the candidate one step up by hand (a shadow becomes a canary)."""
    _print_rollout(agent, _connect(name, address).rollouts.promote(agent, reason=reason))


@rollout_app.command("rollback")
@friendly
def rollout_rollback(
    agent: Annotated[str, typer.Argument(help="The agent.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (in the transition).")] = "",
    name: NameOption = "agentpool",
    address: AddressOption = None,
) -> None:
    """Withdraws the candidate: stable takes all traffic again."""
    _print_rollout(agent, _connect(name, address).rollouts.rollback(agent, reason=reason))


def _print_rollout(agent: str, status: dict[str, Any]) -> None:
    share = (
        f" at {status['weight']:g}% (step {status['step']}/{len(status['steps'])})"
        if status["phase"] == "canary"
        else ""
    )
    print(f"{agent}: {status['phase']}{share}, {status['candidate']} against {status['stable']}")
    for side, figures in status["sides"].items():
        shown = ", ".join(f"{k} {v}" for k, v in figures.items() if v is not None)
        print(f"  {side:<9} {shown}")
    for measure, look in status["looks"].items():
        print(f"  rule: {measure} {look['verdict']} ({look['hits']}/{look['n']}, llr {look['llr']})")
    if status.get("shadow"):
        print("  shadow: " + ", ".join(f"{k} {v}" for k, v in status["shadow"].items()))
    for moved in status["transitions"][-5:]:
        at = time.strftime("%H:%M:%S", time.gmtime(moved["at_unix"]))
        print(f"  {at} {moved['phase']} {moved['weight']:g}%: {moved['reason']}")
