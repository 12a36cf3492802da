"""Runs an eval suite through a pool (`pool.evaluate`, `agentpool eval`): every case, `reps`
times, as ordinary tasks of the eval's own tenant on one pinned version of the agent (same
admission, budgets and traces as live work); a judge agent grades the cases that ask for
one, its cost counted apart; the report is stored in Redis by suite and version and, given
a baseline, diffed against it and gated."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agentpool.agents import AgentVersion
from agentpool.cluster.agents import AgentRegistry
from agentpool.cluster.keys import Keys
from agentpool.evals import (
    CaseDiff,
    EvalCase,
    EvalReport,
    EvalSuite,
    Gate,
    Scorer,
    case_report,
    diff,
    load_scorer,
    score_run,
)
from agentpool.models import AgentResult, AgentTask
from agentpool.pool_front import _blocking
from agentpool.vocabulary import EventType

#: An `AgentPool` (named loosely: the pool's module is above this one).
AgentPool = Any

#: The tenant eval tasks run as, unless told otherwise.
EVAL_TENANT = "eval"
#: Eval tasks are sent in chunks of this many (`pool.map` keeps memory bounded).
_CHUNK = 1000


@dataclass
class EvalOutcome:
    """What `pool.evaluate` found: the report, the baseline's (if any), the diff, and why
    the gate failed (empty: it passed)."""

    report: EvalReport
    baseline: EvalReport | None = None
    diff: list[CaseDiff] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for case in self.diff:
            out[case.change] = out.get(case.change, 0) + 1
        return out


def _registry(pool: AgentPool, call: Callable[[AgentRegistry], Any]) -> Any:
    keys = Keys(pool.config.key_prefix)
    return _blocking(pool.redis_url, lambda r: call(AgentRegistry(r, keys)))


def run_suite(
    pool: AgentPool,
    suite: EvalSuite,
    version: AgentVersion,
    *,
    tenant: str = EVAL_TENANT,
    scorers: dict[str, Scorer] | None = None,
) -> EvalReport:
    """Runs the suite on one version; stores and returns its report."""
    started = time.time()
    run_id = uuid.uuid4().hex[:8]
    pinned = f"{version.name}@sha:{version.sha}"
    tasks: list[tuple[EvalCase, AgentTask]] = [
        (
            case,
            AgentTask(
                task_id=f"eval-{suite.name}-{run_id}-{case.id}-{rep}"[:128],
                tenant=tenant,
                prompt=case.prompt,
                agent=pinned[:140],
                metadata={**case.metadata, "eval.suite": suite.name, "eval.case": case.id},
            ),
        )
        for case in suite.cases
        for rep in range(suite.reps)
    ]
    results = _run_all(pool, [t for _, t in tasks])
    custom = {ref: load_scorer(ref) for case in suite.cases for ref in case.expect.custom or []}
    judged, judge_cost = _judge(pool, tenant, [(c, results[t.task_id]) for c, t in tasks])
    runs: dict[str, list[tuple[dict[str, float], AgentResult]]] = {c.id: [] for c in suite.cases}
    for case, task in tasks:
        result = results[task.task_id]
        own = {ref: custom[ref] for ref in case.expect.custom or []}
        checks = score_run(
            case,
            result,
            tool_calls=_tool_calls(pool, result) if _needs_calls(case) else (),
            verdict=judged.get(task.task_id),
            scorers={**own, **(scorers or {})},
        )
        runs[case.id].append((checks, result))
    report = EvalReport.of(
        suite.name,
        version.name,
        version.tag,
        suite.reps,
        started,
        [case_report(case_id, r) for case_id, r in runs.items()],
        judge_cost,
    )
    _registry(pool, lambda reg: reg.save_report(report))
    return report


def _run_all(pool: AgentPool, tasks: list[AgentTask]) -> dict[str, AgentResult]:
    return {r.task_id: r for r in pool.map(tasks, chunk=_CHUNK)}


def _needs_calls(case: EvalCase) -> bool:
    return bool(case.expect.tool_called or case.expect.tool_sequence is not None)


def _tool_calls(pool: AgentPool, result: AgentResult) -> list[tuple[str, dict[str, Any] | None]]:
    """The run's tool calls in order, with their arguments (from its `tool_call` events)."""
    calls = [
        (str(e.data.get("tool")), e.data.get("arguments"))
        for e in pool.events(result.task_id, tenant=result.tenant, follow=False)
        if e.event == EventType.TOOL_CALL
    ]
    return calls or [(c.name, None) for c in result.tool_calls]


def _judge(
    pool: AgentPool, tenant: str, runs: list[tuple[EvalCase, AgentResult]]
) -> tuple[dict[str, dict[str, Any]], float]:
    """The judge's verdict on each run whose case asks for one (task id -> verdict), and
    what the judge's calls cost."""
    asks = [(case, result) for case, result in runs if case.expect.judge is not None]
    if not asks:
        return {}, 0.0
    tasks = {}
    for case, result in asks:
        assert case.expect.judge is not None
        prompt = (
            f"Rubric:\n{case.expect.judge.rubric}\n\nThe task given:\n{case.prompt}\n\n"
            f"The answer to judge:\n{result.answer if result.answer is not None else '(no answer)'}"
        )
        judge_task = AgentTask(
            task_id=f"judge-{result.task_id}"[:128],
            tenant=tenant,
            prompt=prompt[:200_000],
            agent=case.expect.judge.agent,
        )
        tasks[judge_task.task_id] = (result.task_id, judge_task)
    verdicts: dict[str, dict[str, Any]] = {}
    cost = 0.0
    for judged in _run_all(pool, [t for _, t in tasks.values()]).values():
        cost += judged.usage.cost_usd
        answer = judged.answer
        if judged.ok and isinstance(answer, dict):
            verdicts[tasks[judged.task_id][0]] = answer
    return verdicts, cost


def evaluate(
    pool: AgentPool,
    suite: EvalSuite,
    agent: str,
    *,
    baseline: str | None = None,
    gate: Gate | None = None,
    tenant: str = EVAL_TENANT,
    scorers: dict[str, Scorer] | None = None,
    rerun_baseline: bool = False,
) -> EvalOutcome:
    """Runs `suite` on the version `agent` names and, given a `baseline`, compares: the
    baseline's stored report of this suite is used (run it now if it has none, or with
    `rerun_baseline`). The gate (default `Gate()`) decides `passed`."""
    version = pool.agents.get(agent)
    report = run_suite(pool, suite, version, tenant=tenant, scorers=scorers)
    before = None
    if baseline is not None:
        base_version = pool.agents.get(baseline)
        before = None if rerun_baseline else _registry(pool, lambda reg: reg.report(suite.name, base_version.tag))
        if before is None or before.reps != suite.reps or {c.id for c in before.cases} != {c.id for c in suite.cases}:
            before = run_suite(pool, suite, base_version, tenant=tenant, scorers=scorers)
    outcome = EvalOutcome(report, before, diff(before, report) if before is not None else [])
    outcome.failures = (gate or Gate()).failures(report, before)
    return outcome
