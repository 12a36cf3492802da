"""Agents, evals and rollouts on a real pool: tasks that name an agent run its version (and
say so in their records and events), an eval suite gates a bad version and passes a good
one (with its exit code), a shadow never reaches callers, and a canary that fails is
rolled back by its rule."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from typer.testing import CliRunner

from agentpool import AgentPool, AgentTask, PoolConfig, SimulatorConfig, TenantPolicy
from agentpool.cli import app
from agentpool.errors import AgentConflict, InvalidTaskInput, UnknownTool
from agentpool.evals import VERDICT_SCHEMA, EvalSuite, Gate
from agentpool.rollouts import Rollout, RolloutRule
from agentpool.vocabulary import ErrorReason, EventType, TaskStatus, Variant

pytestmark = pytest.mark.usefixtures("ray_session")

GOOD = {"system": "You answer arithmetic questions.", "tools": ["calculator"], "model": "claude-sonnet-4-5"}
BAD = {**GOOD, "system": "You answer arithmetic questions.\nsim: answer I am not sure."}


@pytest.fixture(scope="module")
def pool(redis_url: str) -> Iterator[AgentPool]:
    config = PoolConfig(
        name=f"r{uuid.uuid4().hex[:8]}",
        key_prefix=f"t{uuid.uuid4().hex[:8]}",
        redis_url=redis_url,
        simulator=SimulatorConfig(latency_ms=2, latency_sigma=0),
        num_workers=1,
        worker_concurrency=16,
        tenants={"acme": TenantPolicy(), "defaulted": TenantPolicy(agent="calc")},
    )
    with AgentPool.start(config) as p:
        p.agents.register("calc", GOOD)
        p.agents.register("calc", BAD)
        judge = {"system": "sim: judge answer is 42", "output_schema": VERDICT_SCHEMA}
        p.agents.register("judge", judge, label="strict")
        yield p


def test_a_task_runs_its_agents_version_and_says_so(pool: AgentPool) -> None:
    current, pinned, defaulted = pool.run(
        [
            AgentTask(tenant="acme", prompt="What is 6*7?", agent="calc"),
            AgentTask(tenant="acme", prompt="What is 6*7?", agent="calc@v2"),
            AgentTask(tenant="defaulted", prompt="What is 6*7?"),
        ]
    )
    v1, v2 = pool.agents.get("calc@v1"), pool.agents.get("calc@v2")
    assert current.ok and "42" in current.answer and (current.agent, current.agent_version) == ("calc", v1.tag)
    assert pinned.answer == "I am not sure." and pinned.agent_version == v2.tag
    assert defaulted.ok and defaulted.agent_version == v1.tag  # the tenant's default agent
    entries = list(pool.events(current.task_id, follow=False))
    kinds = {e.event for e in entries}
    assert {EventType.TASK_ADMITTED, EventType.LLM_CALL, EventType.TOOL_CALL, EventType.TASK_END} <= kinds
    assert all((e.agent, e.agent_version) == ("calc", v1.tag) for e in entries)
    [call] = [e for e in entries if e.event == EventType.TOOL_CALL]
    assert call.data["arguments"] == {"expression": "6*7"}


def test_unknown_agents_and_conflicts_are_typed_errors(pool: AgentPool) -> None:
    [missing, no_label] = pool.run(
        [AgentTask(tenant="acme", prompt="x", agent="nobody"), AgentTask(tenant="acme", prompt="x", agent="calc@v9")]
    )
    for result in (missing, no_label):
        assert result.status == TaskStatus.REJECTED and result.error is not None
        assert result.error.reason == ErrorReason.UNKNOWN_AGENT and not result.error.retryable
    assert "calc@v9" not in (missing.error.message if missing.error else "")
    with pytest.raises(InvalidTaskInput, match="from the agent's spec"):
        pool.submit([{"tenant": "acme", "prompt": "x", "agent": "calc", "system": "mine"}])
    with pytest.raises(AgentConflict):
        pool.agents.register("calc", {**GOOD, "max_tokens": 99}, label="v1")  # v1 names another version
    with pytest.raises(UnknownTool):
        pool.agents.register("calc", {**GOOD, "tools": ["no_such_tool"]})
    assert pool.agents.register("calc", GOOD).label == "v1"  # the same spec is the same version
    assert [a["name"] for a in pool.agents.list()] == ["calc", "judge"]
    assert '+  "system": "You answer arithmetic questions.\\nsim: answer I am not sure.",' in pool.agents.diff(
        "calc@v1", "calc@v2"
    )


def suite_file(tmp_path: Path) -> Path:
    cases = [
        {"id": "mult", "input": "What is 6*7?", "expect": {"contains": "42", "tool_called": "calculator"}},
        {
            "id": "args",
            "input": "What is 6*7?",
            "expect": {"tool_called": [{"name": "calculator", "args": {"expression": "6*7"}}]},
        },
        {
            "id": "judged",
            "input": "What is 6*7?",
            "expect": {"judge": {"agent": "judge@strict", "rubric": "Is it 42?"}},
        },
        {"id": "cheap", "input": "Say hi.", "expect": {"max_cost_usd": 1.0, "max_iterations": 2}},
    ]
    path = tmp_path / "arith.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in cases))
    return path


def test_an_eval_passes_a_good_version_and_gates_a_bad_one(pool: AgentPool, tmp_path: Path) -> None:
    suite = EvalSuite.load(suite_file(tmp_path), reps=2)
    good = pool.evaluate(suite, "calc@v1")
    assert good.passed and good.report.pass_rate == 1.0 and good.report.judge_cost_usd > 0
    assert good.report.version == pool.agents.get("calc@v1").tag and good.report.cost_usd > 0
    bad = pool.evaluate(suite, "calc@v2", baseline="calc@v1", gate=Gate(max_drop=0.05))
    assert not bad.passed and "dropped" in bad.failures[0]
    changes = {d.id: d.change for d in bad.diff}
    assert changes == {"mult": "regressed", "args": "regressed", "judged": "regressed", "cheap": "unchanged"}
    assert bad.baseline is not None and bad.baseline.started_unix == good.report.started_unix  # its stored report
    # The command line: exit 1 on a failed gate, 0 on a passed one.
    runner = CliRunner()
    args = ["eval", str(tmp_path / "arith.jsonl"), "--name", pool.config.name]
    failed = runner.invoke(app, [*args, "--agent", "calc@v2", "--baseline", "calc@v1"])
    assert failed.exit_code == 1, failed.output
    assert "regressed" in failed.output and "gate failed" in failed.output
    passed = runner.invoke(app, [*args, "--agent", "calc@v1", "--baseline", "calc@v2"])
    assert passed.exit_code == 0 and "gate passed" in passed.output, passed.output


def test_a_shadow_never_reaches_callers(pool: AgentPool) -> None:
    pool.rollouts.start(Rollout(agent="calc", stable="v1", shadow="v2", fraction=0.5))
    tasks = [AgentTask(tenant="acme", prompt=f"What is {i}*7? sim: delay 5", agent="calc") for i in range(40)]
    results = pool.run(tasks)
    assert all(r.variant is Variant.STABLE and r.agent_version == pool.agents.get("calc@v1").tag for r in results)
    assert all(r.answer != "I am not sure." for r in results)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        shadow = pool.rollouts.status("calc")["calc"]["shadow"]
        if shadow.get("pairs", 0) == shadow["copies"]:
            break
        time.sleep(0.2)
    assert 10 <= shadow["copies"] <= 30 and shadow["pairs"] == shadow["copies"]
    assert shadow["same_answer"] == 0 and shadow["spent_usd"] > 0  # v2 answers otherwise, on its own budget
    copies = list(pool.results("shadow").read())  # the copies' records: the shadow tenant's, not acme's
    assert len(copies) == shadow["copies"] and all(r.variant is Variant.SHADOW for r in copies)
    assert not [r for r in pool.results("acme").read() if r.variant is Variant.SHADOW]


def test_a_failing_canary_is_rolled_back_by_its_rule(pool: AgentPool) -> None:
    flaky = pool.agents.register("calc", {**GOOD, "system": GOOD["system"] + "\nsim: fail_share 0.3 400"})
    rule = RolloutRule(steps=[30, 100], hold_s=0.5, min_tasks=10)
    started = pool.rollouts.start(Rollout(agent="calc", stable="v1", canary=flaky.label or "", rule=rule))
    assert started["phase"] == "canary" and started["weight"] == 30
    sides: Counter[Variant | None] = Counter()
    for batch in range(10):
        results = pool.run(
            [
                AgentTask(tenant="acme", prompt=f"q{batch}-{i} 6*7", agent="calc", metadata={"user_id": f"u{i}"})
                for i in range(40)
            ]
        )
        sides.update(r.variant for r in results)
        time.sleep(1.1)
        if pool.rollouts.status("calc")["calc"]["phase"] != "canary":
            break
    status = pool.rollouts.status("calc")["calc"]
    assert status["phase"] == "rolled_back", status
    assert "errors worse than stable" in status["transitions"][-1]["reason"]
    assert sides[Variant.CANARY] > 0 and sides[Variant.STABLE] > sides[Variant.CANARY]
    # Sticky: one user, one side, while the weights stay.
    after = pool.run([AgentTask(tenant="acme", prompt="6*7", agent="calc", metadata={"user_id": "u1"})])[0]
    assert after.variant is None and after.agent_version == pool.agents.get("calc@v1").tag  # stable takes all
    reasons = [t["reason"] for t in pool.rollouts.transitions()]
    assert any(r.startswith("started") for r in reasons) and any("rolled back by the rule" in r for r in reasons)


def test_a_healthy_canary_is_promoted_by_hand_and_by_its_rule(pool: AgentPool) -> None:
    better = pool.agents.register("calc", {**GOOD, "max_tokens": 900})
    rule = RolloutRule(steps=[50, 100], hold_s=0.2, min_tasks=10, error_margin=0.2)
    pool.rollouts.start(Rollout(agent="calc", stable="v1", canary=better.label or "", rule=rule))
    stepped = pool.rollouts.promote("calc", reason="looks fine")  # by hand: the last step, all traffic
    assert (stepped["phase"], stepped["weight"]) == ("canary", 100)
    assert stepped["transitions"][-1]["reason"] == "looks fine: canary at 100%"
    deadline = time.monotonic() + 30
    while pool.rollouts.status("calc")["calc"]["phase"] == "canary" and time.monotonic() < deadline:
        results = pool.run(
            [AgentTask(tenant="acme", prompt=f"{uuid.uuid4().hex} 6*7", agent="calc") for _ in range(20)]
        )
        assert all(r.variant is Variant.CANARY and r.ok for r in results)
        time.sleep(1.1)
    status = pool.rollouts.status("calc")["calc"]
    assert status["phase"] == "promoted" and status["transitions"][-1]["reason"].startswith("promoted by the rule")
    assert pool.agents.get("calc").sha == better.sha  # the agent's current version now
    after = pool.run([AgentTask(tenant="acme", prompt="6*7", agent="calc")])[0]
    assert after.variant is None and after.agent_version == better.tag
    pool.agents.use("calc@v1")
    assert pool.agents.get("calc").label == "v1"


def test_a_live_canary_survives_a_scheduler_restart(pool: AgentPool) -> None:
    rule = RolloutRule(steps=[30, 100], hold_s=3600, min_tasks=10)
    candidate = pool.agents.register("calc", {**GOOD, "max_tokens": 700})
    pool.rollouts.start(Rollout(agent="calc", stable="v1", canary=candidate.label or "", rule=rule))
    users = [f"sticky-{i}" for i in range(40)]

    def sides() -> list[Variant | None]:
        tasks = [AgentTask(tenant="acme", prompt="6*7", agent="calc", metadata={"user_id": u}) for u in users]
        return [r.variant for r in pool.run(tasks)]

    before = sides()
    assert Variant.CANARY in before and Variant.STABLE in before
    scheduler = ray.get_actor(f"{pool.config.name}-scheduler", namespace="agentpool")
    os.kill(ray.get(scheduler.pid.remote()), signal.SIGKILL)
    status = pool.rollouts.status("calc")["calc"]  # answered by the restarted scheduler
    assert (status["phase"], status["weight"]) == ("canary", 30)
    # The figures are written every 10 s (and at each transition): those of the last
    # seconds may be lost, never made up.
    assert status["sides"].get("candidate", {}).get("tasks", 0) <= before.count(Variant.CANARY)
    assert sides() == before  # each user on the same side as before
