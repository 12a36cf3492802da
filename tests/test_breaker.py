"""The circuit breaker and the tool board, driven with a fake clock: no Ray, no sleeping."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from agentpool.actors.breaker import CircuitBreaker, CrashLoop, Denied, Permit, Suspended, Transition
from agentpool.actors.tool_board import BreakerBoard
from agentpool.config import BreakerConfig
from agentpool.vocabulary import ToolErrorKind

CONFIGS = [
    BreakerConfig(window="count", window_size=5, minimum_calls=3, failure_rate=0.5, open_wait_s=10, half_open_calls=2),
    BreakerConfig(window="count", window_size=10, minimum_calls=10, failure_rate=0.3, slow_call_rate=0.5),
    BreakerConfig(window="time", window_size=5, minimum_calls=4, failure_rate=0.5, open_wait_s=3, half_open_calls=3),
]
SLOW_S = 1.0
TRIAL_TIMEOUT_S = 20.0


class Model:
    """A breaker written again from its specification, with its own clock of openings: what
    the real one must do, step by step, computed without reading any of its state."""

    def __init__(self, config: BreakerConfig) -> None:
        self.config = config
        self.state = "closed"
        self.epoch = 0
        self.opened_at = 0.0
        self.window: list[tuple[float, bool, bool]] = []  # (time, failed, slow) of this closed period
        self.outstanding: dict[int, float] = {}  # trial permit id -> issued at
        self.results: list[tuple[bool, bool]] = []
        self.last_rates = (0.0, 0.0)

    def totals(self, now: float) -> tuple[int, int, int]:
        if self.config.window == "count":
            items = self.window[-self.config.window_size :]
        else:
            oldest = int(now) - self.config.window_size + 1
            items = [w for w in self.window if int(w[0]) >= oldest]
        return len(items), sum(f for _, f, _ in items), sum(s for _, _, s in items)

    def over(self, failure_rate: float, slow_rate: float) -> bool:
        return failure_rate >= self.config.failure_rate or slow_rate >= self.config.slow_call_rate

    def move(self, to: str, now: float, calls: int, failure_rate: float, slow_rate: float) -> tuple:
        moved = (self.state, to, now, calls, failure_rate, slow_rate)
        self.state, self.epoch = to, self.epoch + 1
        if to == "open":
            self.opened_at = now
        self.window, self.outstanding, self.results = [], {}, []
        return moved

    def judge(self, now: float) -> tuple | None:
        if len(self.results) < self.config.half_open_calls:
            return None
        n = len(self.results)
        failure_rate, slow_rate = sum(f for f, _ in self.results) / n, sum(s for _, s in self.results) / n
        self.last_rates = (failure_rate, slow_rate)
        return self.move("open" if self.over(failure_rate, slow_rate) else "closed", now, n, failure_rate, slow_rate)

    def expire(self, now: float) -> tuple | None:
        if self.state != "half_open":
            return None
        overdue = [pid for pid, at in self.outstanding.items() if now - at >= TRIAL_TIMEOUT_S]
        for pid in overdue:
            del self.outstanding[pid]
            self.results.append((True, True))
        return self.judge(now) if overdue else None

    def acquire(self, now: float, next_id: int) -> tuple[tuple, tuple | None]:
        """(("denied", state, retry_after_s) or ("permit", trial, epoch), transition)."""
        moved = self.expire(now)
        if self.state == "open":
            left = self.opened_at + self.config.open_wait_s - now
            if left > 0:
                return ("denied", "open", left), moved
            moved = self.move("half_open", now, 0, 0.0, 0.0)
        trial = self.state == "half_open"
        if trial and len(self.outstanding) + len(self.results) >= self.config.half_open_calls:
            return ("denied", "half_open", min(SLOW_S, TRIAL_TIMEOUT_S)), moved
        if trial:
            self.outstanding[next_id] = now
        return ("permit", trial, self.epoch), moved

    def record(self, permit: Permit, now: float, failed: bool, duration: float) -> tuple | None:
        if permit.epoch != self.epoch:
            return None
        slow = duration >= SLOW_S
        if permit.trial:
            if self.outstanding.pop(permit.id, None) is None:
                return None
            self.results.append((failed, slow))
            return self.judge(now)
        if self.state != "closed":
            return None
        self.window.append((now, failed, slow))
        calls, failures, slows = self.totals(now)
        if calls >= self.config.minimum_calls:
            self.last_rates = (failures / calls, slows / calls)
            if self.over(*self.last_rates):
                return self.move("open", now, calls, *self.last_rates)
        return None

    def release(self, permit: Permit) -> None:
        if permit.trial and permit.epoch == self.epoch:
            self.outstanding.pop(permit.id, None)

    def snapshot(self, now: float) -> dict[str, object]:
        calls, failures, slows = self.totals(now)
        out: dict[str, object] = {"state": self.state, "window_calls": calls, "window_failures": failures}
        out["window_slow"] = slows
        if self.state == "open":
            out["retry_after_s"] = round(max(0.0, self.opened_at + self.config.open_wait_s - now), 3)
        if self.state == "half_open":
            out["trials_outstanding"] = len(self.outstanding)
            out["trials_done"] = len(self.results)
        return out


def _as_tuple(transition: Transition | None) -> tuple | None:
    if transition is None:
        return None
    t = transition
    return (t.from_state, t.to_state, t.at, t.calls, t.failure_rate, t.slow_rate)


class BreakerMachine(RuleBasedStateMachine):
    """Every decision, transition and snapshot of the breaker equals the model's."""

    @initialize(config=st.sampled_from(CONFIGS))
    def setup(self, config: BreakerConfig) -> None:
        self.now = 0.0
        self.breaker = CircuitBreaker("t", config, slow_call_s=SLOW_S, trial_timeout_s=TRIAL_TIMEOUT_S)
        self.model = Model(config)
        self.permits: list[Permit] = []
        self.issued = 0

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 3.0]) | st.floats(0, 15))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule()
    def acquire(self) -> None:
        expected, moved = self.model.acquire(self.now, self.issued + 1)
        decision, transition = self.breaker.acquire(self.now)
        assert _as_tuple(transition) == moved
        if expected[0] == "denied":
            assert decision == Denied(expected[1], expected[2])
        else:
            self.issued += 1
            assert decision == Permit(self.issued, expected[2], expected[1], self.now)
            self.permits.append(decision)

    @precondition(lambda self: self.permits)
    @rule(data=st.data(), failed=st.booleans(), duration=st.sampled_from([0.0, SLOW_S]) | st.floats(0, 2 * SLOW_S))
    def record(self, data: st.DataObject, failed: bool, duration: float) -> None:
        permit = self.permits.pop(data.draw(st.integers(0, len(self.permits) - 1)))
        expected = self.model.record(permit, self.now, failed, duration)
        assert _as_tuple(self.breaker.record(permit, self.now, failed=failed, duration_s=duration)) == expected

    @precondition(lambda self: self.permits)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        permit = self.permits.pop(data.draw(st.integers(0, len(self.permits) - 1)))
        self.model.release(permit)
        self.breaker.release(permit)

    @rule()
    def expire(self) -> None:
        assert _as_tuple(self.breaker.expire(self.now)) == self.model.expire(self.now)

    @invariant()
    def agrees_with_the_model(self) -> None:
        assert (self.breaker.state, self.breaker.epoch) == (self.model.state, self.model.epoch)
        assert self.breaker.last_rates == self.model.last_rates
        assert self.breaker.snapshot(self.now) == self.model.snapshot(self.now)


TestBreaker = BreakerMachine.TestCase
TestBreaker.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


def test_a_transition_as_recorded_in_events() -> None:
    transition = Transition("search", "closed", "open", 12.5, 7, 0.428571, 2 / 3)
    assert transition.as_dict() == {
        "tool": "search",
        "from": "closed",
        "to": "open",
        "calls": 7,
        "failure_rate": 0.4286,
        "slow_rate": 0.6667,
    }


def test_a_new_breaker_and_a_new_crash_loop() -> None:
    b = CircuitBreaker("t", CONFIGS[0], slow_call_s=SLOW_S, trial_timeout_s=TRIAL_TIMEOUT_S)
    assert (b.state, b.epoch, b.opened_at, b.last_rates) == ("closed", 0, 0.0, (0.0, 0.0))
    assert b.snapshot(0.0) == {"state": "closed", "window_calls": 0, "window_failures": 0, "window_slow": 0}
    first, _ = b.acquire(0.0)
    assert first == Permit(1, 0, False, 0.0)
    loop = CrashLoop()
    waits = []
    for _ in range(8):
        loop.crashed("k", 0.0)
        waits.append(loop.wait_s("k", 0.0))
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


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
        board.record("t", permit, ToolErrorKind.BULKHEAD_FULL, 0.0)
    assert board.status()["tools"]["t"]["breaker"]["state"] == "closed"
    permit, _, _ = board.acquire("t")
    assert board.record("t", permit, ToolErrorKind.CRASHED, 0.1) is None  # one call of the minimum two
    # In crash backoff: refused without running, and the refusal is a failure for its breaker.
    _, refused, opened = board.acquire("t")
    assert isinstance(refused, Suspended) and refused.retry_after_s == pytest.approx(1.0)
    assert opened is not None and opened["to"] == "open" and opened["calls_ran_so_far"] == 1
    _, denied, _ = board.acquire("t")
    assert isinstance(denied, Denied) and denied.retry_after_s == pytest.approx(30.0)
    assert board.acquire("off") == (None, None, None)
    board.record("off", None, ToolErrorKind.ERROR, 0.1)
    status = board.status()
    assert status["tools"]["t"]["outcomes"] == {"bulkhead_full": 5, "crashed": 1, "restarting": 1, "breaker_open": 1}
    assert status["tools"]["off"] == {"breaker": None, "crash_backoff_s": 0.0, "outcomes": {"error": 1}}
    assert [t["to"] for t in status["transitions"]] == ["open"]


def test_board_crash_backoff_doubles_per_crash_in_a_row_and_a_returned_call_ends_the_streak() -> None:
    now = [0.0]
    board = BreakerBoard({"off": {"timeout_s": 1.0, "breaker": {"enabled": False}}}, BreakerConfig(), lambda: now[0])
    waits = []
    for outcome in ("crashed", "crashed", "error", "crashed"):
        board.record("off", None, ToolErrorKind(outcome), 0.1)
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


def _permit(b: CircuitBreaker, now: float) -> Permit:
    decision, _ = b.acquire(now)
    assert isinstance(decision, Permit), decision
    return decision


def _half_open(calls: int = 2, failure_rate: float = 0.5, slow_call_rate: float = 1.0) -> CircuitBreaker:
    """A breaker opened by one failure at t=0 (open 10 s), half-open from t=10."""
    config = BreakerConfig(
        window_size=1,
        minimum_calls=1,
        open_wait_s=10,
        half_open_calls=calls,
        failure_rate=failure_rate,
        slow_call_rate=slow_call_rate,
    )
    b = CircuitBreaker("t", config, slow_call_s=1.0, trial_timeout_s=20.0)
    assert b.record(_permit(b, 0.0), 0.0, failed=True, duration_s=0.1) is not None
    return b


def test_the_open_wait_ends_exactly_on_time() -> None:
    b = _half_open()
    denied, _ = b.acquire(9.999)
    assert isinstance(denied, Denied) and denied.state == "open" and denied.retry_after_s == pytest.approx(0.001)
    trial, moved = b.acquire(10.0)
    assert isinstance(trial, Permit) and trial.trial and moved is not None and moved.to_state == "half_open"


def test_a_lost_trial_counts_as_failed_and_slow_and_is_judged_at_the_next_acquire() -> None:
    b = _half_open(failure_rate=1.0, slow_call_rate=0.5)  # only the slow rate can reopen it
    good, lost = _permit(b, 10.0), _permit(b, 10.0)
    assert lost.trial and b.record(good, 11.0, failed=False, duration_s=0.1) is None
    denied, moved = b.acquire(30.0)  # the lost trial is 20 s old: counted, the trials judged
    assert moved is not None
    assert (moved.from_state, moved.to_state, moved.at, moved.calls) == ("half_open", "open", 30.0, 2)
    assert (moved.failure_rate, moved.slow_rate) == (0.5, 0.5)
    assert denied == Denied("open", 10.0)
    b2 = _half_open(failure_rate=0.5, slow_call_rate=1.0)  # only the failure rate can reopen it
    good, _ = _permit(b2, 10.0), _permit(b2, 10.0)
    b2.record(good, 11.0, failed=False, duration_s=0.1)
    reopened = b2.expire(30.0)
    assert reopened is not None and reopened.to_state == "open" and reopened.at == 30.0


def test_a_trial_reported_after_it_was_counted_lost_changes_nothing() -> None:
    b = _half_open()
    early = _permit(b, 10.0)
    assert b.expire(25.0) is None
    late = _permit(b, 25.0)
    assert b.expire(30.0) is None  # the early trial is lost; one result of two: no judgement yet
    assert b.snapshot(30.0)["trials_done"] == 1 and b.snapshot(30.0)["trials_outstanding"] == 1
    assert b.record(early, 31.0, failed=False, duration_s=0.1) is None
    b.release(early)
    assert b.snapshot(31.0)["trials_done"] == 1 and b.snapshot(31.0)["trials_outstanding"] == 1
    judged = b.record(late, 31.0, failed=False, duration_s=0.1)
    # The lost trial stays a failure (had the late report counted, 0 of 2 failed would close it).
    assert judged is not None and (judged.to_state, judged.failure_rate) == ("open", 0.5)


def test_a_released_trial_frees_its_place_and_other_releases_change_nothing() -> None:
    b = _half_open(calls=1)
    trial = _permit(b, 10.0)
    assert isinstance(b.acquire(10.0)[0], Denied)
    b.release(trial)
    again, _ = b.acquire(10.0)
    assert isinstance(again, Permit) and again.trial
    closed = b.record(again, 10.5, failed=False, duration_s=0.1)
    assert closed is not None and closed.to_state == "closed"
    b.release(trial)  # from an earlier period: nothing
    permit, _ = b.acquire(11.0)
    assert isinstance(permit, Permit) and not permit.trial
    b.release(permit)
    assert b.snapshot(11.0) == {"state": "closed", "window_calls": 0, "window_failures": 0, "window_slow": 0}


def test_a_time_window_holds_the_calls_of_its_last_seconds() -> None:
    config = BreakerConfig(window="time", window_size=5, minimum_calls=10)
    b = CircuitBreaker("t", config, slow_call_s=1.0, trial_timeout_s=20.0)
    for at, failed in ((0.2, True), (3.0, False), (3.5, True)):
        b.record(_permit(b, at), at, failed=failed, duration_s=2.0)
    assert b.snapshot(4.99) == {"state": "closed", "window_calls": 3, "window_failures": 2, "window_slow": 3}
    assert b.snapshot(5.0) == {"state": "closed", "window_calls": 2, "window_failures": 1, "window_slow": 2}
    assert b.snapshot(7.99)["window_calls"] == 2
    assert b.snapshot(8.0)["window_calls"] == 0
