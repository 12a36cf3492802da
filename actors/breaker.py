"""Circuit breakers for tools, with resilience4j's semantics. Pure: no clock, no asyncio, no Ray.

One `CircuitBreaker` per tool, held for the whole cluster by the pool's tool-board actor
(`actors/tool_board.py`), so every executor and worker sees one state.

- CLOSED: calls pass. Their outcomes fill a sliding window (the last `window_size` calls,
  or the calls of the last `window_size` seconds). Once the window holds `minimum_calls`,
  a failure rate or a slow-call rate at or above its threshold opens the breaker.
- OPEN: calls are refused, with the time left, for `open_wait_s`; then the next call
  attempt moves the breaker to HALF_OPEN.
- HALF_OPEN: at most `half_open_calls` trial calls pass; when all have reported, the
  same thresholds on their outcomes decide between OPEN again and CLOSED. A trial whose
  report never comes (its caller died) counts as a failure once it is `trial_timeout_s` old.

Each CLOSED or HALF_OPEN period is an epoch: a permit from an earlier epoch still reports
(the counters of the caller see it), but no longer moves the breaker.

`CrashLoop` is the backoff for tools and executors that crash their process: a breaker
judges only after `minimum_calls`, and every one of those calls would cost a process
restart.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Literal

from agentpool.config import BreakerConfig

State = Literal["closed", "open", "half_open"]


@dataclass(frozen=True)
class Permit:
    """Leave for one call; give it back with `record` or `release`."""

    id: int
    epoch: int
    trial: bool
    issued_at: float


@dataclass(frozen=True)
class Denied:
    """The breaker refused a call: it is open, or its half-open trials are taken."""

    state: State
    retry_after_s: float


@dataclass(frozen=True)
class Suspended:
    """The tool crashed its executor lately and is refused for `retry_after_s` (`CrashLoop`)."""

    retry_after_s: float


class CrashLoop:
    """Crash-loop backoff per key (a tool, an executor): refused for `first_s` after a crash,
    doubling with each crash in a row up to `max_s`; a call that returns ends the streak
    (the wait already set still runs out)."""

    def __init__(self, first_s: float = 1.0, max_s: float = 30.0) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self._streak: dict[Hashable, int] = {}
        self._until: dict[Hashable, float] = {}

    def crashed(self, key: Hashable, now: float) -> None:
        streak = min(self._streak.get(key, 0) + 1, 64)
        self._streak[key] = streak
        self._until[key] = now + min(self.max_s, self.first_s * 2 ** (streak - 1))

    def returned(self, key: Hashable) -> None:
        self._streak.pop(key, None)

    def wait_s(self, key: Hashable, now: float) -> float:
        return max(0.0, self._until.get(key, 0.0) - now)


@dataclass(frozen=True)
class Transition:
    tool: str
    from_state: State
    to_state: State
    at: float
    calls: int
    failure_rate: float
    slow_rate: float

    def as_dict(self) -> dict[str, object]:
        return {
            "tool": self.tool,
            "from": self.from_state,
            "to": self.to_state,
            "calls": self.calls,
            "failure_rate": round(self.failure_rate, 4),
            "slow_rate": round(self.slow_rate, 4),
        }


@dataclass
class _Tally:
    calls: int = 0
    failures: int = 0
    slow: int = 0

    def add(self, failed: bool, slow: bool, sign: int = 1) -> None:
        self.calls += sign
        self.failures += sign * failed
        self.slow += sign * slow


class _CountWindow:
    """The outcomes of the last `size` calls."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: deque[tuple[bool, bool]] = deque()
        self.tally = _Tally()

    def add(self, failed: bool, slow: bool, now: float) -> None:
        self._items.append((failed, slow))
        self.tally.add(failed, slow)
        if len(self._items) > self._size:
            self.tally.add(*self._items.popleft(), sign=-1)

    def totals(self, now: float) -> _Tally:
        return self.tally


class _TimeWindow:
    """The outcomes of the calls of the last `seconds` seconds, in one-second buckets."""

    def __init__(self, seconds: int) -> None:
        self._seconds = seconds
        self._buckets: deque[tuple[int, _Tally]] = deque()
        self.tally = _Tally()

    def add(self, failed: bool, slow: bool, now: float) -> None:
        second = int(now)
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append((second, _Tally()))
        self._buckets[-1][1].add(failed, slow)
        self.tally.add(failed, slow)
        self._evict(now)

    def totals(self, now: float) -> _Tally:
        self._evict(now)
        return self.tally

    def _evict(self, now: float) -> None:
        oldest = int(now) - self._seconds + 1
        while self._buckets and self._buckets[0][0] < oldest:
            _, old = self._buckets.popleft()
            self.tally.calls -= old.calls
            self.tally.failures -= old.failures
            self.tally.slow -= old.slow


@dataclass
class _Trials:
    outstanding: dict[int, float] = field(default_factory=dict)  # permit id -> issued at
    results: list[tuple[bool, bool]] = field(default_factory=list)


class CircuitBreaker:
    """One tool's breaker.

    Args:
        tool: The tool's name (for transitions).
        config: Thresholds and windows.
        slow_call_s: A call at least this long is slow.
        trial_timeout_s: When an unreported half-open trial counts as failed.

    Every method takes `now` from the caller's clock.
    """

    def __init__(self, tool: str, config: BreakerConfig, *, slow_call_s: float, trial_timeout_s: float) -> None:
        self.tool = tool
        self.config = config
        self.slow_call_s = slow_call_s
        self.trial_timeout_s = trial_timeout_s
        self.state: State = "closed"
        self.epoch = 0
        self.opened_at = 0.0
        self._window = self._new_window()
        self._trials = _Trials()
        self._next_id = 0
        self.last_rates = (0.0, 0.0)

    def _new_window(self) -> _CountWindow | _TimeWindow:
        if self.config.window == "count":
            return _CountWindow(self.config.window_size)
        return _TimeWindow(self.config.window_size)

    # --- calls ---------------------------------------------------------------------------

    def acquire(self, now: float) -> tuple[Permit | Denied, Transition | None]:
        """Permission for one call, and the transition the attempt caused, if any."""
        transition = self.expire(now)
        if self.state == "open":
            left = self.opened_at + self.config.open_wait_s - now
            if left > 0:
                return Denied("open", left), transition
            transition = self._move("half_open", now, 0, 0.0, 0.0)
        trial = self.state == "half_open"
        if trial and len(self._trials.outstanding) + len(self._trials.results) >= self.config.half_open_calls:
            return Denied("half_open", min(self.slow_call_s, self.trial_timeout_s)), transition
        self._next_id += 1
        permit = Permit(self._next_id, self.epoch, trial, now)
        if trial:
            self._trials.outstanding[permit.id] = now
        return permit, transition

    def record(self, permit: Permit, now: float, *, failed: bool, duration_s: float) -> Transition | None:
        """The outcome of a permitted call. Slow is `duration_s >= slow_call_s`."""
        if permit.epoch != self.epoch:
            return None
        slow = duration_s >= self.slow_call_s
        if permit.trial:
            if self._trials.outstanding.pop(permit.id, None) is None:
                return None  # already counted as failed when it expired
            self._trials.results.append((failed, slow))
            return self._judge_trials(now)
        if self.state != "closed":
            return None
        self._window.add(failed, slow, now)
        totals = self._window.totals(now)
        if totals.calls >= self.config.minimum_calls:
            failure_rate, slow_rate = totals.failures / totals.calls, totals.slow / totals.calls
            self.last_rates = (failure_rate, slow_rate)
            if self._over(failure_rate, slow_rate):
                return self._move("open", now, totals.calls, failure_rate, slow_rate)
        return None

    def release(self, permit: Permit) -> None:
        """Gives back a permit whose call never ran (bulkhead full, invalid arguments): no outcome."""
        if permit.trial and permit.epoch == self.epoch:
            self._trials.outstanding.pop(permit.id, None)

    def expire(self, now: float) -> Transition | None:
        """Counts half-open trials unreported for `trial_timeout_s` as failures."""
        if self.state != "half_open":
            return None
        overdue = [pid for pid, at in self._trials.outstanding.items() if now - at >= self.trial_timeout_s]
        for pid in overdue:
            del self._trials.outstanding[pid]
            self._trials.results.append((True, True))
        return self._judge_trials(now) if overdue else None

    # --- state ---------------------------------------------------------------------------

    def _over(self, failure_rate: float, slow_rate: float) -> bool:
        return failure_rate >= self.config.failure_rate or slow_rate >= self.config.slow_call_rate

    def _judge_trials(self, now: float) -> Transition | None:
        results = self._trials.results
        if len(results) < self.config.half_open_calls:
            return None
        failure_rate = sum(f for f, _ in results) / len(results)
        slow_rate = sum(s for _, s in results) / len(results)
        self.last_rates = (failure_rate, slow_rate)
        to: State = "open" if self._over(failure_rate, slow_rate) else "closed"
        return self._move(to, now, len(results), failure_rate, slow_rate)

    def _move(self, to: State, now: float, calls: int, failure_rate: float, slow_rate: float) -> Transition:
        transition = Transition(self.tool, self.state, to, now, calls, failure_rate, slow_rate)
        self.state = to
        self.epoch += 1
        if to == "open":
            self.opened_at = now
        self._window = self._new_window()
        self._trials = _Trials()
        return transition

    def snapshot(self, now: float) -> dict[str, object]:
        totals = self._window.totals(now)
        out: dict[str, object] = {
            "state": self.state,
            "window_calls": totals.calls,
            "window_failures": totals.failures,
            "window_slow": totals.slow,
        }
        if self.state == "open":
            out["retry_after_s"] = round(max(0.0, self.opened_at + self.config.open_wait_s - now), 3)
        if self.state == "half_open":
            out["trials_outstanding"] = len(self._trials.outstanding)
            out["trials_done"] = len(self._trials.results)
        return out
