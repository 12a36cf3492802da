"""How many agent workers the pool wants: a pure rule with stabilisation windows (no Ray).

The demand is the agent loops that want a slot (running plus queued). Each observation
yields a recommendation, `ceil(demand / target_per_worker)` within [min, max], except that
a count whose load is within `tolerance` of the target is left as it is. As in Kubernetes'
horizontal autoscaler, a change must be wanted for a whole window: the pool grows to the
smallest recommendation of the last `upscale_delay_s` and shrinks to the largest of the
last `downscale_delay_s`. A short burst therefore adds no worker, a short lull removes
none, and a steady demand moves the count once and then leaves it: no oscillation.
"""

from __future__ import annotations

import math
from collections import deque


class WorkerScaler:
    """Decides the worker count from observations of demand (times passed in: no clock)."""

    def __init__(
        self,
        *,
        min_workers: int,
        max_workers: int,
        target_per_worker: float,
        upscale_delay_s: float,
        downscale_delay_s: float,
        tolerance: float = 0.1,
    ) -> None:
        if not 1 <= min_workers <= max_workers or target_per_worker <= 0:
            raise ValueError("need 1 <= min_workers <= max_workers and a positive target")
        self.min_workers = min_workers
        self.max_workers = max_workers
        self.target = target_per_worker
        self.up_s = upscale_delay_s
        self.down_s = downscale_delay_s
        self.tolerance = tolerance
        self._history: deque[tuple[float, int]] = deque()
        self._since: float | None = None

    def recommend(self, demand: float, current: int) -> int:
        """The count this one observation asks for."""
        if current > 0 and abs(demand / (current * self.target) - 1) <= self.tolerance:
            wanted = current
        else:
            wanted = math.ceil(demand / self.target)
        return min(self.max_workers, max(self.min_workers, wanted))

    def decide(self, now: float, demand: float, current: int) -> int:
        """The count to have now, given the demand observed at `now` (times never go back)."""
        if self._since is None:
            self._since = now
        self._history.append((now, self.recommend(demand, current)))
        horizon = now - max(self.up_s, self.down_s)
        while self._history and self._history[0][0] < horizon:
            self._history.popleft()
        observed_s = now - self._since
        if observed_s >= self.up_s:
            floor = min(r for t, r in self._history if t >= now - self.up_s)
            if floor > current:
                return floor
        if observed_s >= self.down_s:
            ceiling = max(r for t, r in self._history if t >= now - self.down_s)
            if ceiling < current:
                return ceiling
        return min(self.max_workers, max(self.min_workers, current))
