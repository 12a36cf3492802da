"""Rate permits: every LLM attempt holds a lease on the global buckets while it is in flight.

`PermitBroker` is the pure core (the caller passes `now`): per limit (a model, or a class of
models sharing limits) a fair queue of waiting requests, the model's buckets, each tenant's
own caps, and the table of leases granted. A lease is released on success (reconciled with
the response's usage), on failure or cancellation (refunded), and when its holder dies it
expires after `lease_ttl_s` and is dropped without refund, as the call may have reached
the provider. Nothing else can hold capacity, so the outstanding count always returns to
zero.

Order of service: within one limit, the head chosen by the fair queue waits until the
buckets cover it, and nothing overtakes it: a large request never starves behind a stream
of small ones (aiolimiter alone serves its waiters smallest-amount first). A tenant at its
own cap waits in its own queue without holding up anyone else.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from agentpool.scheduler.buckets import DIMENSIONS, BucketSet
from agentpool.scheduler.fair import FairQueue, token_cost

#: The output-token estimate needs this many responses of a model before replacing max_tokens.
_ESTIMATE_MIN_SAMPLES = 20


@dataclass(eq=False)
class PermitRequest:
    """One LLM attempt asking to be sent: its estimated input and its `max_tokens`."""

    lease_id: str
    tenant: str
    model: str
    input_tokens: int
    max_tokens: int
    holder: str = ""
    priority: str = "standard"


@dataclass
class Lease:
    lease_id: str
    tenant: str
    model: str
    holder: str
    limit_key: str
    reserved: dict[str, float]
    model_taken: dict[str, float]
    tenant_taken: dict[str, float]
    cost: float
    granted_at: float
    expires_at: float
    waited_s: float

    def as_dict(self) -> dict[str, object]:
        return {
            "lease_id": self.lease_id,
            "limit_key": self.limit_key,
            "reserved": self.reserved,
            "expires_at": self.expires_at,
            "waited_s": round(self.waited_s, 6),
        }


@dataclass
class _Waiting:
    request: PermitRequest
    amounts: dict[str, float]
    key: str
    since: float


@dataclass
class _OutputEstimate:
    """Running mean and spread of output tokens per response, for `output_reservation="estimate"`."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, value: float) -> None:
        self.n += 1
        delta = value - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (value - self.mean)

    def reserve(self, max_tokens: int) -> int:
        if self.n < _ESTIMATE_MIN_SAMPLES:
            return max_tokens
        spread = math.sqrt(self.m2 / (self.n - 1))
        return max(1, min(max_tokens, math.ceil(self.mean + 3 * spread)))


@dataclass
class BrokerStats:
    granted: int = 0
    released: int = 0
    refunded: int = 0
    expired: int = 0
    cancelled: int = 0
    paused: int = 0
    lowered: int = 0


class PermitBroker:
    """Grants leases on the global model buckets and the tenants' own caps, fairly."""

    def __init__(
        self,
        *,
        model_limits: Mapping[str, Mapping[str, int]],
        limit_key: Callable[[str], str | None],
        tenant_limits: Callable[[str], Mapping[str, int]],
        tenant_weight: Callable[[str], float],
        lease_ttl_s: float,
        now: float,
        full: bool = True,
        output_reservation: str = "max_tokens",
        margin_s: float = 0.0,
    ) -> None:
        self._limit_key = limit_key
        self._tenant_limits = tenant_limits
        self._weight = tenant_weight
        self._ttl = lease_ttl_s
        self._margin_s = margin_s
        self._full = full
        self._output_mode = output_reservation
        self.models: dict[str, BucketSet] = {
            key: BucketSet.from_limits(limits, now, full=full, margin_s=margin_s)
            for key, limits in model_limits.items()
        }
        self.tenants: dict[str, BucketSet | None] = {}
        self._queues: dict[str, FairQueue[_Waiting]] = {}
        self._waiting: dict[str, _Waiting] = {}
        self.leases: dict[str, Lease] = {}
        self._expiry: list[tuple[float, str]] = []
        self._estimates: dict[str, _OutputEstimate] = {}
        self._wake_s: float | None = None
        self.stats = BrokerStats()

    def retune(
        self,
        *,
        model_limits: Mapping[str, Mapping[str, int]],
        limit_key: Callable[[str], str | None],
        tenant_limits: Callable[[str], Mapping[str, int]],
        tenant_weight: Callable[[str], float],
        now: float,
    ) -> None:
        """New limits and tenant policies while leases and waiters stay: each model's and
        tenant's buckets keep their levels (`BucketSet.retune`); a model no longer limited
        keeps only its pause; new ones start as they would have."""
        self._limit_key, self._tenant_limits, self._weight = limit_key, tenant_limits, tenant_weight
        for key, limits in model_limits.items():
            if key in self.models:
                self.models[key].retune(limits, now, margin_s=self._margin_s)
            else:
                self.models[key] = BucketSet.from_limits(limits, now, full=self._full, margin_s=self._margin_s)
        for key in set(self.models) - set(model_limits):
            self.models[key].retune({}, now)
        for tenant, own in list(self.tenants.items()):
            limits = tenant_limits(tenant)
            if not limits:
                self.tenants[tenant] = None
            elif own is None:
                self.tenants[tenant] = BucketSet.from_limits(limits, now, full=self._full)
            else:
                own.retune(limits, now)

    def _tenant_weight(self, tenant: str) -> float:
        return self._weight(tenant)

    # --- queries -------------------------------------------------------------------------

    @property
    def outstanding(self) -> int:
        return len(self.leases)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def next_wake_s(self, now: float) -> float | None:
        """Seconds until a waiting request may fit or a lease expires; None when neither."""
        waits = [] if self._wake_s is None else [self._wake_s]
        while self._expiry and self._expiry[0][1] not in self.leases:
            heapq.heappop(self._expiry)
        if self._expiry:
            waits.append(max(0.0, self._expiry[0][0] - now))
        return min(waits) if waits else None

    # --- requests and grants ---------------------------------------------------------

    def request(self, req: PermitRequest, now: float) -> None:
        """Queues a request; `grant_ready` hands out what fits."""
        if req.lease_id in self._waiting or req.lease_id in self.leases:
            raise ValueError(f"lease {req.lease_id!r} is already known")
        key = self._limit_key(req.model) or req.model
        if key not in self.models:
            self.models[key] = BucketSet({})  # unlimited, but it can still be paused by a 429
        estimate = self._estimates.get(key)
        output = req.max_tokens
        if self._output_mode == "estimate" and estimate is not None:
            output = estimate.reserve(req.max_tokens)
        amounts = {"requests": 1.0, "input_tokens": float(req.input_tokens), "output_tokens": float(output)}
        waiting = _Waiting(req, amounts, key, now)
        self._waiting[req.lease_id] = waiting
        queue = self._queues.setdefault(key, FairQueue(self._tenant_weight))
        queue.push(req.tenant, req.priority, waiting)

    def grant_ready(self, now: float) -> list[Lease]:
        """Grants, in fair order, every waiting request that fits now."""
        granted: list[Lease] = []
        wake: float | None = None
        for key, queue in self._queues.items():
            buckets = self.models[key]
            while len(queue):
                head = queue.head(lambda tenant, w: self._tenant_wait(tenant, w.amounts, now) <= 0)
                if head is None:  # every backlogged tenant is at its own cap
                    own = min(self._tenant_wait(t, w.amounts, now) for t, w in queue.heads())
                    wake = own if wake is None else min(wake, own)
                    break
                tenant, waiting = head
                wait = buckets.wait_s(waiting.amounts, now)
                if wait > 0:
                    wake = wait if wake is None else min(wake, wait)
                    break
                queue.remove(tenant, waiting)
                granted.append(self._grant(waiting, buckets, now))
        self._wake_s = wake
        return granted

    def _grant(self, waiting: _Waiting, buckets: BucketSet, now: float) -> Lease:
        req = waiting.request
        del self._waiting[req.lease_id]
        model_taken = buckets.take(waiting.amounts, now)
        own = self._tenant_buckets(req.tenant, now)
        tenant_taken = own.take(waiting.amounts, now) if own is not None else {}
        cost = token_cost(waiting.amounts["input_tokens"], waiting.amounts["output_tokens"])
        self._queues[waiting.key].charge(req.tenant, cost)
        lease = Lease(
            lease_id=req.lease_id,
            tenant=req.tenant,
            model=req.model,
            holder=req.holder,
            limit_key=waiting.key,
            reserved=dict(waiting.amounts),
            model_taken=model_taken,
            tenant_taken=tenant_taken,
            cost=cost,
            granted_at=now,
            expires_at=now + self._ttl,
            waited_s=now - waiting.since,
        )
        self.leases[req.lease_id] = lease
        heapq.heappush(self._expiry, (lease.expires_at, lease.lease_id))
        self.stats.granted += 1
        return lease

    # --- endings -----------------------------------------------------------------------

    def release(
        self,
        lease_id: str,
        now: float,
        *,
        usage: Mapping[str, float] | None,
        remaining: Mapping[str, float] | None = None,
    ) -> Lease | None:
        """Ends a lease. With `usage` (input_tokens, which counts cache writes but not cache
        reads, and output_tokens) the reservation is reconciled to it; without, the call failed
        and everything is refunded. `remaining` (from `anthropic-ratelimit-*-remaining`) may
        lower the model's buckets, never raise them. Unknown or expired leases: None."""
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return None
        if usage is None:
            actual = dict.fromkeys(DIMENSIONS, 0.0)
            self.stats.refunded += 1
        else:
            actual = {"requests": 1.0, **{d: float(usage.get(d, 0.0)) for d in ("input_tokens", "output_tokens")}}
            self._estimates.setdefault(lease.limit_key, _OutputEstimate()).add(actual["output_tokens"])
            self.stats.released += 1
        self.models[lease.limit_key].settle(lease.model_taken, actual, now)
        own = self.tenants.get(lease.tenant)
        if own is not None:
            own.settle(lease.tenant_taken, actual, now)
        queue = self._queues.get(lease.limit_key)
        if queue is not None:
            queue.charge(lease.tenant, token_cost(actual["input_tokens"], actual["output_tokens"]) - lease.cost)
        if remaining:
            if self.models[lease.limit_key].lower_to(remaining, now):
                self.stats.lowered += 1
        return lease

    def cancel(self, lease_id: str, now: float) -> bool:
        """The caller gave up: drops its waiting request, or refunds its lease if granted."""
        waiting = self._waiting.pop(lease_id, None)
        if waiting is not None:
            self._queues[waiting.key].remove(waiting.request.tenant, waiting)
            self.stats.cancelled += 1
            return True
        return self.release(lease_id, now, usage=None) is not None

    def expire(self, now: float) -> list[Lease]:
        """Drops leases whose holder never released them, keeping their reservations spent."""
        expired: list[Lease] = []
        while self._expiry and self._expiry[0][0] <= now:
            _, lease_id = heapq.heappop(self._expiry)
            lease = self.leases.pop(lease_id, None)
            if lease is not None:
                expired.append(lease)
        self.stats.expired += len(expired)
        return expired

    def pause(self, model: str, until: float) -> None:
        """The provider said `retry-after`: nothing for this model's limit is granted before `until`."""
        key = self._limit_key(model) or model
        self.models.setdefault(key, BucketSet({})).pause(until)
        self.stats.paused += 1

    # --- tenants -------------------------------------------------------------------------

    def _tenant_buckets(self, tenant: str, now: float) -> BucketSet | None:
        if tenant not in self.tenants:
            limits = self._tenant_limits(tenant)
            self.tenants[tenant] = BucketSet.from_limits(limits, now, full=self._full) if limits else None
        return self.tenants[tenant]

    def _tenant_wait(self, tenant: str, amounts: Mapping[str, float], now: float) -> float:
        own = self._tenant_buckets(tenant, now)
        return 0.0 if own is None else own.wait_s(amounts, now)

    def waiting_by_key(self) -> dict[str, int]:
        """Requests waiting for a permit, per limit key (keys with none left out)."""
        counts: dict[str, int] = {}
        for waiting in self._waiting.values():
            counts[waiting.key] = counts.get(waiting.key, 0) + 1
        return counts

    def levels(self, now: float) -> dict[str, dict[str, float]]:
        """What each limit's buckets could grant now, per dimension: their level less the margin
        kept for the provider's lag (0 while the provider's pause lasts)."""
        out: dict[str, dict[str, float]] = {}
        for key, limit in self.models.items():
            paused = limit.paused_until > now
            out[key] = {dim: 0.0 if paused else b.level(now) - b.margin for dim, b in limit.buckets.items()}
        return out

    def snapshot(self, now: float) -> dict[str, object]:
        waiting_by_key = self.waiting_by_key()
        return {
            "models": {
                key: {**buckets.snapshot(now), "waiting": waiting_by_key.get(key, 0)}
                for key, buckets in self.models.items()
            },
            "tenants": {t: b.snapshot(now) for t, b in self.tenants.items() if b is not None},
            "outstanding": self.outstanding,
            "waiting": self.waiting,
            "stats": vars(self.stats).copy(),
        }
