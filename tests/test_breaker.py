"""The circuit breaker and the tool board, driven with a fake clock: no Ray, no sleeping."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from actors.breaker import CircuitBreaker, CrashLoop, Denied, Permit, Suspended
from actors.tool_board import BreakerBoard
from agentpool.config import BreakerConfig

CONFIGS = [
    BreakerConfig(window="count", window_size=5, minimum_calls=3, failure_rate=0.5, open_wait_s=10, half_open_calls=2),
    BreakerConfig(window="count", window_size=10, minimum_calls=10, failure_rate=0.3, slow_call_rate=0.5),
    BreakerConfig(window="time", window_size=5, minimum_calls=4, failure_rate=0.5, open_wait_s=3, half_open_calls=3),
]
SLOW_S = 1.0
TRIAL_TIMEOUT_S = 20.0


class BreakerMachine(RuleBasedStateMachine):
    """Against a plain model of the window kept here: the breaker opens exactly when the
    thresholds are crossed with enough calls, refuses everything while open, and lets no
    more than `half_open_calls` trials through per half-open period."""

    @initialize(config=st.sampled_from(CONFIGS))
    def setup(self, config: BreakerConfig) -> None:
        self.config = config
        self.now = 0.0
        self.breaker = CircuitBreaker("t", config, slow_call_s=SLOW_S, trial_timeout_s=TRIAL_TIMEOUT_S)
        self.permits: list[Permit] = []
        self.window: list[tuple[float, bool, bool]] = []  # (time, failed, slow) of this closed period
        self.trials_issued = 0

    def _moved(self, epoch_before: int) -> None:
        if self.breaker.epoch != epoch_before:
            self.window = []
            self.trials_issued = 0

    def _model_totals(self) -> tuple[int, int, int]:
        if self.config.window == "count":
            items = self.window[-self.config.window_size :]
        else:
            oldest = int(self.now) - self.config.window_size + 1
            items = [w for w in self.window if int(w[0]) >= oldest]
        return len(items), sum(f for _, f, _ in items), sum(s for _, _, s in items)

    @rule(dt=st.floats(0, 15))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule()
    def acquire(self) -> None:
        state, epoch = self.breaker.state, self.breaker.epoch
        still_open = state == "open" and self.now < self.breaker.opened_at + self.config.open_wait_s
        decision, _ = self.breaker.acquire(self.now)
        self._moved(epoch)
        if still_open:
            assert isinstance(decision, Denied) and decision.state == "open"
            assert decision.retry_after_s == pytest.approx(self.breaker.opened_at + self.config.open_wait_s - self.now)
        if state == "closed" and self.breaker.state == "closed":
            assert isinstance(decision, Permit)
        if isinstance(decision, Permit):
            if decision.trial:
                self.trials_issued += 1
                assert self.trials_issued <= self.config.half_open_calls
            self.permits.append(decision)

    @precondition(lambda self: self.permits)
    @rule(data=st.data(), failed=st.booleans(), duration=st.floats(0, 2 * SLOW_S))
    def record(self, data: st.DataObject, failed: bool, duration: float) -> None:
        permit = self.permits.pop(data.draw(st.integers(0, len(self.permits) - 1)))
        state, epoch = self.breaker.state, self.breaker.epoch
        transition = self.breaker.record(permit, self.now, failed=failed, duration_s=duration)
        counted = state == "closed" and permit.epoch == epoch and not permit.trial
        if counted:
            self.window.append((self.now, failed, duration >= SLOW_S))
            calls, failures, slow = self._model_totals()
            over = calls >= self.config.minimum_calls and (
                failures / calls >= self.config.failure_rate or slow / calls >= self.config.slow_call_rate
            )
            assert (transition is not None and transition.to_state == "open") == over
        elif permit.epoch != epoch:
            assert transition is None  # a permit from an earlier period moves nothing
        self._moved(epoch)

    @precondition(lambda self: self.permits)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        permit = self.permits.pop(data.draw(st.integers(0, len(self.permits) - 1)))
        self.breaker.release(permit)
        if permit.trial and permit.epoch == self.breaker.epoch:
            self.trials_issued -= 1

    @rule()
    def expire(self) -> None:
        epoch = self.breaker.epoch
        self.breaker.expire(self.now)
        self._moved(epoch)

    @invariant()
    def half_open_trials_are_bounded(self) -> None:
        snap = self.breaker.snapshot(self.now)
        if snap["state"] == "half_open":
            done, outstanding = snap["trials_done"], snap["trials_outstanding"]
            assert isinstance(done, int) and isinstance(outstanding, int)
            assert done + outstanding <= self.config.half_open_calls


TestBreaker = BreakerMachine.TestCase
TestBreaker.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


def test_a_breaker_opens_waits_and_closes_after_good_trials() -> None:
    config = BreakerConfig(window_size=4, minimum_calls=4, open_wait_s=5, half_open_calls=2)
    b = CircuitBreaker("t", config, slow_call_s=1.0, trial_timeout_s=10)
    for i in range(3):
        permit, _ = b.acquire(float(i))
        assert isinstance(permit, Permit) and b.record(permit, float(i), failed=True, duration_s=0.1) is None
    permit, _ = b.acquire(3.0)
    assert isinstance(permit, Permit)
    opened = b.record(permit, 3.0, failed=False, duration_s=0.1)
    assert opened is not None and opened.to_state == "open" and opened.failure_rate == 0.75
    denied, _ = b.acquire(4.0)
    assert isinstance(denied, Denied) and denied.retry_after_s == pytest.approx(4.0)
    first, moved = b.acquire(8.5)
    assert moved is not None and moved.to_state == "half_open" and isinstance(first, Permit) and first.trial
    second, _ = b.acquire(8.5)
    third, _ = b.acquire(8.5)
    assert isinstance(second, Permit) and isinstance(third, Denied) and third.state == "half_open"
    assert isinstance(second, Permit) and b.record(first, 9.0, failed=False, duration_s=0.1) is None
    closed = b.record(second, 9.0, failed=False, duration_s=0.1)
    assert closed is not None and closed.to_state == "closed"


def test_slow_calls_open_a_breaker_and_lost_trials_count_as_failures() -> None:
    config = BreakerConfig(window_size=3, minimum_calls=3, slow_call_rate=0.6, open_wait_s=1, half_open_calls=1)
    b = CircuitBreaker("t", config, slow_call_s=2.0, trial_timeout_s=10)
    outcomes = []
    for duration in (2.5, 0.1, 3.0):
        permit, _ = b.acquire(0.0)
        assert isinstance(permit, Permit)
        outcomes.append(b.record(permit, 0.0, failed=False, duration_s=duration))
    assert outcomes[-1] is not None and outcomes[-1].to_state == "open"  # 2 of 3 slow >= 0.6
    trial, _ = b.acquire(1.5)
    assert isinstance(trial, Permit) and trial.trial
    reopened = b.expire(11.5)  # its caller never reported back
    assert reopened is not None and reopened.to_state == "open"
    assert b.record(trial, 12.0, failed=False, duration_s=0.1) is None  # too late to count


def test_board_counts_every_outcome_and_never_judges_calls_that_did_not_run() -> None:
    now = [0.0]
    tools = {"t": {"timeout_s": 4.0, "breaker": None}, "off": {"timeout_s": 1.0, "breaker": {"enabled": False}}}
    board = BreakerBoard(tools, BreakerConfig(window_size=2, minimum_calls=2), clock=lambda: now[0])
    for _ in range(5):
        permit, denied, _ = board.acquire("t")
        assert denied is None
        board.record("t", permit, "bulkhead_full", 0.0)
    assert board.status()["tools"]["t"]["breaker"]["state"] == "closed"
    permit, _, _ = board.acquire("t")
    assert board.record("t", permit, "crashed", 0.1) is None  # one call of the minimum two
    # In crash backoff: refused without running, and the refusal is a failure for its breaker.
    _, refused, opened = board.acquire("t")
    assert isinstance(refused, Suspended) and refused.retry_after_s == pytest.approx(1.0)
    assert opened is not None and opened["to"] == "open" and opened["calls_ran_so_far"] == 1
    _, denied, _ = board.acquire("t")
    assert isinstance(denied, Denied) and denied.retry_after_s == pytest.approx(30.0)
    assert board.acquire("off") == (None, None, None)
    board.record("off", None, "error", 0.1)
    status = board.status()
    assert status["tools"]["t"]["outcomes"] == {"bulkhead_full": 5, "crashed": 1, "restarting": 1, "breaker_open": 1}
    assert status["tools"]["off"] == {"breaker": None, "crash_backoff_s": 0.0, "outcomes": {"error": 1}}
    assert [t["to"] for t in status["transitions"]] == ["open"]


def test_board_crash_backoff_doubles_per_crash_in_a_row_and_a_returned_call_ends_the_streak() -> None:
    now = [0.0]
    board = BreakerBoard({"off": {"timeout_s": 1.0, "breaker": {"enabled": False}}}, BreakerConfig(), lambda: now[0])
    waits = []
    for outcome in ("crashed", "crashed", "error", "crashed"):
        board.record("off", None, outcome, 0.1)
        _, refused, _ = board.acquire("off")
        waits.append(refused.retry_after_s if isinstance(refused, Suspended) else 0.0)
        now[0] += waits[-1]  # wait it out
        assert board.acquire("off") == (None, None, None)
    assert waits == [1.0, 2.0, 0.0, 1.0]  # an error came back from a live executor: the streak ended


@given(st.lists(st.sampled_from(["crash", "return", "tick"]), max_size=60))
def test_crash_loop_waits_double_per_crash_in_a_row_up_to_the_cap(steps: list[str]) -> None:
    loop, now, streak, until = CrashLoop(first_s=1.0, max_s=30.0), 0.0, 0, 0.0
    for step in steps:
        if step == "crash":
            loop.crashed("k", now)
            streak += 1
            until = now + min(30.0, 2.0 ** (streak - 1))
        elif step == "return":
            loop.returned("k")
            streak = 0
        else:
            now += 0.7
        assert loop.wait_s("k", now) == pytest.approx(max(0.0, until - now))
        assert 0.0 <= loop.wait_s("k", now) <= 30.0 + 1e-9
