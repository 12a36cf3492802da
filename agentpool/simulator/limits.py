"""Server-side rate limits of the simulated provider, enforced the way Anthropic documents:
a bucket per dimension (requests, input tokens, output tokens) that refills continuously up
to its per-minute limit, rather than resetting at fixed minute boundaries."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


class ServerBucket:
    """A token bucket holding at most `limit_per_min`, refilled at `limit_per_min / 60` per s."""

    def __init__(self, limit_per_min: int, clock: Callable[[], float]) -> None:
        self.limit = limit_per_min
        self._rate = limit_per_min / 60.0
        self._clock = clock
        self._level = float(limit_per_min)
        self._at = clock()

    def level(self) -> float:
        now = self._clock()
        self._level = min(self.limit, self._level + (now - self._at) * self._rate)
        self._at = now
        return self._level

    def wait_s(self, amount: float) -> float:
        """Seconds until `amount` fits (0 if it fits now)."""
        missing = min(amount, self.limit) - self.level()
        return 0.0 if missing <= 0 else missing / self._rate

    def take(self, amount: float) -> None:
        self._level = self.level() - amount

    def give(self, amount: float) -> None:
        self._level = min(self.limit, self.level() + amount)

    def full_in_s(self) -> float:
        return (self.limit - self.level()) / self._rate


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after_s: float = 0.0
    dimension: str | None = None


class ModelLimits:
    """The three buckets of one model; `admit` takes from all or from none."""

    def __init__(self, rpm: int | None, itpm: int | None, otpm: int | None, clock: Callable[[], float]) -> None:
        self.buckets: dict[str, ServerBucket] = {}
        for dim, limit in (("requests", rpm), ("input-tokens", itpm), ("output-tokens", otpm)):
            if limit is not None:
                self.buckets[dim] = ServerBucket(limit, clock)

    def admit(self, input_tokens: int, max_output_tokens: int) -> Verdict:
        # Output tokens are estimated from max_tokens at the start and corrected at the end,
        # as Anthropic's OTPM limit is; cache reads never count towards input.
        wants = {"requests": 1, "input-tokens": input_tokens, "output-tokens": max_output_tokens}
        worst = Verdict(True)
        for dim, bucket in self.buckets.items():
            wait = bucket.wait_s(wants[dim])
            if wait > worst.retry_after_s:
                worst = Verdict(False, wait, dim)
        if worst.allowed:
            for dim, bucket in self.buckets.items():
                bucket.take(wants[dim])
        return worst

    def settle(self, reserved_output: int, actual_output: int) -> None:
        if "output-tokens" in self.buckets and reserved_output > actual_output:
            self.buckets["output-tokens"].give(reserved_output - actual_output)

    def headers(self, now_unix: float) -> dict[str, str]:
        import datetime as dt

        out: dict[str, str] = {}
        for dim, bucket in self.buckets.items():
            reset = dt.datetime.fromtimestamp(now_unix + bucket.full_in_s(), tz=dt.UTC)
            out[f"anthropic-ratelimit-{dim}-limit"] = str(bucket.limit)
            out[f"anthropic-ratelimit-{dim}-remaining"] = str(max(0, math.floor(bucket.level())))
            out[f"anthropic-ratelimit-{dim}-reset"] = reset.isoformat().replace("+00:00", "Z")
        return out
