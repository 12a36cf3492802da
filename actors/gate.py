"""The per-task gate every LLM attempt passes: budget reservation, then a rate permit.

Runs inside the worker. The budget is reserved in Redis first (a spent budget fails fast,
without queueing for a permit), then the worker waits for a lease from the pool's
rate-limiter actor. After the attempt the lease is released without waiting for a reply
and the reservation is replaced by the actual usage (or refunded when the attempt failed).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from agentpool import telemetry as tm
from agentpool.background import Background
from agentpool.cluster.budgets import BudgetLedger, Reservation, limits_of
from agentpool.cluster.connection import Scripted
from agentpool.conversation import estimate_input_tokens
from agentpool.models import TenantPolicy, Usage
from agentpool.pricing import PriceTable

#: `anthropic-ratelimit-<name>-remaining` header names, by our bucket dimension.
_REMAINING_HEADERS = {
    "requests": "anthropic-ratelimit-requests-remaining",
    "input_tokens": "anthropic-ratelimit-input-tokens-remaining",
    "output_tokens": "anthropic-ratelimit-output-tokens-remaining",
}


def remaining_from_headers(headers: Mapping[str, str] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    if headers is None:
        return out
    for dim, name in _REMAINING_HEADERS.items():
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            out[dim] = float(raw)
        except ValueError:
            continue
    return out


@dataclass(frozen=True)
class Unsettled:
    """Usage taken from a gate to be recorded (`TaskGate.unsettled`), and its write."""

    usage: Usage
    calls: int
    write: Scripted


@dataclass
class Ticket:
    lease_id: str | None  # None: no bucket governs this call, no lease was taken
    model: str
    reservation: Reservation | None
    #: A call of the batch lane: priced at batch prices, and no rate permit taken.
    batch: bool = False


class TaskGate:
    """One task's gate (tenant and priority fixed); the limiter and ledger are the worker's."""

    def __init__(
        self,
        *,
        limiter: Any,
        ledger: BudgetLedger,
        prices: PriceTable,
        tenant: str,
        policy: TenantPolicy,
        priority: str,
        chars_per_token: float,
        holder: str,
        limited: Callable[[str], bool] = lambda model: True,
    ) -> None:
        self._limiter = limiter
        self._ledger = ledger
        self._prices = prices
        self._tenant = tenant
        self._policy = policy
        self._priority = priority
        self._chars_per_token = chars_per_token
        self._holder = holder
        # Leases are needed only where there is a bucket to take from: the model's configured
        # limits, or the tenant's own. Elsewhere a call skips the limiter's two round trips.
        self._limited = limited
        self._tenant_limited = bool(policy.limits.per_minute())
        self._budgeted = bool(limits_of(policy))
        self._pending = Background()
        #: Usage no budget reserved and no write has recorded yet (see `unsettled`).
        self._unsettled: Usage | None = None
        self._unsettled_calls = 0
        #: Time this task's calls spent waiting for rate permits (the scheduler learns from it).
        self.permit_wait_s = 0.0

    async def before(self, model: str, request: dict[str, Any], *, batch: bool = False) -> Ticket:
        """The call's budget reservation, then its rate permit. A batch-lane call (`batch`)
        takes no permit: the Batches API has limits of its own, and a permit held while a
        batch is processed would starve the real-time calls."""
        limited = not batch and (self._tenant_limited or self._limited(model))
        if not (limited or self._budgeted):  # nothing to reserve or take: no estimate, no id
            return Ticket(None, model, None, batch)
        lease_id = uuid.uuid4().hex
        input_tokens = estimate_input_tokens(request, self._chars_per_token)
        max_tokens = int(request["max_tokens"])
        reservation = await self._ledger.reserve(
            self._tenant,
            self._policy,
            lease_id,
            input_tokens + max_tokens,
            self._prices.worst_cost_usd([model], input_tokens, max_tokens),
        )
        if not limited:
            return Ticket(None, model, reservation, batch)
        asked = time.monotonic()
        try:
            await self._limiter.acquire.remote(
                lease_id, self._tenant, model, input_tokens, max_tokens, self._holder, self._priority
            )
            waited_s = time.monotonic() - asked
            self.permit_wait_s += waited_s
            tm.permit_wait.record(waited_s, {"gen_ai.request.model": model, "agentpool.tenant": self._tenant})
        except BaseException:  # cancelled (or the limiter failed) while waiting: nothing may stay held
            self._limiter.cancel.remote(lease_id)
            self._spawn(self._ledger.refund(reservation))
            raise
        return Ticket(lease_id, model, reservation, batch)

    async def after(
        self,
        ticket: Ticket,
        *,
        usage: dict[str, Any] | None,
        headers: Mapping[str, str] | None,
        retry_after_s: float | None,
    ) -> None:
        remaining = remaining_from_headers(headers)
        if usage is None:
            if ticket.lease_id is not None:
                self._limiter.release.remote(ticket.lease_id, None, remaining or None, retry_after_s, ticket.model)
            self._spawn(self._ledger.refund(ticket.reservation))
            return
        if ticket.lease_id is not None:
            counted = {
                # Anthropic's input limit counts cache writes, never cache reads.
                "input_tokens": (usage.get("input_tokens") or 0) + (usage.get("cache_creation_input_tokens") or 0),
                "output_tokens": usage.get("output_tokens") or 0,
            }
            self._limiter.release.remote(ticket.lease_id, counted, remaining or None, None, ticket.model)
        priced = self._prices.priced(ticket.model, Usage.from_api(usage), batch=ticket.batch)
        if ticket.reservation is None:
            # No budget to release: the usage goes to Redis with the task's next write (its
            # checkpoint or its record, see `unsettled`), in the same round trip.
            self._unsettled = priced if self._unsettled is None else self._unsettled + priced
            self._unsettled_calls += 1
            return
        # Off the call's path: a reservation already holds the worst case, so settling late
        # only lowers what is counted; if this process dies first, the reservation expires
        # into spending (never less than was used).
        self._spawn(self._ledger.settle(self._tenant, ticket.reservation, priced))

    def unsettled(self) -> Unsettled | None:
        """Takes the usage of this task's calls that no budget reserved and no write has
        recorded yet, as a write to send with the task's next one; None if there is none.
        Sent with a checkpoint, usage is counted once per run of the turns it produced: a run
        that resumes from the checkpoint makes (and counts) only the calls after it. If the
        write fails, give it back with `unsent`."""
        if self._unsettled is None:
            return None
        usage, calls = self._unsettled, self._unsettled_calls
        self._unsettled, self._unsettled_calls = None, 0
        return Unsettled(usage, calls, self._ledger.settle_write(self._tenant, None, usage, calls))

    def unsent(self, taken: Unsettled) -> None:
        """A write carrying `taken` failed: its usage goes with the next one."""
        self._unsettled = taken.usage if self._unsettled is None else self._unsettled + taken.usage
        self._unsettled_calls += taken.calls

    def abandon(self, ticket: Ticket) -> None:
        # The rate permit goes back at once. The budget reservation stays: the request may
        # already have been billed, so it turns into spending when it expires.
        if ticket.lease_id is not None:
            self._limiter.cancel.remote(ticket.lease_id)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        self._pending.spawn(coro)

    async def drain(self) -> None:
        """Waits for this task's budget writes, so its usage is recorded when its result is
        returned. A write that fails leaves its reservation to expire into spending."""
        await self._pending.wait()
