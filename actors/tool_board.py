"""The tool board: every tool's circuit breaker, crash-loop backoff and outcome counts, in one
place for the cluster.

`BreakerBoard` is the pure part (injected clock); `ToolBoard` is the named actor that holds
it, so all workers share one breaker per tool and its updates are atomic (one actor, one
event loop). Its state is not persisted: after a restart every breaker starts closed.

A tool whose call crashed an executor's process is refused cluster-wide for a while
(`CrashLoop`: 1 s, doubling per crash in a row), and each refusal counts as a failure for
its breaker: the breaker then opens after a crash or two, not after `minimum_calls`
process restarts.
"""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import ray
from opentelemetry.metrics import CallbackOptions, Observation

from agentpool import heap
from agentpool import telemetry as tm
from agentpool.actors.breaker import CircuitBreaker, CrashLoop, Denied, Permit, Suspended, Transition
from agentpool.cluster.telemetry import Telemetered
from agentpool.config import BreakerConfig
from agentpool.vocabulary import ToolErrorKind, ToolTally, tally_ran

#: Grace on top of a tool's timeout before an unreported half-open trial counts as failed.
_TRIAL_GRACE_S = 10.0
_MAX_TOOLS = 10_000


class BreakerBoard:
    """Breakers and counters for many tools.

    Args:
        tools: The executors' catalog: per tool, `ToolSpec.info()` (its timeout and its own
            breaker config, if any) and its definition.
        default: The breaker config of tools without their own.
        clock: Monotonic seconds.
    """

    def __init__(
        self,
        tools: dict[str, dict[str, Any]],
        default: BreakerConfig,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tools = tools
        self._default = default
        self._clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}
        self._crashes = CrashLoop()
        self.counts: dict[str, Counter[ToolTally]] = {}
        self.transitions: deque[dict[str, object]] = deque(maxlen=100)

    def breaker(self, tool: str) -> CircuitBreaker | None:
        found = self._breakers.get(tool)
        if found is not None:
            return found
        info = self._tools.get(tool)
        if info is None:
            return None
        config = BreakerConfig(**info["breaker"]) if info.get("breaker") else self._default
        if not config.enabled:
            return None
        timeout_s = float(info.get("timeout_s", 30.0))
        slow_s = config.slow_call_s if config.slow_call_s is not None else timeout_s / 2
        found = CircuitBreaker(tool, config, slow_call_s=slow_s, trial_timeout_s=timeout_s + _TRIAL_GRACE_S)
        self._breakers[tool] = found
        return found

    def acquire(self, tool: str) -> tuple[Permit | None, Denied | Suspended | None, dict[str, object] | None]:
        """(permit, None, transition) when the call may go; (None, refusal, transition) when
        not. A tool without a breaker gets (None, None, None) unless it is in crash backoff:
        go, nothing to report back."""
        now = self._clock()
        breaker = self.breaker(tool)
        decision, transition = breaker.acquire(now) if breaker is not None else (None, None)
        if isinstance(decision, Denied):
            self.count(tool, ToolErrorKind.BREAKER_OPEN)
            return None, decision, self._log(transition)
        wait_s = self._crashes.wait_s(tool, now)
        if wait_s <= 0:
            return decision, None, self._log(transition)
        self.count(tool, ToolErrorKind.RESTARTING)
        if breaker is not None and decision is not None:  # refused for crashing: a failure of the tool
            self._log(transition)
            transition = breaker.record(decision, now, failed=True, duration_s=0.0)
        return None, Suspended(wait_s), self._log(transition)

    def record(
        self, tool: str, permit: Permit | None, kind: ToolErrorKind | None, duration_s: float
    ) -> dict[str, object] | None:
        """The outcome of a call (`kind` None when it succeeded); returns the transition it caused."""
        self.count(tool, kind or "ok")
        if kind is ToolErrorKind.CRASHED:
            self._crashes.crashed(tool, self._clock())
        elif kind is None or kind.returned:  # back from a live process: a crash streak ends
            self._crashes.returned(tool)
        breaker = self._breakers.get(tool)
        if permit is None or breaker is None:
            return None
        if kind is not None and not kind.ran and not kind.is_failure:  # never started: no outcome
            breaker.release(permit)
            return None
        failed = kind is not None and kind.is_failure
        transition = breaker.record(permit, self._clock(), failed=failed, duration_s=duration_s)
        return self._log(transition)

    def count(self, tool: str, kind: ToolTally) -> None:
        if tool not in self.counts and len(self.counts) >= _MAX_TOOLS:
            tool = "(other)"  # invented tool names must not grow the table without bound
        self.counts.setdefault(tool, Counter())[kind] += 1

    def _log(self, transition: Transition | None) -> dict[str, object] | None:
        if transition is None:
            return None
        counts = self.counts.get(transition.tool, Counter())
        ran = sum(n for kind, n in counts.items() if tally_ran(kind))
        entry = {**transition.as_dict(), "calls_ran_so_far": ran, "unix_ts": round(time.time(), 3)}
        self.transitions.append(entry)
        return entry

    def breakers(self) -> dict[str, CircuitBreaker]:
        """The tools' breakers so far (a copy)."""
        return dict(self._breakers)

    def status(self) -> dict[str, Any]:
        now = self._clock()
        for breaker in self._breakers.values():
            if transition := breaker.expire(now):
                self._log(transition)
        tools = sorted(set(self._breakers) | set(self.counts))
        return {
            "tools": {
                t: {
                    "breaker": self._breakers[t].snapshot(now) if t in self._breakers else None,
                    "crash_backoff_s": round(self._crashes.wait_s(t, now), 3),
                    "outcomes": dict(self.counts.get(t, {})),
                }
                for t in tools
            },
            "transitions": list(self.transitions)[-20:],
        }


@ray.remote
class ToolBoard(Telemetered):
    """Named actor (`{pool}-tools`) holding the pool's `BreakerBoard`."""

    def __init__(self, tools: dict[str, dict[str, Any]], default: dict[str, Any]) -> None:
        self._setup_telemetry("tool_board")
        self._board = BreakerBoard(tools, BreakerConfig(**default))
        tm.meter.create_observable_gauge(
            "agentpool.breaker.state",
            callbacks=[self._observe_breakers],
            unit="1",
            description="Each tool's circuit breaker: 1 for the state it is in, 0 for the others.",
        )
        heap.settle()

    def _observe_breakers(self, options: CallbackOptions) -> list[Observation]:
        # Called on the metrics exporter's thread: read a copy, never the live dict.
        breakers = self._board.breakers()
        return [
            Observation(int(breaker.state == state), {"gen_ai.tool.name": tool, "agentpool.breaker.state": state})
            for tool, breaker in breakers.items()
            for state in ("closed", "open", "half_open")
        ]

    def acquire(self, tool: str) -> tuple[Permit | None, Denied | Suspended | None, dict[str, object] | None]:
        return self._board.acquire(tool)

    def record(
        self, tool: str, permit: Permit | None, kind: ToolErrorKind | None, duration_s: float
    ) -> dict[str, object] | None:
        return self._board.record(tool, permit, kind, duration_s)

    def count(self, tool: str, kind: ToolTally) -> None:
        self._board.count(tool, kind)

    def pid(self) -> int:
        """This actor's process id (an upgrade checks its restart by it)."""
        return os.getpid()

    def status(self) -> dict[str, Any]:
        return self._board.status()
