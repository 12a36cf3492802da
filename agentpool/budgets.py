"""Daily budgets' arithmetic, pure: what one tenant's UTC day holds and what each step does
to it. No Redis, no clock: times are passed in.

A day holds what was spent (tokens, cost, calls) and what calls in flight have reserved.
`reserve` takes a call's worst case only if it fits under both limits together with all that
is spent and reserved; when it does not fit, reservations whose holder died (older than
their expiry) are first counted as spent, since their calls may have reached the provider,
and it is tried once more. `settle` replaces a reservation by the call's actual usage;
`settle` without usage is a refund. A reservation already counted as spent by a sweep is not
counted twice. `admission_check` is the cheaper test at the door: the day's spending
(reservations left out, as they may yet be refunded) and the task's first call.

`cluster/budgets.py` runs `reserve` and `settle` as Lua scripts on the day's hash, so that
concurrent calls cannot overspend together; `tests/test_budgets.py` runs random sequences
of steps through both and compares the days.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from agentpool.models import Usage
from agentpool.vocabulary import BudgetReason, ErrorReason

#: Dollar sums are floats here and in Redis (HINCRBYFLOAT rounds each to 17 digits), and
#: can differ in the last bits: a sum that reaches a budget exactly crosses it only by more
#: than a nano-dollar, in both places, so the two never disagree at the boundary.
COST_SLACK_USD = 1e-9


@dataclass(frozen=True)
class Limits:
    """A tenant's daily limits; None: no limit on that dimension."""

    tokens: int | None = None
    cost_usd: float | None = None

    def __bool__(self) -> bool:
        return self.tokens is not None or self.cost_usd is not None


@dataclass(frozen=True)
class Hold:
    """One call's reservation."""

    tokens: int
    cost_usd: float
    expires_at: float


@dataclass
class Day:
    """One tenant's UTC day (the fields of its `usage:<day>` hash)."""

    tokens: int = 0
    cost_usd: float = 0.0
    reserved_tokens: int = 0
    reserved_cost_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    calls: int = 0
    expired_reservations: int = 0
    holds: dict[str, Hold] = field(default_factory=dict)

    def over(self, limits: Limits, tokens: int, cost_usd: float) -> BudgetReason | None:
        """The limit that `tokens` and `cost_usd` more, on top of everything spent and
        reserved, would cross; None when they fit."""
        if limits.tokens is not None and self.tokens + self.reserved_tokens + tokens > limits.tokens:
            return ErrorReason.DAILY_TOKEN_BUDGET
        total = self.cost_usd + self.reserved_cost_usd + cost_usd
        if limits.cost_usd is not None and total > limits.cost_usd + COST_SLACK_USD:
            return ErrorReason.DAILY_COST_BUDGET
        return None

    def reserve(
        self, limits: Limits, lease_id: str, tokens: int, cost_usd: float, now: float, expires_at: float
    ) -> BudgetReason | None:
        """Holds a call's worst case; the limit it would cross instead (nothing held)."""
        if self.over(limits, tokens, cost_usd) is not None:
            self.sweep(now)
            why = self.over(limits, tokens, cost_usd)
            if why is not None:
                return why
        self.reserved_tokens += tokens
        self.reserved_cost_usd += cost_usd
        self.holds[lease_id] = Hold(tokens, cost_usd, expires_at)
        return None

    def sweep(self, now: float) -> None:
        """Counts the reservations expired at `now` as spent (their holders died)."""
        for lease_id, hold in list(self.holds.items()):
            if hold.expires_at <= now:
                del self.holds[lease_id]
                self.reserved_tokens -= hold.tokens
                self.reserved_cost_usd -= hold.cost_usd
                self.tokens += hold.tokens
                self.cost_usd += hold.cost_usd
                self.expired_reservations += 1

    def settle(self, lease_id: str | None, spend: Usage | None) -> None:
        """Releases the reservation `lease_id` (if any) and records `spend`, the call's usage
        as priced; without `spend`, a refund. A reservation already swept keeps standing for the call."""
        swept = False
        if lease_id is not None:
            hold = self.holds.pop(lease_id, None)
            if hold is None:
                swept = True
            else:
                self.reserved_tokens -= hold.tokens
                self.reserved_cost_usd -= hold.cost_usd
        if spend is None:
            return
        if not swept:
            self.tokens += (
                spend.input_tokens
                + spend.output_tokens
                + spend.cache_read_input_tokens
                + spend.cache_creation_input_tokens
            )
            self.input_tokens += spend.input_tokens
            self.output_tokens += spend.output_tokens
            self.cache_read_input_tokens += spend.cache_read_input_tokens
            self.cache_creation_input_tokens += spend.cache_creation_input_tokens
            self.cost_usd += spend.cost_usd
        self.calls += 1


def admission_check(spent: Mapping[str, float], limits: Limits, first_call_tokens: int = 0) -> BudgetReason | None:
    """At admission: the limit what is left of the day cannot cover even the task's first
    call; None when it can. Reservations are left out (they may yet be refunded), and a cost
    budget is spent once it is reached."""
    if limits.tokens is not None and spent.get("tokens", 0) + first_call_tokens > limits.tokens:
        return ErrorReason.DAILY_TOKEN_BUDGET
    if limits.cost_usd is not None and spent.get("cost_usd", 0) >= limits.cost_usd:
        return ErrorReason.DAILY_COST_BUDGET
    return None
