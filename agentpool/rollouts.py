"""Rollouts of a new version of an agent: shadow copies, a sticky canary split raised in
steps, and the rule that promotes or rolls it back. Pure: no Ray, no Redis; the time is an
argument.

The rule looks at the candidate's tasks against stable's, on up to four measures, each a
Bernoulli outcome per candidate task, judged by Wald's sequential probability ratio test:

- errors: the task did not succeed. Null: the candidate's failure share is stable's
  (Laplace-smoothed); alternative: `error_margin` more.
- latency: a succeeded task's run time is above stable's p95 times (1 + `latency_margin`).
  Null: 5% of tasks (no worse than stable); alternative: 5% + `tail_margin`.
- cost: a succeeded task's cost is above stable's median times (1 + `cost_margin`). Null:
  50%; alternative: 50% + `tail_margin`.
- score: the rollout's online scorers failed the answer (only when it has some). Null:
  stable's share; alternative: `score_margin` more.

The log-likelihood ratio of each is compared with Wald's bounds: at or above
log((1 - beta) / alpha) the candidate is worse (roll back: a false rollback has probability
about `alpha`); at or below log(beta / (1 - alpha)) it is no worse (a regression as large as
the margin passes with probability about `beta`). No decision before `min_tasks` candidate
tasks; a promotion also waits for the step's hold time and `min_tasks` tasks in the step.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agentpool.evals import Expect
from agentpool.models import AgentResult
from agentpool.vocabulary import RolloutPhase, TaskStatus, Variant, Verdict

#: Samples of run time and cost kept per side of a rollout (the latest).
MAX_SAMPLES = 2000
#: Transitions kept in a rollout's state (the latest).
MAX_TRANSITIONS = 100


class RolloutRule(BaseModel):
    """When a canary is promoted or rolled back."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    #: The canary's share of traffic, in percent, step by step; the last is 100.
    steps: list[float] = Field(default_factory=lambda: [5.0, 25.0, 50.0, 100.0], min_length=1, max_length=20)
    #: Least time at each step before the next.
    hold_s: float = Field(default=300.0, ge=0, le=30 * 86_400)
    #: Least candidate tasks before any decision, and in each step before a promotion.
    min_tasks: int = Field(default=50, ge=1, le=1_000_000)
    error_margin: float = Field(default=0.05, gt=0, lt=1)
    latency_margin: float = Field(default=0.25, ge=0, le=100)
    cost_margin: float = Field(default=0.25, ge=0, le=100)
    tail_margin: float = Field(default=0.10, gt=0, lt=0.5)
    score_margin: float = Field(default=0.10, gt=0, lt=1)
    #: The chance of rolling back a candidate as good as stable (on one measure).
    alpha: float = Field(default=0.01, gt=0, lt=0.5)
    #: The chance of promoting a candidate worse by the margin (on one measure).
    beta: float = Field(default=0.05, gt=0, lt=0.5)

    @model_validator(mode="after")
    def _rising(self) -> RolloutRule:
        if any(not 0 < s <= 100 for s in self.steps) or sorted(self.steps) != self.steps or self.steps[-1] != 100:
            raise ValueError("steps are percentages that rise and end at 100")
        return self


class Rollout(BaseModel):
    """A rollout of the `agent`'s candidate version against its `stable` one (references:
    `v3`, `sha:1f2e3d`, or a full `support@v4`): as a `shadow` (a sampled copy of live tasks
    runs on it, never answering callers) or a `canary` (it answers a sticky share of live
    tasks, raised by `rule`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    agent: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
    stable: str = Field(min_length=1, max_length=140)
    shadow: str | None = Field(default=None, min_length=1, max_length=140)
    canary: str | None = Field(default=None, min_length=1, max_length=140)
    #: Shadow: the share of live tasks copied to the candidate.
    fraction: float = Field(default=0.1, gt=0, le=1)
    #: Shadow: what the copies may spend in all, in USD (no more copies once spent).
    shadow_budget_usd: float = Field(default=10.0, gt=0, le=1_000_000)
    #: Shadow: the most one copy may spend (its `max_cost_usd`). A copy is made only while
    #: what the copies spent plus the caps of those still running leave room for one more
    #: cap, so the copies never spend more than `shadow_budget_usd` in all.
    shadow_task_cap_usd: float = Field(default=0.05, gt=0, le=1000)
    #: Shadow: the tenant the copies run as: its policy, daily budgets and quotas apply, and
    #: their records land in its results stream, never in the live tenant's. None: the live
    #: task's own tenant (its consumers then see the copies, `variant="shadow"`).
    shadow_tenant: str | None = Field(default="shadow", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    #: Canary: the task metadata key that keeps one user on one side (the task id if absent).
    sticky_key: str = Field(default="user_id", max_length=64)
    rule: RolloutRule = Field(default_factory=RolloutRule)
    #: Checks of live answers on both sides (an eval's `Expect`: `contains`, `regex`,
    #: `json_schema`, `max_cost_usd`, ...; not `judge` or `custom`): the rule's score measure.
    online: Expect | None = None

    @model_validator(mode="after")
    def _one_candidate(self) -> Rollout:
        if (self.shadow is None) == (self.canary is None):
            raise ValueError("a rollout names one candidate: shadow=... or canary=...")
        return self

    @model_validator(mode="after")
    def _online_is_cheap(self) -> Rollout:
        if self.online is not None and (self.online.judge is not None or self.online.custom):
            raise ValueError("online checks are rule-based: no judge or custom scorers")
        return self

    @property
    def candidate(self) -> str:
        return self.shadow or self.canary or ""

    @property
    def phase(self) -> RolloutPhase:
        return RolloutPhase.SHADOW if self.shadow is not None else RolloutPhase.CANARY


def bucket(salt: str, key: str) -> float:
    """A stable number in [0, 1) for `key` (the same in every process and run)."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def pick(arms: Sequence[tuple[str, float]], salt: str, key: str) -> str | None:
    """The arm a key falls in: arms take consecutive ranges of their percentage, in order;
    None (stable) for the rest. Sticky: a key keeps its arm while the weights stay, an arm
    that grows keeps all its keys, and an arm added at the end takes only stable's keys."""
    point, start = bucket(salt, key) * 100, 0.0
    for name, weight in arms:
        if start <= point < start + weight:
            return name
        start += weight
    return None


@dataclass
class Side:
    """What one side of a rollout did: outcome counts and the latest samples."""

    tasks: int = 0
    failures: int = 0
    scored: int = 0
    score_failures: int = 0
    cost_usd: float = 0.0
    run_ms: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))
    costs: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))

    def observe(self, result: AgentResult, passed: bool | None = None) -> None:
        self.tasks += 1
        self.cost_usd += result.usage.cost_usd
        if result.status != TaskStatus.SUCCEEDED:
            self.failures += 1
        else:
            self.run_ms.append(result.timings.run_ms)
            self.costs.append(result.usage.cost_usd)
        if passed is not None:
            self.scored += 1
            self.score_failures += not passed

    def summary(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "failure_rate": round(self.failures / self.tasks, 4) if self.tasks else None,
            "p95_run_ms": round(quantile(self.run_ms, 0.95), 1) if self.run_ms else None,
            "mean_cost_usd": round(self.cost_usd / self.tasks, 6) if self.tasks else None,
            "score_pass_rate": round(1 - self.score_failures / self.scored, 4) if self.scored else None,
        }

    def to_json(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in ("tasks", "failures", "scored", "score_failures", "cost_usd")},
                "run_ms": list(self.run_ms), "costs": list(self.costs)}  # fmt: skip

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Side:
        side = cls(**{k: raw.get(k, 0) for k in ("tasks", "failures", "scored", "score_failures", "cost_usd")})
        side.run_ms.extend(float(x) for x in raw.get("run_ms", []))
        side.costs.extend(float(x) for x in raw.get("costs", []))
        return side


def quantile(values: Sequence[float] | deque[float], q: float) -> float:
    """The q-quantile by the nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass(frozen=True)
class Look:
    """One measure's test: outcomes seen (`hits` of `n`), the null and alternative rates,
    the log-likelihood ratio and what it says."""

    hits: int
    n: int
    p0: float
    p1: float
    llr: float
    verdict: Verdict


def sprt(hits: int, n: int, p0: float, p1: float, rule: RolloutRule) -> Look:
    """Wald's test of a Bernoulli rate: p0 (no worse) against p1 > p0 (worse)."""
    p0 = min(max(p0, 1e-4), 0.98)
    p1 = min(max(p1, p0 + 1e-3), 0.99)
    llr = hits * math.log(p1 / p0) + (n - hits) * math.log((1 - p1) / (1 - p0))
    verdict = Verdict.HOLD
    if n >= rule.min_tasks:
        if llr >= math.log((1 - rule.beta) / rule.alpha):
            verdict = Verdict.ROLLBACK
        elif llr <= math.log(rule.beta / (1 - rule.alpha)):
            verdict = Verdict.PROMOTE
    return Look(hits, n, round(p0, 5), round(p1, 5), round(llr, 4), verdict)


def judge(stable: Side, candidate: Side, rule: RolloutRule) -> dict[str, Look]:
    """Each measure's test of the candidate against stable (a measure with too little data
    on stable's side is left out, or held)."""
    looks: dict[str, Look] = {}
    p0 = (stable.failures + 1) / (stable.tasks + 2)
    looks["errors"] = sprt(candidate.failures, candidate.tasks, p0, p0 + rule.error_margin, rule)
    enough = rule.min_tasks
    if len(stable.run_ms) >= enough and candidate.run_ms:
        ref = quantile(stable.run_ms, 0.95) * (1 + rule.latency_margin)
        slow = sum(1 for x in candidate.run_ms if x > ref)
        looks["latency"] = sprt(slow, len(candidate.run_ms), 0.05, 0.05 + rule.tail_margin, rule)
    if len(stable.costs) >= enough and candidate.costs:
        ref = quantile(stable.costs, 0.5) * (1 + rule.cost_margin) + 1e-12
        dear = sum(1 for x in candidate.costs if x > ref)
        looks["cost"] = sprt(dear, len(candidate.costs), 0.5, 0.5 + rule.tail_margin, rule)
    if stable.scored >= enough and candidate.scored:
        s0 = (stable.score_failures + 1) / (stable.scored + 2)
        looks["score"] = sprt(candidate.score_failures, candidate.scored, s0, s0 + rule.score_margin, rule)
    return looks


def overall(looks: dict[str, Look]) -> tuple[Verdict, str]:
    """The rule's verdict over every measure, and the measure it rests on: any measure
    that says worse rolls back; a promotion needs every measure (and errors at least) to
    say no worse."""
    for name, look in looks.items():
        if look.verdict is Verdict.ROLLBACK:
            return Verdict.ROLLBACK, name
    if "errors" in looks and all(look.verdict is Verdict.PROMOTE for look in looks.values()):
        return Verdict.PROMOTE, ",".join(looks)
    waiting = [name for name, look in looks.items() if look.verdict is Verdict.HOLD]
    return Verdict.HOLD, ",".join(waiting)


class Transition(BaseModel):
    """One change of a rollout's phase or step: what `agentpool rollout status` lists."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    at_unix: float
    phase: RolloutPhase
    weight: float
    reason: str


class RolloutState(BaseModel):
    """Where a rollout stands: its phase, its canary's step and share, since when."""

    model_config = ConfigDict(extra="forbid")

    rollout: Rollout
    #: The versions' tags (`v3+1f2e3d4c5b6a`) the references were resolved to at the start.
    stable_tag: str
    candidate_tag: str
    phase: RolloutPhase
    step: int = 0
    #: The candidate's share of live traffic now, in percent (0 for a shadow).
    weight: float = 0.0
    started_unix: float
    step_started_unix: float
    #: Candidate tasks when the current step began.
    step_base_tasks: int = 0
    #: Shadow copies made, and what they spent.
    shadow_copies: int = 0
    transitions: list[Transition] = Field(default_factory=list)

    @classmethod
    def begin(cls, rollout: Rollout, stable_tag: str, candidate_tag: str, now: float) -> RolloutState:
        canary = rollout.phase is RolloutPhase.CANARY
        state = cls(
            rollout=rollout,
            stable_tag=stable_tag,
            candidate_tag=candidate_tag,
            phase=rollout.phase,
            weight=rollout.rule.steps[0] if canary else 0.0,
            started_unix=now,
            step_started_unix=now,
        )
        what = f"canary at {state.weight:g}%" if canary else f"shadow of {rollout.fraction:.0%} of tasks"
        state.note(now, f"started: {candidate_tag} against {stable_tag}, {what}")
        return state

    def note(self, now: float, reason: str) -> Transition:
        moved = Transition(at_unix=round(now, 3), phase=self.phase, weight=self.weight, reason=reason)
        self.transitions = [*self.transitions, moved][-MAX_TRANSITIONS:]
        return moved

    def assign(self, key: str) -> Variant:
        """The side a live task with this sticky key runs on."""
        if self.phase is not RolloutPhase.CANARY:
            return Variant.STABLE
        hit = pick([("canary", self.weight)], self.rollout.agent, key)
        return Variant.CANARY if hit is not None else Variant.STABLE

    def shadows(self, task_id: str, committed_usd: float) -> bool:
        """Whether a live task is copied to the shadow candidate, given what the copies have
        spent and the caps of those still running (`committed_usd`)."""
        rollout = self.rollout
        return (
            self.phase is RolloutPhase.SHADOW
            and committed_usd + rollout.shadow_task_cap_usd <= rollout.shadow_budget_usd + 1e-12
            and bucket(f"shadow:{rollout.agent}", task_id) < rollout.fraction
        )

    def advance(self, stable: Side, candidate: Side, now: float) -> Transition | None:
        """Applies the rule to the figures so far: the transition it makes, if any."""
        if self.phase is not RolloutPhase.CANARY:
            return None
        rule = self.rollout.rule
        verdict, why = overall(judge(stable, candidate, rule))
        if verdict is Verdict.ROLLBACK:
            return self.end(RolloutPhase.ROLLED_BACK, now, f"rolled back by the rule: {why} worse than stable")
        in_step = candidate.tasks - self.step_base_tasks
        if verdict is not Verdict.PROMOTE or now - self.step_started_unix < rule.hold_s or in_step < rule.min_tasks:
            return None
        if self.step + 1 >= len(rule.steps):
            return self.end(RolloutPhase.PROMOTED, now, "promoted by the rule: no worse than stable on " + why)
        self.step += 1
        self.weight = rule.steps[self.step]
        self.step_started_unix, self.step_base_tasks = now, candidate.tasks
        return self.note(now, f"step {self.step + 1}/{len(rule.steps)}: canary at {self.weight:g}% ({why} no worse)")

    def end(self, phase: RolloutPhase, now: float, reason: str) -> Transition:
        self.phase = phase
        self.weight = 100.0 if phase is RolloutPhase.PROMOTED else 0.0
        return self.note(now, reason)

    def promote(self, now: float, reason: str = "promoted by hand") -> Transition:
        """One step up by hand (a shadow becomes a canary at the first step)."""
        if self.phase is RolloutPhase.SHADOW:
            self.phase, self.step, self.weight = RolloutPhase.CANARY, 0, self.rollout.rule.steps[0]
        elif self.step + 1 >= len(self.rollout.rule.steps):
            return self.end(RolloutPhase.PROMOTED, now, reason)
        else:
            self.step += 1
            self.weight = self.rollout.rule.steps[self.step]
        self.step_started_unix = now
        return self.note(now, f"{reason}: canary at {self.weight:g}%")
