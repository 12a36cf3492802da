"""Load shedding: when to refuse work at the door, and how to tell a standing queue.

Pure logic; the caller passes `now` (monotonic seconds).

`OverloadDetector` follows CoDel's rule: a queue is healthy if, at least once per interval,
some task waited less than the target. When every wait seen over a whole interval stays
above the target, a standing queue has formed and the pool is overloaded: level 1 sheds
`sheddable` arrivals, and if it lasts `escalate_intervals` intervals, level 2 sheds
`standard` ones too. `critical` work is refused only when it cannot start in time or the
queue is full of work at least as important.

Only interactive work is shed, and only its waits are watched: work that declares a
`deadline_s`, or is `sheddable`. Work with neither is a batch: it waits its turn in the queue,
bounded by the backlog's size, and a batch submitted at once is not mistaken for an overload.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from agentpool.models import Priority
from agentpool.scheduler.fair import PRIORITIES


class OverloadDetector:
    def __init__(self, target_s: float, interval_s: float, escalate_intervals: int) -> None:
        self.target_s = target_s
        self.interval_s = interval_s
        self.escalate_intervals = escalate_intervals
        self._above_until: float | None = None  # when a wait above target becomes a standing queue
        self._overloaded_since: float | None = None

    def observe(self, wait_s: float, now: float) -> None:
        """A queue wait: of a task just dispatched, or the age of the oldest one still waiting."""
        if wait_s < self.target_s:
            self._above_until = None
            self._overloaded_since = None
            return
        if self._above_until is None:
            self._above_until = now + self.interval_s
        elif now >= self._above_until and self._overloaded_since is None:
            self._overloaded_since = now

    def idle(self) -> None:
        """The queue is empty: no standing queue."""
        self._above_until = None
        self._overloaded_since = None

    def level(self, now: float) -> int:
        """0 healthy, 1 shed `sheddable`, 2 shed `standard` too."""
        if self._overloaded_since is None:
            return 0
        if now - self._overloaded_since >= self.interval_s * (self.escalate_intervals - 1):
            return 2
        return 1


def interactive(priority: str, deadline_s: float | None) -> bool:
    """Whether work may be shed for overload, and its waits tell an overload: it declares a
    deadline, or it is `sheddable`. The rest (a batch) waits as long as the backlog holds it."""
    return deadline_s is not None or priority == "sheddable"


def sheds(priority: str, level: int, deadline_s: float | None) -> bool:
    """Whether an arrival of `priority` with `deadline_s` is refused at overload `level`."""
    return interactive(priority, deadline_s) and PRIORITIES.index(priority) >= len(PRIORITIES) - level


class DispatchRate:
    """Tasks started per second over a sliding window, for predicting queue waits."""

    def __init__(self, window_s: float = 10.0, max_events: int = 100_000) -> None:
        self.window_s = window_s
        self._times: deque[float] = deque(maxlen=max_events)

    def record(self, now: float) -> None:
        self._times.append(now)

    def per_s(self, now: float) -> float:
        while self._times and self._times[0] < now - self.window_s:
            self._times.popleft()
        if len(self._times) < 2:
            return 0.0
        span = max(now - self._times[0], 1e-3)
        return len(self._times) / span


@dataclass(frozen=True)
class WaitForecast:
    ahead: int  # waiting items of this tenant that go first (same or higher priority)
    share: float  # the tenant's weight over the weights of all backlogged tenants, itself included
    rate_per_s: float  # the pool's dispatch rate
    #: Tasks of its model running over what the model may run now (waiting for permits in the
    #: workers): that many must end before any task of the model starts.
    behind: int = 0

    def seconds(self) -> float:
        """Predicted wait for one more item: the model's excess to end, then the work ahead
        of it at the tenant's fair share."""
        if self.rate_per_s <= 0 or self.share <= 0:
            return math.inf if self.ahead > 0 or self.behind > 0 else 0.0
        return self.dispatches() / self.rate_per_s

    def dispatches(self) -> float:
        """Dispatches of the pool (of the item's model) until the item's own, itself included."""
        return self.behind + (self.ahead + 1) / self.share if self.share > 0 else math.inf

    def late_chance(self, limit_s: float, stretch: float = 1.0) -> float:
        """The chance that the item still waits after `limit_s`, dispatches coming as a Poisson
        process at the forecast's rate slowed by `stretch` (the calibration): the chance that
        fewer than the dispatches it waits for come within `limit_s`. The mean alone hides
        this: an item two dispatches away at ten a second waits 0.2 s on average, and past
        0.5 s one time in twenty-five."""
        if self.rate_per_s <= 0 or self.share <= 0:
            return 1.0 if self.ahead > 0 or self.behind > 0 else 0.0
        return poisson_below(math.ceil(self.dispatches() - 1e-9), self.rate_per_s * limit_s / stretch)


#: `poisson_below` sums at most this many terms; beyond, it approximates (within 1e-4).
EXACT_TERMS = 100


def poisson_below(k: int, mean: float) -> float:
    """P(N < k) for N Poisson with `mean`: the chance that the k-th event of a unit-rate
    Poisson process comes after `mean`. Summed term by term up to `EXACT_TERMS`; beyond, the
    Wilson-Hilferty approximation of that Gamma(k) waiting time (the cube root of a Gamma is
    close to normal), so an arrival with thousands of dispatches ahead costs no more."""
    if k <= 0:
        return 0.0
    if mean <= 0:
        return 1.0
    if k > EXACT_TERMS:
        spread = 1 / (9 * k)
        z = ((mean / k) ** (1 / 3) - (1 - spread)) / math.sqrt(spread)
        return 0.5 * math.erfc(z / math.sqrt(2))
    log_mean, total = math.log(mean), 0.0
    for n in range(k):
        total += math.exp(n * log_mean - mean - math.lgamma(n + 1))
    return min(1.0, total)


class WaitCalibration:
    """How far the queue-wait forecasts fall short of the waits that follow them.

    Each task admitted on a forecast reports, once dispatched or dropped, the wait it had
    against the wait predicted for it. `factor(now)` is the `quantile` of (waited +
    `slack_s`) / (predicted + `slack_s`) over the last `window` reports of the last
    `horizon_s` seconds, at least 1 and at most `max_factor`: admission multiplies its
    forecast by it, so that a task the pool would drop after waiting is refused on arrival
    instead. The slack keeps near-zero forecasts from turning small absolute errors into
    huge ratios. With fewer than `min_samples` reports, 1. The horizon matters: a factor
    high enough to refuse every forecast task would get no new reports to lower it, so old
    ones expire and the factor falls back to 1.
    """

    def __init__(
        self,
        *,
        window: int = 256,
        horizon_s: float = 30.0,
        quantile: float = 0.9,
        min_samples: int = 20,
        slack_s: float = 0.05,
        max_factor: float = 10.0,
    ) -> None:
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile must be in (0, 1], not {quantile}")
        self.window = window
        self.horizon_s = horizon_s
        self.quantile = quantile
        self.min_samples = min_samples
        self.slack_s = slack_s
        self.max_factor = max_factor
        self._reports: deque[tuple[float, float]] = deque()  # (when, ratio), oldest first
        self._sorted: list[float] = []  # the same ratios, in order of size

    def observe(self, predicted_s: float, waited_s: float, now: float) -> None:
        if not (math.isfinite(predicted_s) and math.isfinite(waited_s)):
            return
        ratio = (max(0.0, waited_s) + self.slack_s) / (max(0.0, predicted_s) + self.slack_s)
        self._reports.append((now, ratio))
        bisect.insort(self._sorted, ratio)
        if len(self._reports) > self.window:
            self._forget_oldest()

    def enough(self, now: float) -> bool:
        """Whether it has the `min_samples` recent reports a factor other than 1 needs."""
        while self._reports and self._reports[0][0] <= now - self.horizon_s:
            self._forget_oldest()
        return len(self._sorted) >= self.min_samples

    def factor(self, now: float) -> float:
        if not self.enough(now):
            return 1.0
        n = len(self._sorted)
        at = self._sorted[min(n - 1, max(0, math.ceil(self.quantile * n) - 1))]
        return min(self.max_factor, max(1.0, at))

    def _forget_oldest(self) -> None:
        _, ratio = self._reports.popleft()
        del self._sorted[bisect.bisect_left(self._sorted, ratio)]


class ClassCalibration:
    """`WaitCalibration` per priority class, over one of all classes together.

    The classes fall short of their forecasts differently: a forecast counts the work ahead
    of a task now, and work of a higher class that arrives later goes ahead of it too, so the
    lower a class, the longer its waits run over. Each class's forecasts are scaled by its own
    reports once it has enough of them, by all classes' until then.
    """

    def __init__(self, make: Callable[[], WaitCalibration] = WaitCalibration) -> None:
        self.pooled = make()
        self.by_class: dict[Priority, WaitCalibration] = {priority: make() for priority in PRIORITIES}

    def observe(self, priority: Priority, predicted_s: float, waited_s: float, now: float) -> None:
        self.pooled.observe(predicted_s, waited_s, now)
        self.by_class[priority].observe(predicted_s, waited_s, now)

    def factor(self, priority: Priority, now: float) -> float:
        own = self.by_class[priority]
        return own.factor(now) if own.enough(now) else self.pooled.factor(now)
