"""How many tasks of one rate-limited model the pool can usefully run at once. Pure.

A task dispatched to a worker beyond what its model's limits can serve only waits for a
permit inside the worker: it holds a slot, and its wait is invisible to the scheduler's
fair queue and shedding. So dispatch is capped per limit key at what the limits sustain,
by Little's law: tasks per second the limits allow (from the configured rates and the
usage tasks of that model have shown) times the time a task takes when it does not wait
for permits, plus headroom. Tasks beyond the cap wait in the scheduler's queue, where
fairness, deadlines and shedding apply. While the model has no calls waiting for permits,
as many more may start as its buckets can grant at once (`ModelCapacity.burst`, from what
they hold at the limiter's report): a burst goes out at once, but a bucket that is empty
only for a moment between two calls does not lift the cap (every task queued would be
dispatched to wait inside the workers, and the queue's own deadlines would pass behind them).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agentpool.models import AgentResult, RateLimit

#: Extra concurrency over the Little's-law figure, so the limiter always has work waiting.
HEADROOM = 1.1
SPARE = 1
#: The weight of a new sample in the learnt averages, once there are 1 / _ALPHA of them (the
#: mean of the samples until then). Small, so that the cap does not follow each task's time:
#: service times spread widely (a lognormal sigma of 0.5 is common), and a cap that falls by
#: a few tasks at once stops dispatch until that many running tasks have ended.
_ALPHA = 0.05


@dataclass
class _Ewma:
    value: float | None = None
    samples: int = 0

    def add(self, sample: float) -> None:
        self.samples += 1
        alpha = max(_ALPHA, 1 / self.samples)
        self.value = sample if self.value is None else (1 - alpha) * self.value + alpha * sample


class ModelCapacity:
    """One limit key's sustainable task rate and concurrency, learnt from finished tasks.

    Args:
        limit: The key's configured per-minute limits.
    """

    def __init__(self, limit: RateLimit) -> None:
        self._per_minute = limit.per_minute()
        self._calls_per_task = _Ewma()
        self._input_per_call = _Ewma()
        self._output_per_call = _Ewma()
        self._service_s = _Ewma()

    def retune(self, limit: RateLimit) -> None:
        """The key's new per-minute limits; what it learnt of its tasks stays."""
        self._per_minute = limit.per_minute()

    def observe(self, *, calls: int, input_tokens: int, output_tokens: int, run_s: float, permit_wait_s: float) -> None:
        """A finished task of this key: its LLM calls, tokens, run time and time spent waiting for permits."""
        if calls <= 0:
            return
        self._calls_per_task.add(calls)
        self._input_per_call.add(input_tokens / calls)
        self._output_per_call.add(output_tokens / calls)
        self._service_s.add(max(0.0, run_s - permit_wait_s))

    def tasks_per_s(self) -> float | None:
        """Tasks per second the limits sustain, or None before any task has finished."""
        calls = self._calls_per_task.value
        if calls is None:
            return None
        per_call = {
            "requests": 1.0,
            "input_tokens": max(1.0, self._input_per_call.value or 1.0),
            "output_tokens": max(1.0, self._output_per_call.value or 1.0),
        }
        rates = [limit / 60 / per_call[dim] for dim, limit in self._per_minute.items()]
        return min(rates) / calls if rates else None

    def cap(self) -> int | None:
        """Tasks of this key worth running at once; None (no cap) until it has been measured."""
        rate = self.tasks_per_s()
        service = self._service_s.value
        if rate is None or service is None:
            return None
        return math.ceil(rate * service * HEADROOM) + SPARE

    def burst(self, levels: Mapping[str, float]) -> float:
        """Tasks of this key the buckets' `levels` (per dimension) could start at once: the
        least of what each dimension holds over what a task of this key uses of it. Unbounded
        when nothing of its use is known yet."""
        calls = self._calls_per_task.value
        if calls is None:
            return math.inf
        per_call = {
            "requests": 1.0,
            "input_tokens": self._input_per_call.value,
            "output_tokens": self._output_per_call.value,
        }
        calls_held = math.inf
        for dim, level in levels.items():
            use = per_call.get(dim)
            if use is not None:
                calls_held = min(calls_held, max(0.0, level) / max(1.0, use))
        return calls_held if math.isinf(calls_held) else math.floor(calls_held / max(1.0, calls))

    def snapshot(self) -> dict[str, float | int | None]:
        rate = self.tasks_per_s()
        return {
            "tasks_per_s": round(rate, 3) if rate is not None else None,
            "service_s": round(self._service_s.value, 4) if self._service_s.value is not None else None,
            "cap": self.cap(),
        }


@dataclass(frozen=True)
class LimiterBacklog:
    """What the limiter tells the scheduler at each tick, per limit key: the calls waiting for
    a permit (keys with none left out), and what each of its buckets holds now (0 while the
    provider's pause lasts)."""

    waiting: Mapping[str, int]
    levels: Mapping[str, Mapping[str, float]] = field(default_factory=dict)


class ModelDispatch:
    """The scheduler's per-model dispatch state: for each limit key, its learnt capacity, the
    tasks of it running, whether its calls are waiting for permits (then it runs at most its
    cap) and what its buckets held at the limiter's last report (else it may run that much more)."""

    def __init__(self, limits: Mapping[str, RateLimit]) -> None:
        self.capacity = {key: ModelCapacity(limit) for key, limit in limits.items()}
        self._running: Counter[str] = Counter()
        self._backlogged: set[str] = set()
        #: What each key's buckets held at the limiter's last report (unknown: not there), and
        #: its tasks running then less those that ended since: what the buckets held is for
        #: the tasks started beyond these. (A task that ends gives no token back: were it
        #: left in, each task ending between two reports would let one more start, to wait
        #: for a permit inside a worker.)
        self._levels: dict[str, Mapping[str, float]] = {}
        self._base: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self.capacity)

    def retune(self, limits: Mapping[str, RateLimit]) -> None:
        """New limits: a key kept keeps what it learnt (`ModelCapacity.retune`), a new one
        starts afresh, a key no longer limited is no longer capped."""
        for key in [k for k in self.capacity if k not in limits]:
            del self.capacity[key]
            self._backlogged.discard(key)
        for key, limit in limits.items():
            if key in self.capacity:
                self.capacity[key].retune(limit)
            else:
                self.capacity[key] = ModelCapacity(limit)

    def has_room(self, key: str | None) -> bool:
        """Whether one more task of `key` may start: under its cap, raised by the burst its
        buckets can grant while none of its calls waits for a permit."""
        return key is None or self._running[key] < self._allowance(key)

    def excess(self, key: str | None) -> int:
        """Tasks of `key` running over what it may start now: they wait inside the workers
        for permits, and a task queued for the key starts only after that many have ended."""
        if key is None:
            return 0
        allowance = self._allowance(key)
        return 0 if math.isinf(allowance) else max(0, self._running[key] - int(allowance))

    def _allowance(self, key: str) -> float:
        """Tasks of `key` that may run at once now (unbounded: not capped): its cap while its
        calls wait for permits; else also the tasks that ran at the limiter's last report and
        still run, plus the burst its buckets held then, if that is more."""
        capacity = self.capacity.get(key)
        cap = capacity.cap() if capacity is not None else None
        if capacity is None or cap is None:
            return math.inf
        if key in self._backlogged:
            return cap
        levels = self._levels.get(key)
        return math.inf if levels is None else max(cap, self._base[key] + capacity.burst(levels))

    def tasks_per_s(self, key: str | None) -> float | None:
        capacity = self.capacity.get(key) if key is not None else None  # a key unlimited since
        return capacity.tasks_per_s() if capacity is not None else None

    def started(self, key: str | None) -> None:
        if key is not None:
            self._running[key] += 1

    def finished(self, key: str | None) -> None:
        if key is not None:
            self._running[key] -= 1
            if key in self._base:
                self._base[key] -= 1

    def learn(self, key: str | None, result: AgentResult, run_s: float) -> None:
        """What a finished task of `key` shows about the rate its limits sustain."""
        if key is None or key not in self.capacity:  # not limited (any more)
            return
        u = result.usage
        self.capacity[key].observe(
            calls=result.llm_attempts,
            input_tokens=u.input_tokens + u.cache_creation_input_tokens,
            output_tokens=u.output_tokens,
            run_s=run_s,
            permit_wait_s=result.timings.permit_wait_ms / 1000,
        )

    def backlog(self, report: LimiterBacklog) -> bool:
        """Takes the limiter's report; True when some key may start more tasks than before."""
        before = {key: self._allowance(key) for key in self.capacity}
        self._backlogged = {key for key in self.capacity if report.waiting.get(key, 0)}
        self._levels = {key: levels for key, levels in report.levels.items() if key in self.capacity}
        self._base = {key: self._running[key] for key in self._levels}
        return any(self._allowance(key) > allowed for key, allowed in before.items())

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {
            key: {**capacity.snapshot(), "running": self._running[key], "backlogged": key in self._backlogged}
            for key, capacity in self.capacity.items()
        }
