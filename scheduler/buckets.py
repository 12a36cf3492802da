"""Token buckets with continuous replenishment, the way Anthropic enforces its limits.

Pure logic with an injected clock (`now` is passed in), no asyncio and no Ray: the permit
broker and the property tests drive it directly.

A bucket holds at most `capacity` (the per-minute limit) and refills at `capacity / 60` per
second. A take is granted only when the level covers it, so over any window of length W the
net amount granted (takes minus refunds) is at most `capacity + rate * W`. Reconciling a
call that used more than it reserved may push the level below zero: that debt is repaid
by refill before anything else is granted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


class TokenBucket:
    """One dimension (requests, input tokens or output tokens) of one limit."""

    def __init__(self, per_minute: float, now: float, *, full: bool = True, margin_s: float = 0.0) -> None:
        if per_minute <= 0:
            raise ValueError("per_minute must be positive")
        self.capacity = float(per_minute)
        self.rate = self.capacity / 60.0
        # Our grant happens before the provider counts the request (the request is still on
        # its way), so the provider's bucket may be up to `margin_s` of refill behind ours.
        self.margin_s = margin_s
        self.margin = self.rate * margin_s
        self._level = self.capacity if full else 0.0
        self._at = now

    def retune(self, per_minute: float, now: float) -> None:
        """New limits for the same bucket: its level is kept (at most the new capacity), so
        a change neither grants a burst nor takes back what has refilled."""
        if per_minute <= 0:
            raise ValueError("per_minute must be positive")
        level = self.level(now)
        self.capacity = float(per_minute)
        self.rate = self.capacity / 60.0
        self.margin = self.rate * self.margin_s
        self._level = min(level, self.capacity)

    def level(self, now: float) -> float:
        if now > self._at:
            self._level = min(self.capacity, self._level + (now - self._at) * self.rate)
            self._at = now
        return self._level

    def clamp(self, amount: float) -> float:
        """What a request of `amount` reserves: never more than the bucket can ever hold."""
        return min(float(amount), self.capacity)

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until `amount` (clamped) fits; 0 when it fits now."""
        missing = min(self.clamp(amount) + self.margin, self.capacity) - self.level(now)
        return 0.0 if missing <= 1e-9 else missing / self.rate

    def take(self, amount: float, now: float) -> None:
        """Removes `amount`. Grants check `wait_s` first; reconciling an excess may not (debt)."""
        self._level = self.level(now) - amount

    def give(self, amount: float, now: float) -> None:
        """Returns `amount` (a refund), never filling above capacity."""
        self._level = min(self.capacity, self.level(now) + amount)

    def lower_to(self, remaining: float, now: float) -> bool:
        """Lowers the level to what the provider reports as remaining; never raises it."""
        if remaining < self.level(now):
            self._level = max(0.0, float(remaining))
            return True
        return False


DIMENSIONS: tuple[str, ...] = ("requests", "input_tokens", "output_tokens")


@dataclass
class BucketSet:
    """The buckets of one limit (a model class, or one tenant's own caps), taken all-or-none.

    `paused_until` holds the provider's `retry-after`: nothing is granted before it.
    """

    buckets: dict[str, TokenBucket]
    paused_until: float = 0.0
    granted: dict[str, float] = field(default_factory=lambda: dict.fromkeys(DIMENSIONS, 0.0))

    @classmethod
    def from_limits(
        cls, per_minute: Mapping[str, int], now: float, *, full: bool = True, margin_s: float = 0.0
    ) -> BucketSet:
        return cls({dim: TokenBucket(limit, now, full=full, margin_s=margin_s) for dim, limit in per_minute.items()})

    def retune(self, per_minute: Mapping[str, int], now: float, *, margin_s: float = 0.0) -> None:
        """New limits: a dimension kept is retuned (`TokenBucket.retune`), a new one starts
        full, a dropped one goes; a pause and what was granted stay."""
        for dim in [d for d in self.buckets if d not in per_minute]:
            del self.buckets[dim]
        for dim, limit in per_minute.items():
            if dim in self.buckets:
                self.buckets[dim].retune(limit, now)
            else:
                self.buckets[dim] = TokenBucket(limit, now, margin_s=margin_s)

    def wait_s(self, amounts: Mapping[str, float], now: float) -> float:
        """Seconds until every dimension covers its amount (and any pause is over)."""
        wait = max(0.0, self.paused_until - now)
        for dim, bucket in self.buckets.items():
            wait = max(wait, bucket.wait_s(amounts.get(dim, 0.0), now))
        return wait

    def take(self, amounts: Mapping[str, float], now: float) -> dict[str, float]:
        """Takes every amount; returns what was actually reserved per dimension."""
        taken: dict[str, float] = {}
        for dim, bucket in self.buckets.items():
            amount = bucket.clamp(amounts.get(dim, 0.0))
            bucket.take(amount, now)
            taken[dim] = amount
            self.granted[dim] += amount
        return taken

    def settle(self, reserved: Mapping[str, float], actual: Mapping[str, float], now: float) -> None:
        """Replaces a reservation by the actual use: refunds the difference, or takes the excess."""
        for dim, bucket in self.buckets.items():
            delta = reserved.get(dim, 0.0) - actual.get(dim, reserved.get(dim, 0.0))
            if delta > 0:
                bucket.give(delta, now)
            elif delta < 0:
                bucket.take(-delta, now)
            self.granted[dim] -= delta

    def pause(self, until: float) -> None:
        self.paused_until = max(self.paused_until, until)

    def lower_to(self, remaining: Mapping[str, float], now: float) -> list[str]:
        return [
            dim for dim, value in remaining.items() if dim in self.buckets and self.buckets[dim].lower_to(value, now)
        ]

    def snapshot(self, now: float) -> dict[str, object]:
        """Levels per dimension, and how long the provider's pause still lasts."""
        dims = {
            dim: {"level": round(bucket.level(now), 3), "capacity": bucket.capacity}
            for dim, bucket in self.buckets.items()
        }
        return {
            "dimensions": dims,
            "paused_for_s": round(max(0.0, self.paused_until - now), 3),
            "granted": {dim: round(amount, 3) for dim, amount in self.granted.items()},
        }
