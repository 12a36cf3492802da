"""Alerts on what tasks end with: a run's cost, a tenant's error rate and p95 latency.

Pure logic with an injected clock (no Ray, no Redis): the scheduler feeds it every final
record and sends what it returns as `alert` events.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from agentpool.config import AlertConfig
from agentpool.vocabulary import TaskStatus

AlertKind = Literal["run_cost", "error_rate", "p95_latency"]
#: Most outcomes kept per tenant inside a window (the oldest go first beyond it).
MAX_WINDOW = 100_000


@dataclass(frozen=True)
class Alert:
    tenant: str
    kind: AlertKind
    #: `firing` when the value crossed the threshold; `resolved` when it is back under.
    state: Literal["firing", "resolved"]
    value: float
    threshold: float
    task_id: str | None = None


@dataclass
class _Window:
    outcomes: deque[tuple[float, bool, float]] = field(default_factory=deque)  # (at, error, latency_s)
    errors: int = 0
    firing: set[str] = field(default_factory=set)


def p95(values: list[float]) -> float:
    """The 95th percentile (nearest rank) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


class AlertMonitor:
    """Per-tenant sliding windows of task outcomes, and the alerts they raise."""

    def __init__(self, config: AlertConfig) -> None:
        self.config = config
        self._windows: dict[str, _Window] = {}

    @property
    def enabled(self) -> bool:
        c = self.config
        return any(v is not None for v in (c.run_cost_usd, c.error_rate, c.p95_latency_s))

    def observe(
        self, tenant: str, task_id: str, status: TaskStatus, latency_s: float, cost_usd: float, now: float
    ) -> list[Alert]:
        """Takes one final record; returns the alerts it raises or resolves. Tasks that never
        ran are left out of the error rate and the latency; errors are `TaskStatus.is_error`
        (a rejection is shedding, not an error)."""
        c = self.config
        raised: list[Alert] = []
        if c.run_cost_usd is not None and cost_usd > c.run_cost_usd:
            raised.append(Alert(tenant, "run_cost", "firing", cost_usd, c.run_cost_usd, task_id))
        if not status.ran or (c.error_rate is None and c.p95_latency_s is None):
            return raised
        window = self._windows.setdefault(tenant, _Window())
        error = status.is_error
        window.outcomes.append((now, error, latency_s))
        window.errors += error
        self._expire(window, now)
        if len(window.outcomes) < c.min_tasks:
            return raised
        if c.error_rate is not None:
            rate = window.errors / len(window.outcomes)
            raised += self._edge(window, tenant, "error_rate", rate, c.error_rate)
        if c.p95_latency_s is not None:
            latency = p95([o[2] for o in window.outcomes])
            raised += self._edge(window, tenant, "p95_latency", latency, c.p95_latency_s)
        return raised

    def _expire(self, window: _Window, now: float) -> None:
        while window.outcomes and (
            window.outcomes[0][0] <= now - self.config.window_s or len(window.outcomes) > MAX_WINDOW
        ):
            window.errors -= window.outcomes.popleft()[1]

    @staticmethod
    def _edge(window: _Window, tenant: str, kind: AlertKind, value: float, threshold: float) -> list[Alert]:
        """An alert only when the check changes side: over (firing) or back under (resolved)."""
        over = value > threshold
        if over == (kind in window.firing):
            return []
        if over:
            window.firing.add(kind)
        else:
            window.firing.discard(kind)
        return [Alert(tenant, kind, "firing" if over else "resolved", round(value, 6), threshold)]

    def firing(self) -> dict[str, list[str]]:
        """Per tenant, the windowed checks now over their thresholds."""
        return {t: sorted(w.firing) for t, w in self._windows.items() if w.firing}
