"""The scheduler's side of agents and rollouts: every task that names an agent is resolved
here as it arrives (its spec's fields filled in, its version and side recorded), shadow
copies are made here, each end is counted on its rollout's side, and the rollout's rule is
applied on the scheduler's tick. The registry and rollouts live in Redis
(`cluster.agents`); this holds a copy, reloaded when the pool's handle changes them.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from agentpool import telemetry as tm
from agentpool.agents import AgentCatalog, AgentRef, AgentVersion, apply_spec
from agentpool.cluster.agents import AgentRegistry
from agentpool.cluster.keys import Keys
from agentpool.errors import AgentConflict, UnknownAgent
from agentpool.evals import EvalCase, score_run
from agentpool.models import AgentResult, AgentTask
from agentpool.rollouts import Rollout, RolloutState, Side, Transition, judge
from agentpool.vocabulary import RolloutPhase, TaskStatus, Variant

log = logging.getLogger("agentpool.scheduler")

#: Live tasks whose shadow comparison waits for the other side's end (the oldest are dropped).
MAX_PAIRS = 10_000
#: How often the sides' figures are written (and on every transition): a restarted
#: scheduler loses at most this much of them.
FIGURES_SAVE_S = 10.0


class AgentDesk:
    """Resolution, shadow copies and rollouts, for one scheduler."""

    def __init__(self, redis: Callable[[], aioredis.Redis], keys: Keys, pool: str) -> None:
        self._redis = redis
        self._keys = keys
        self._pool = pool
        self.catalog = AgentCatalog.empty()
        self.states: dict[str, RolloutState] = {}
        self.sides: dict[str, dict[str, Side]] = {}
        #: live task id -> {"stable": result, "shadow": result} until both are in.
        self._pairs: OrderedDict[str, dict[str, AgentResult]] = OrderedDict()
        self.compared: dict[str, dict[str, int]] = {}
        #: Shadow copies running: task id -> (agent, its cap); and the caps held per agent.
        self._in_flight: dict[str, tuple[str, float]] = {}
        self._reserved: dict[str, float] = {}
        #: Rollouts whose state, or whose figures, changed since they were last written.
        self._dirty: set[str] = set()
        self._figures_dirty: set[str] = set()
        self._figures_saved = 0.0
        self.loaded = False

    @property
    def registry(self) -> AgentRegistry:
        return AgentRegistry(self._redis(), self._keys)

    async def reload(self) -> None:
        """Reads the registry and this pool's rollouts again."""
        await self.save()
        registry = self.registry
        self.catalog = await registry.catalog()
        for agent, (state, sides) in (await registry.rollouts(self._pool)).items():
            if agent not in self.states:  # this scheduler is their only writer: its own copy is the latest
                self.states[agent] = state
                self.sides[agent] = {**_fresh_sides(), **sides}
        self.loaded = True

    # --- arrivals ------------------------------------------------------------------------

    def resolve(self, task: AgentTask, default: str | None) -> AgentTask | UnknownAgent:
        """The task with its agent's spec applied (or as it is, naming none), or why not."""
        if task.agent_version is not None:
            return task  # resolved before: a re-delivery runs on the same version
        ref_text = task.agent or (default if not task.spells_an_agent else None)
        if ref_text is None:
            return task
        try:
            ref = AgentRef.parse(ref_text)
            version, variant = self._version_for(ref, task)
        except UnknownAgent as exc:
            return exc
        return apply_spec(task, version, variant=variant)

    def _version_for(self, ref: AgentRef, task: AgentTask) -> tuple[AgentVersion, Variant | None]:
        state = self.states.get(ref.name)
        if ref.pinned or state is None or not state.phase.live:
            return self.catalog.find(ref), None
        side = state.assign(str(task.metadata.get(state.rollout.sticky_key) or task.task_id))
        tag = state.candidate_tag if side is Variant.CANARY else state.stable_tag
        return self._by_tag(ref.name, tag), side

    def _by_tag(self, name: str, tag: str) -> AgentVersion:
        short = tag.rpartition("+")[2]
        return self.catalog.find(AgentRef(name, sha=short))

    def shadow_copy(self, task: AgentTask) -> AgentTask | None:
        """A copy of a live task for its agent's shadow candidate, if this one is sampled."""
        if task.variant is not Variant.STABLE or task.agent is None:
            return None
        state = self.states.get(task.agent)
        if state is None or state.phase is not RolloutPhase.SHADOW:
            return None
        sides = self.sides.setdefault(task.agent, _fresh_sides())
        committed = sides["shadow"].cost_usd + self._reserved.get(task.agent, 0.0)
        if not state.shadows(task.task_id, committed):
            return None
        rollout = state.rollout
        state.shadow_copies += 1
        self._dirty.add(task.agent)
        copy = apply_spec(
            task.model_copy(update={"agent_version": None, "max_cost_usd": None}),
            self._by_tag(task.agent, state.candidate_tag),
            task_id=f"{task.task_id[:120]}.shadow",
            tenant=rollout.shadow_tenant or task.tenant,
            priority="sheddable",
            variant=Variant.SHADOW,
            shadow_of=task.task_id,
            session_id=None,
            deadline_s=None,
        )
        self._pairs[task.task_id] = {}
        while len(self._pairs) > MAX_PAIRS:
            self._pairs.popitem(last=False)
        cap = min(copy.max_cost_usd or rollout.shadow_task_cap_usd, rollout.shadow_task_cap_usd)
        self._in_flight[copy.task_id] = (task.agent, cap)
        self._reserved[task.agent] = self._reserved.get(task.agent, 0.0) + cap
        return copy.model_copy(update={"max_cost_usd": cap})

    # --- ends ----------------------------------------------------------------------------

    def observe(self, task: AgentTask, result: AgentResult) -> None:
        """Counts a rollout task's end on its side (and its shadow pair, when both are in)."""
        if task.agent is None or task.variant is None:
            return
        held = self._in_flight.pop(task.task_id, None)
        if held is not None:  # a copy's end gives back its cap (what it spent is counted below)
            self._reserved[held[0]] = max(0.0, self._reserved.get(held[0], 0.0) - held[1])
        state = self.states.get(task.agent)
        if state is None or not state.phase.live:
            return
        if result.status == TaskStatus.REJECTED:
            return  # never ran: says nothing of the version
        sides = self.sides.setdefault(task.agent, _fresh_sides())
        version, side = task.agent_version or "", task.variant.value
        labels = {"agent.name": task.agent, "agent.version": version, "agentpool.variant": side}
        tm.rollout_tasks.add(1, {**labels, "agentpool.status": result.status.value})
        name = {Variant.STABLE: "stable", Variant.CANARY: "candidate", Variant.SHADOW: "shadow"}[task.variant]
        sides[name].observe(result, self._online(state.rollout, task, result))
        self._figures_dirty.add(task.agent)
        if state.phase is RolloutPhase.SHADOW:
            self._pair(task, result)

    @staticmethod
    def _online(rollout: Rollout, task: AgentTask, result: AgentResult) -> bool | None:
        if rollout.online is None:
            return None
        case = EvalCase(id="live", input=task.prompt, expect=rollout.online)
        calls = [(c.name, None) for c in result.tool_calls]
        return all(v >= 1 for v in score_run(case, result, tool_calls=calls).values())

    def _pair(self, task: AgentTask, result: AgentResult) -> None:
        pair = self._pairs.get(task.shadow_of or task.task_id)
        if pair is None:  # a live task that was not copied, or a pair dropped for room
            return
        pair["shadow" if task.variant is Variant.SHADOW else "stable"] = result
        if len(pair) < 2:
            return
        del self._pairs[task.shadow_of or task.task_id]
        stable, shadow = pair["stable"], pair["shadow"]
        counts = self.compared.setdefault(str(task.agent), {"pairs": 0, "same_status": 0, "same_answer": 0})
        counts["pairs"] += 1
        counts["same_status"] += stable.status == shadow.status
        counts["same_answer"] += stable.answer == shadow.answer

    # --- control -------------------------------------------------------------------------

    async def tick(self, now_unix: float) -> list[tuple[str, Transition]]:
        """Applies each live canary's rule; saves what changed. Returns the transitions."""
        moved: list[tuple[str, Transition]] = []
        for agent, state in self.states.items():
            sides = self.sides.setdefault(agent, _fresh_sides())
            step = state.advance(sides["stable"], sides["candidate"], now_unix)
            if step is not None:
                moved.append((agent, step))
                await self._settle(agent, state, step)
        await self.save(figures=bool(moved) or now_unix - self._figures_saved >= FIGURES_SAVE_S)
        return moved

    async def _settle(self, agent: str, state: RolloutState, step: Transition) -> None:
        registry = self.registry
        if state.phase is RolloutPhase.PROMOTED:
            version = self._by_tag(agent, state.candidate_tag)
            await registry.set_current(agent, version.sha)
            self.catalog.current[agent] = version.sha
        await registry.post_transition(self._pool, agent, step)
        tm.rollout_transitions.add(1, {"agent.name": agent, "agentpool.rollout_phase": state.phase.value})
        self._dirty.add(agent)
        log.info("rollout of %s: %s", agent, step.reason)

    async def save(self, *, figures: bool = True) -> None:
        """Writes the rollouts that changed; with `figures`, their sides' figures too (up to
        2,000 samples a side: JSON of tens of kilobytes, so not at every look)."""
        registry = self.registry
        for agent in sorted(self._dirty | (self._figures_dirty if figures else set())):
            with_figures = figures and agent in self._figures_dirty
            await registry.save_rollout(self._pool, self.states[agent], self.sides.get(agent) if with_figures else None)
        self._dirty.clear()
        if figures:
            self._figures_dirty.clear()
            self._figures_saved = time.time()

    async def start(self, rollout: Rollout) -> RolloutState:
        """Begins a rollout (ending the agent's live one, if any, as replaced).

        Raises:
            UnknownAgent: If the agent or either version is not registered.
            AgentConflict: If stable and candidate are one version.
        """
        await self.reload()
        stable = self.catalog.find(_qualified(rollout.agent, rollout.stable))
        candidate = self.catalog.find(_qualified(rollout.agent, rollout.candidate))
        if stable.sha == candidate.sha:
            raise AgentConflict(f"{stable.ref} and {candidate.ref} are one version", agent=rollout.agent)
        now = time.time()
        before = self.states.get(rollout.agent)
        if before is not None and before.phase.live:
            await self._settle(rollout.agent, before, before.end(RolloutPhase.ROLLED_BACK, now, "replaced"))
        state = RolloutState.begin(rollout, stable.tag, candidate.tag, now)
        self.states[rollout.agent] = state
        self.sides[rollout.agent] = _fresh_sides()
        self._figures_dirty.add(rollout.agent)  # a new rollout's figures start empty, in Redis too
        self.compared.pop(rollout.agent, None)
        await self._settle(rollout.agent, state, state.transitions[-1])
        await self.save()
        return state

    async def steer(self, agent: str, promote: bool, reason: str) -> RolloutState:
        """Promotes one step, or rolls back, by hand.

        Raises:
            UnknownAgent: If the agent has no live rollout in this pool.
        """
        state = self.states.get(agent)
        if state is None or not state.phase.live:
            raise UnknownAgent(f"agent {agent!r} has no live rollout in this pool", agent=agent)
        now = time.time()
        if promote:
            step = state.promote(now, reason or "promoted by hand")
            state.step_base_tasks = self.sides.setdefault(agent, _fresh_sides())["candidate"].tasks
        else:
            step = state.end(RolloutPhase.ROLLED_BACK, now, reason or "rolled back by hand")
        await self._settle(agent, state, step)
        await self.save()
        return state

    def status(self) -> dict[str, Any]:
        """Every rollout of the pool: its phase, share, both sides' figures and the rule's
        latest look (`pool.status()["rollouts"]`, `agentpool rollout status`)."""
        out: dict[str, Any] = {}
        for agent, state in self.states.items():
            sides = self.sides.get(agent) or _fresh_sides()
            # A shadow is judged as a canary would be: what the rule would say of it.
            other = sides["shadow"] if state.phase is RolloutPhase.SHADOW else sides["candidate"]
            looks = judge(sides["stable"], other, state.rollout.rule) if state.phase.live else {}
            out[agent] = {
                "phase": state.phase.value,
                "stable": state.stable_tag,
                "candidate": state.candidate_tag,
                "weight": state.weight,
                "step": state.step + 1,
                "steps": state.rollout.rule.steps,
                "started_unix": state.started_unix,
                "sides": {name: side.summary() for name, side in sides.items() if side.tasks},
                "looks": {name: look.__dict__ | {"verdict": look.verdict.value} for name, look in looks.items()},
                "shadow": {
                    "copies": state.shadow_copies,
                    "spent_usd": round(sides["shadow"].cost_usd, 6),
                    "budget_usd": state.rollout.shadow_budget_usd,
                    **self.compared.get(agent, {}),
                }
                if state.rollout.shadow is not None
                else None,
                "transitions": [t.model_dump(mode="json") for t in state.transitions[-20:]],
            }
        return out


def _fresh_sides() -> dict[str, Side]:
    return {"stable": Side(), "candidate": Side(), "shadow": Side()}


def _qualified(agent: str, ref: str) -> str:
    """`v3` or `sha:1f2e` of `agent` as a full reference; a full one as it is."""
    return ref if "@" in ref else f"{agent}@{ref}"
