"""How many tasks of one rate-limited model the pool can usefully run at once. Pure.

A task dispatched to a worker beyond what its model's limits can serve only waits for a
permit inside the worker: it holds a slot, and its wait is invisible to the scheduler's
fair queue and shedding. So dispatch is capped per limit key at what the limits sustain,
by Little's law: tasks per second the limits allow (from the configured rates and the
usage tasks of that model have shown) times the time a task takes when it does not wait
for permits, plus headroom. Tasks beyond the cap wait in the scheduler's queue, where
fairness, deadlines and shedding apply. The scheduler applies the cap only while the
model has calls waiting for permits: a burst the buckets can grant goes out at once.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agentpool.models import AgentResult, RateLimit

#: Extra concurrency over the Little's-law figure, so the limiter always has work waiting.
HEADROOM = 1.1
SPARE = 1
_ALPHA = 0.2


@dataclass
class _Ewma:
    value: float | None = None

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else (1 - _ALPHA) * self.value + _ALPHA * sample


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

    def snapshot(self) -> dict[str, float | int | None]:
        rate = self.tasks_per_s()
        return {
            "tasks_per_s": round(rate, 3) if rate is not None else None,
            "service_s": round(self._service_s.value, 4) if self._service_s.value is not None else None,
            "cap": self.cap(),
        }


class ModelDispatch:
    """The scheduler's per-model dispatch state: for each limit key, its learnt capacity, the
    tasks of it running, and whether its calls are waiting for permits (only then is it capped)."""

    def __init__(self, limits: Mapping[str, RateLimit]) -> None:
        self.capacity = {key: ModelCapacity(limit) for key, limit in limits.items()}
        self._running: Counter[str] = Counter()
        self._backlogged: set[str] = set()

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
        if key is None or key not in self._backlogged:
            return True
        cap = self.capacity[key].cap()
        return cap is None or self._running[key] < cap

    def tasks_per_s(self, key: str | None) -> float | None:
        capacity = self.capacity.get(key) if key is not None else None  # a key unlimited since
        return capacity.tasks_per_s() if capacity is not None else None

    def started(self, key: str | None) -> None:
        if key is not None:
            self._running[key] += 1

    def finished(self, key: str | None) -> None:
        if key is not None:
            self._running[key] -= 1

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

    def backlog(self, waiting: Mapping[str, int]) -> bool:
        """Takes the limiter's waiting calls per key; True when some key stopped being capped."""
        now = {key for key in self.capacity if waiting.get(key, 0)}
        freed = bool(self._backlogged - now)
        self._backlogged = now
        return freed

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {
            key: {**capacity.snapshot(), "running": self._running[key], "backlogged": key in self._backlogged}
            for key, capacity in self.capacity.items()
        }
