"""Rollouts, pure: the sticky split, Wald's test and the rule over its measures, and the
rollout's state machine. The rule's error rates are measured by simulation: on two
identical versions it rolls back rarely (a stated bound), and a real regression is caught
within a stated number of canary tasks."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from agentpool.models import AgentResult, Timings, Usage
from agentpool.rollouts import Rollout, RolloutRule, RolloutState, Side, bucket, judge, overall, pick, sprt
from agentpool.vocabulary import RolloutPhase, TaskStatus, Variant, Verdict

KEYS = [f"user-{i}" for i in range(4000)]


def result(ok: bool, run_ms: float = 100.0, cost: float = 0.001) -> AgentResult:
    status = TaskStatus.SUCCEEDED if ok else TaskStatus.FAILED
    return AgentResult(
        task_id="t", tenant="a", status=status, usage=Usage(cost_usd=cost), timings=Timings(run_ms=run_ms)
    )


# --- the split ------------------------------------------------------------------------------


@given(st.lists(st.floats(0, 33), min_size=1, max_size=3), st.text(max_size=8))
@settings(max_examples=40, deadline=None)
def test_weights_are_honoured(weights: list[float], salt: str) -> None:
    arms = [(f"arm{i}", w) for i, w in enumerate(weights)]
    counts: dict[str | None, int] = {}
    for key in KEYS:
        hit = pick(arms, salt, key)
        counts[hit] = counts.get(hit, 0) + 1
    for name, weight in arms:
        share = counts.get(name, 0) / len(KEYS) * 100
        assert abs(share - weight) < 3.5, (name, weight, share)  # ~5 standard errors at 4000 keys


@given(st.floats(0, 100), st.floats(0, 100), st.text(max_size=8))
def test_assignment_is_sticky_and_a_growing_arm_keeps_its_keys(first: float, second: float, salt: str) -> None:
    low, high = sorted((first, second))
    for key in KEYS[:300]:
        assert pick([("canary", low)], salt, key) == pick([("canary", low)], salt, key)
        if pick([("canary", low)], salt, key) == "canary":
            assert pick([("canary", high)], salt, key) == "canary"


@given(st.floats(0, 50), st.floats(0, 50), st.text(max_size=8))
def test_adding_a_variant_takes_keys_only_from_stable(weight: float, added: float, salt: str) -> None:
    for key in KEYS[:300]:
        before = pick([("canary", weight)], salt, key)
        after = pick([("canary", weight), ("other", added)], salt, key)
        assert after == before or before is None


def test_buckets_are_the_same_in_every_process() -> None:
    assert bucket("support", "user-1") == pytest.approx(0.458416, abs=1e-6)


# --- the test and the rule ------------------------------------------------------------------


def test_wald_bounds_decide_only_after_the_minimum_sample() -> None:
    rule = RolloutRule(min_tasks=20)
    assert sprt(5, 10, 0.02, 0.07, rule).verdict is Verdict.HOLD  # strong evidence, too few tasks
    assert sprt(5, 20, 0.02, 0.07, rule).verdict is Verdict.ROLLBACK
    assert sprt(0, 100, 0.02, 0.07, rule).verdict is Verdict.PROMOTE
    assert sprt(2, 40, 0.02, 0.07, rule).verdict is Verdict.HOLD


def simulate(p_stable: float, p_canary: float, seed: int, *, slow: float = 1.0, tasks: int = 2000) -> tuple[str, int]:
    """A canary at 20% through `tasks` live tasks, the rule looked at every 10: how it ended
    (phase) and after how many canary tasks."""
    rng = random.Random(seed)
    rollout = Rollout(agent="a", stable="v1", canary="v2", rule=RolloutRule(steps=[20, 100], hold_s=0, min_tasks=20))
    state = RolloutState.begin(rollout, "v1", "v2", 0.0)
    stable, canary = Side(), Side()
    for i in range(tasks):
        if rng.random() < state.weight / 100:
            canary.observe(result(rng.random() >= p_canary, rng.lognormvariate(4.6, 0.3) * slow))
        else:
            stable.observe(result(rng.random() >= p_stable, rng.lognormvariate(4.6, 0.3)))
        if i % 10 == 9:
            state.advance(stable, canary, float(i))
            if not state.phase.live:
                break
    return state.phase.value, canary.tasks


def test_identical_versions_are_rarely_rolled_back() -> None:
    # Stated bound: at most 5% of rollouts of a version identical to stable are rolled back
    # (alpha is 1% per measure; the rule looks every 10 tasks at three measures).
    ends = [simulate(0.05, 0.05, seed)[0] for seed in range(300)]
    assert ends.count("rolled_back") / len(ends) <= 0.05
    assert ends.count("promoted") / len(ends) >= 0.8


def test_a_version_failing_20_percent_is_rolled_back_within_60_canary_tasks() -> None:
    runs = [simulate(0.01, 0.20, seed) for seed in range(200)]
    assert all(end == "rolled_back" for end, _ in runs)
    seen = sorted(n for _, n in runs)
    assert seen[int(0.95 * len(seen))] <= 60, seen


def test_a_slower_version_is_rolled_back_on_latency() -> None:
    ends = [simulate(0.01, 0.01, seed, slow=2.0) for seed in range(50)]
    assert all(end == "rolled_back" for end, _ in ends)


def test_the_rule_names_the_measure_it_rests_on() -> None:
    rule = RolloutRule(min_tasks=20)
    stable, canary = Side(), Side()
    for i in range(200):
        stable.observe(result(True, 100 + i % 7, 0.001))
    for i in range(80):
        canary.observe(result(True, 100 + i % 7, 0.003))  # three times the cost
    looks = judge(stable, canary, rule)
    assert looks["cost"].verdict is Verdict.ROLLBACK and looks["errors"].verdict is Verdict.PROMOTE
    assert overall(looks) == (Verdict.ROLLBACK, "cost")


def test_sides_survive_a_restart() -> None:
    side = Side()
    for i in range(5):
        side.observe(result(i % 2 == 0, 10.0 * i), passed=i % 3 == 0)
    again = Side.from_json(side.to_json())
    assert again.to_json() == side.to_json() and again.summary() == side.summary()


def test_a_rollout_names_one_candidate_and_steps_rise_to_100() -> None:
    with pytest.raises(ValueError):
        Rollout(agent="a", stable="v1")
    with pytest.raises(ValueError):
        Rollout(agent="a", stable="v1", shadow="v2", canary="v3")
    with pytest.raises(ValueError):
        RolloutRule(steps=[50, 25, 100])
    with pytest.raises(ValueError):
        RolloutRule(steps=[5, 50])


def test_shadow_sampling_honours_the_fraction_and_the_budget() -> None:
    rollout = Rollout(agent="a", stable="v1", shadow="v2", fraction=0.1, shadow_budget_usd=1.0, shadow_task_cap_usd=0.1)
    state = RolloutState.begin(rollout, "v1", "v2", 0.0)
    sampled = sum(state.shadows(f"task-{i}", 0.0) for i in range(5000))
    assert 400 <= sampled <= 600
    assert any(state.shadows(f"task-{i}", 0.9) for i in range(500))  # room for one more cap
    assert not any(state.shadows(f"task-{i}", 0.91) for i in range(500))  # not for another
    assert state.assign("anyone") is Variant.STABLE


# --- the state machine ----------------------------------------------------------------------


class RolloutMachine(RuleBasedStateMachine):
    """Any mix of outcomes, looks and hand steering: the share is always a step (or 0 or 100
    once ended), steps only rise, an ended rollout stays ended, every change is noted."""

    def __init__(self) -> None:
        super().__init__()
        rule_ = RolloutRule(steps=[5, 25, 50, 100], hold_s=3, min_tasks=5)
        self.state = RolloutState.begin(Rollout(agent="a", stable="v1", canary="v2", rule=rule_), "v1", "v2", 0.0)
        self.stable, self.canary = Side(), Side()
        self.now, self.last_step, self.ended = 0.0, 0, False
        self.notes = len(self.state.transitions)

    @rule(ok=st.booleans(), ms=st.floats(1, 1000), canary=st.booleans())
    def outcome(self, ok: bool, ms: float, canary: bool) -> None:
        (self.canary if canary else self.stable).observe(result(ok, ms))

    @rule(dt=st.floats(0, 5))
    def look(self, dt: float) -> None:
        self.now += dt
        before = len(self.state.transitions)
        moved = self.state.advance(self.stable, self.canary, self.now)
        assert (moved is not None) == (len(self.state.transitions) == before + 1) or before == 100

    @rule(promote=st.booleans())
    def steer(self, promote: bool) -> None:
        if not self.state.phase.live:
            return
        if promote:
            self.state.promote(self.now)
        else:
            self.state.end(RolloutPhase.ROLLED_BACK, self.now, "by hand")

    @invariant()
    def share_is_a_step(self) -> None:
        state = self.state
        if state.phase is RolloutPhase.CANARY:
            assert state.weight == state.rollout.rule.steps[state.step]
        else:
            assert state.weight == (100.0 if state.phase is RolloutPhase.PROMOTED else 0.0)
        assert state.step >= self.last_step
        self.last_step = state.step
        if self.ended:
            assert not state.phase.live
        self.ended = not state.phase.live


TestRolloutMachine = RolloutMachine.TestCase
TestRolloutMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_a_sides_summary_is_exact() -> None:
    side = Side()
    assert side.summary() == {
        "tasks": 0,
        "failure_rate": None,
        "p95_run_ms": None,
        "mean_cost_usd": None,
        "score_pass_rate": None,
    }
    for i in range(1, 42):  # 40 succeed (run 10..400 ms), the 41st fails; 3 of the first 6 fail their checks
        side.observe(result(i != 41, 10.0 * i, 0.0001 * 1.23456), passed=(i % 2 == 0) if i <= 6 else None)
    assert side.summary() == {
        "tasks": 41,
        "failure_rate": 0.0244,
        "p95_run_ms": 380.0,  # the nearest rank: the 38th of 40
        "mean_cost_usd": 0.000123,
        "score_pass_rate": 0.5,
    }


def test_walds_test_exactly() -> None:
    rule = RolloutRule(min_tasks=20)
    look = sprt(3, 30, 0.02, 0.07, rule)
    assert look.llr == pytest.approx(round(3 * math.log(0.07 / 0.02) + 27 * math.log(0.93 / 0.98), 4))
    assert (look.hits, look.n, look.p0, look.p1, look.verdict) == (3, 30, 0.02, 0.07, Verdict.HOLD)
    upper, lower = math.log(0.95 / 0.01), math.log(0.05 / 0.99)  # Wald's bounds at alpha 1%, beta 5%
    assert sprt(4, 20, 0.02, 0.07, rule).llr < upper  # 4.17: not yet past the upper bound
    assert sprt(5, 20, 0.02, 0.07, rule).llr >= upper and sprt(5, 20, 0.02, 0.07, rule).verdict is Verdict.ROLLBACK
    assert sprt(5, 19, 0.02, 0.07, rule).verdict is Verdict.HOLD  # one task short of the minimum
    assert sprt(0, 60, 0.02, 0.07, rule).llr <= lower and sprt(0, 60, 0.02, 0.07, rule).verdict is Verdict.PROMOTE
    assert sprt(0, 56, 0.02, 0.07, rule).verdict is Verdict.HOLD  # -2.94: not yet past the lower bound
    # The rates are kept off 0 and 1, and the alternative above the null.
    assert (sprt(0, 1, 0.0, 0.05, rule).p0, sprt(0, 1, 0.5, 0.4, rule).p1) == (0.0001, 0.501)
    assert (sprt(0, 1, 0.99, 1.0, rule).p0, sprt(0, 1, 0.99, 1.0, rule).p1) == (0.98, 0.99)


def test_the_measures_references_exactly() -> None:
    rule = RolloutRule(min_tasks=50, latency_margin=0.25, cost_margin=0.25)
    stable, canary = Side(), Side()
    for i in range(1, 101):
        stable.observe(result(i % 10 != 0, float(i), 1.0), passed=i % 5 != 0)  # 10 failures; 20 checks failed
    for ms, cost in ((118.0, 1.25), (119.0, 1.26), (200.0, 1.0)):
        canary.observe(result(True, ms, cost), passed=False)
    canary.observe(result(False, 1.0, 9.0), passed=True)
    looks = judge(stable, canary, rule)
    assert looks["errors"].p0 == round(11 / 102, 5) and (looks["errors"].hits, looks["errors"].n) == (1, 4)
    # Latency: over stable's p95 (the nearest rank of its 90 succeeded runs) times 1.25.
    ref = sorted(float(i) for i in range(1, 101) if i % 10)[math.ceil(0.95 * 90) - 1] * 1.25
    assert (looks["latency"].hits, looks["latency"].n) == (sum(x > ref for x in (118.0, 119.0, 200.0)), 3)
    assert (looks["cost"].hits, looks["cost"].n, looks["cost"].p0) == (1, 3, 0.5)  # only 1.26 is over 1.25
    assert (looks["score"].hits, looks["score"].n, looks["score"].p0) == (3, 4, round(21 / 102, 5))
    few = Side()
    for _ in range(49):
        few.observe(result(True, 10.0, 1.0), passed=True)
    assert set(judge(few, canary, rule)) == {"errors"}  # under 50 samples: the other references are not drawn
