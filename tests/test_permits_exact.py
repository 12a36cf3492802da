"""The permit broker (`scheduler/permits.py`) step by step, with exact expectations: what a
grant records, how releases, refunds, cancellations, expiries and pauses move the buckets,
the fair counters and the statistics, when the broker next needs waking, and what it reports.
The state machine in `test_admission_policies.py` holds the invariants; these the values."""

from __future__ import annotations

import math
import statistics

import pytest

from agentpool.scheduler.permits import Lease, PermitBroker, PermitRequest

LIMITS = {"sonnet": {"requests": 120, "input_tokens": 6000, "output_tokens": 3000}, "haiku": {"requests": 60}}
KEY = "sonnet"


def broker(now: float = 0.0, **kwargs: object) -> PermitBroker:
    defaults: dict[str, object] = {
        "model_limits": LIMITS,
        "limit_key": lambda model: model.split("-")[0] if model.split("-")[0] in LIMITS else None,
        "tenant_limits": lambda t: {"requests": 30} if t == "capped" else {},
        "tenant_weight": lambda t: 1.0,
        "lease_ttl_s": 50.0,
        "now": now,
    }
    return PermitBroker(**{**defaults, **kwargs})  # type: ignore[arg-type]


def ask(
    lease_id: str, tenant: str = "a", model: str = "sonnet-4", input_tokens: int = 10, max_tokens: int = 10
) -> PermitRequest:
    return PermitRequest(lease_id, tenant, model, input_tokens, max_tokens, holder=f"w-{lease_id}")


def levels(b: PermitBroker, key: str = KEY, at: float = 0.0) -> dict[str, float]:
    return {dim: bucket.level(at) for dim, bucket in b.models[key].buckets.items()}


def test_a_new_broker_has_nothing_to_wake_for() -> None:
    assert broker().next_wake_s(0.0) is None


def test_a_grant_records_who_what_and_how_long_it_waited() -> None:
    b = broker()
    b.request(ask("x", max_tokens=2000), 1.0)
    b.request(ask("y", max_tokens=2000), 1.5)
    (first,) = b.grant_ready(2.0)  # y must wait for the output tokens x reserved
    assert (first.lease_id, first.tenant, first.model, first.holder, first.limit_key) == (
        "x",
        "a",
        "sonnet-4",
        "w-x",
        "sonnet",
    )
    assert first.reserved == {"requests": 1.0, "input_tokens": 10.0, "output_tokens": 2000.0}
    assert (first.granted_at, first.expires_at, first.waited_s, first.cost) == (2.0, 52.0, 1.0, 4010.0)
    assert first.as_dict() == {
        "lease_id": "x",
        "limit_key": "sonnet",
        "reserved": {"requests": 1.0, "input_tokens": 10.0, "output_tokens": 2000.0},
        "expires_at": 52.0,
        "waited_s": 1.0,
    }
    assert b.next_wake_s(2.0) == pytest.approx(1000 / 50)  # 1,000 output tokens at 50 a second
    (second,) = b.grant_ready(22.0)
    assert second.lease_id == "y" and second.waited_s == 20.5
    assert b.stats.granted == 2


def test_a_lease_id_is_used_once() -> None:
    b = broker()
    b.request(ask("x"), 0.0)
    with pytest.raises(ValueError, match=r"^lease 'x' is already known$"):
        b.request(ask("x"), 0.0)
    b.grant_ready(0.0)
    with pytest.raises(ValueError, match=r"^lease 'x' is already known$"):
        b.request(ask("x"), 0.0)


def test_grants_charge_the_tenant_so_the_next_goes_to_another() -> None:
    b = broker()
    for lease_id, tenant in (("a1", "a"), ("a2", "a"), ("b1", "b")):
        b.request(ask(lease_id, tenant), 0.0)
    assert [lease.lease_id for lease in b.grant_ready(0.0)] == ["a1", "b1", "a2"]


def test_release_reconciles_buckets_tenant_caps_fair_counters_and_statistics() -> None:
    b = broker()
    b.request(ask("x", "capped", input_tokens=100, max_tokens=1000), 0.0)
    b.request(ask("y", "b", input_tokens=100, max_tokens=1000), 0.0)
    b.grant_ready(0.0)
    counters = b._queues[KEY].counters
    assert counters == {"capped": 2100.0, "b": 2100.0}
    b.release("x", 0.0, usage={"input_tokens": 40})  # no output reported: none used
    assert levels(b) == {"requests": 118.0, "input_tokens": 6000 - 40 - 100, "output_tokens": 3000 - 1000}
    assert counters["capped"] == 40.0  # corrected to what it used (nobody waits, so nothing floors it)
    capped = b.tenants["capped"]
    assert capped is not None and capped.buckets["requests"].level(0.0) == 29.0
    b.release("y", 0.0, usage=None)  # failed: everything back
    assert levels(b) == {"requests": 119.0, "input_tokens": 5960.0, "output_tokens": 3000.0}
    assert counters["b"] == 0.0  # nothing served
    assert (b.stats.released, b.stats.refunded, b.outstanding) == (1, 1, 0)
    b.request(ask("z", "capped"), 0.0)
    b.grant_ready(0.0)
    b.cancel("z", 0.0)  # a granted lease cancelled is refunded
    assert capped.buckets["requests"].level(0.0) == 29.0
    assert (b.stats.refunded, b.stats.cancelled) == (2, 0)


def test_the_provider_s_remaining_lowers_a_bucket_and_is_counted() -> None:
    b = broker()
    for lease_id in ("x", "y", "z"):
        b.request(ask(lease_id), 0.0)
    b.grant_ready(0.0)
    b.release("x", 0.0, usage={"input_tokens": 10, "output_tokens": 10}, remaining={"requests": 5})
    assert levels(b)["requests"] == 5.0 and b.stats.lowered == 1
    b.release("y", 0.0, usage={"input_tokens": 10, "output_tokens": 10}, remaining={"requests": 500})
    assert levels(b)["requests"] == 5.0 and b.stats.lowered == 1
    b.release("z", 0.0, usage={"input_tokens": 10, "output_tokens": 10}, remaining={"requests": 1})
    assert levels(b)["requests"] == 1.0 and b.stats.lowered == 2
    assert b.release("z", 0.0, usage=None) is None


def test_cancelling_a_waiting_request_and_expiring_lost_leases_are_counted() -> None:
    b = broker()
    b.request(ask("big", max_tokens=3000), 0.0)
    b.request(ask("w1", max_tokens=3000), 0.0)
    b.request(ask("w2", max_tokens=3000), 0.0)
    assert [lease.lease_id for lease in b.grant_ready(0.0)] == ["big"]
    assert b.waiting_by_key() == {"sonnet": 2}
    assert b.cancel("w1", 0.0) is True and b.cancel("w2", 0.0) is True and b.cancel("nope", 0.0) is False
    assert b.stats.cancelled == 2 and b.waiting == 0 and b.waiting_by_key() == {}
    assert b.expire(49.999) == []
    assert [lease.lease_id for lease in b.expire(50.0)] == ["big"]  # exactly at its expiry
    b.request(ask("again"), 50.0)
    b.grant_ready(50.0)
    b.expire(100.0)
    assert b.stats.expired == 2
    assert levels(b, at=100.0)["output_tokens"] == 3000.0  # refilled, the lost reservations stay spent meanwhile


def test_next_wake_covers_the_nearest_expiry_and_the_shortest_wait() -> None:
    b = broker()
    b.request(ask("x"), 0.0)
    b.grant_ready(0.0)
    assert b.next_wake_s(10.0) == 40.0  # the lease expires at 50
    assert b.next_wake_s(60.0) == 0.0  # overdue, not yet expired: wake now
    b.release("x", 60.0, usage=None)
    assert b.next_wake_s(60.0) is None  # released: its expiry no longer counts
    b.request(ask("s", max_tokens=3000), 60.0)
    b.request(ask("h", model="haiku-3", max_tokens=1), 60.0)
    b.grant_ready(60.0)
    b.request(ask("s2", max_tokens=3000), 60.0)  # sonnet: 60 s for the output tokens
    for i in range(60):
        b.request(ask(f"h{i}", model="haiku-3"), 60.0)
    b.grant_ready(60.0)  # haiku: 59 granted... one waits 1 s for a request
    assert b.waiting_by_key() == {"sonnet": 1, "haiku": 1}
    assert b.next_wake_s(60.0) == pytest.approx(1.0)


def test_tenants_at_their_caps_wake_the_broker_when_the_first_refills() -> None:
    b = broker(tenant_limits=lambda t: {"requests": 30} if t == "capped" else {"requests": 15})
    for i in range(30):
        b.request(ask(f"c{i}", "capped"), 0.0)
    for i in range(15):
        b.request(ask(f"s{i}", "slow"), 0.0)
    b.request(ask("h-capped", "capped", model="haiku-3"), 0.0)
    b.request(ask("h-slow", "slow", model="haiku-3"), 0.0)
    assert len(b.grant_ready(0.0)) == 45
    for i in range(30, 32):
        b.request(ask(f"c{i}", "capped"), 0.0)
    b.request(ask("s15", "slow"), 0.0)
    assert b.grant_ready(0.0) == []
    assert b.next_wake_s(0.0) == pytest.approx(2.0)  # capped refills 0.5/s, slow 0.25/s


def test_an_empty_broker_starts_its_buckets_empty_when_asked() -> None:
    b = broker(full=False, margin_s=2.0)
    assert levels(b) == {"requests": 0.0, "input_tokens": 0.0, "output_tokens": 0.0}
    assert b.models[KEY].buckets["requests"].margin == pytest.approx(4.0)
    b.request(ask("c", "capped"), 0.0)
    assert b.grant_ready(0.0) == []
    assert b.next_wake_s(0.0) == pytest.approx(2.0)  # the tenant's empty cap: 1 request at 0.5/s
    capped = b.tenants["capped"]
    assert capped is not None and capped.buckets["requests"].level(0.0) == 0.0


def test_a_pause_holds_a_model_never_seen_and_is_counted() -> None:
    b = broker()
    b.pause("opus-4", 5.0)
    b.pause("sonnet-4", 3.0)
    assert b.stats.paused == 2
    b.request(ask("o", model="opus-4"), 0.0)
    assert b.grant_ready(0.0) == [] and b.next_wake_s(0.0) == pytest.approx(5.0)
    assert [lease.lease_id for lease in b.grant_ready(5.0)] == ["o"]


def test_the_snapshot() -> None:
    b = broker()
    b.request(ask("x", "capped"), 0.0)
    b.grant_ready(0.0)
    b.request(ask("w", max_tokens=3000), 0.0)
    b.grant_ready(0.0)
    snap = b.snapshot(0.0)
    assert snap["outstanding"] == 1 and snap["waiting"] == 1
    assert snap["stats"] == {
        "granted": 1,
        "released": 0,
        "refunded": 0,
        "expired": 0,
        "cancelled": 0,
        "paused": 0,
        "lowered": 0,
    }
    models = snap["models"]
    assert isinstance(models, dict)
    assert models["sonnet"]["waiting"] == 1 and models["haiku"]["waiting"] == 0
    assert models["sonnet"]["dimensions"]["output_tokens"] == {"level": 2990.0, "capacity": 3000.0}
    capped = b.tenants["capped"]
    assert capped is not None and snap["tenants"] == {"capped": capped.snapshot(0.0)}
    assert set(snap["tenants"]) == {"capped"}  # tenants without caps are not listed


def _estimate_after(outputs: list[int], max_tokens: int = 1000) -> float:
    b = broker(output_reservation="estimate")
    for i, output in enumerate(outputs):  # a minute apart: the buckets refill in between
        b.request(ask(f"r{i}", max_tokens=max_tokens), 60.0 * i)
        (lease,) = b.grant_ready(60.0 * i)
        b.release(lease.lease_id, 60.0 * i, usage={"input_tokens": 1, "output_tokens": output})
    b.request(ask("next", max_tokens=max_tokens), 60.0 * len(outputs))
    (lease,) = b.grant_ready(60.0 * len(outputs))
    return lease.reserved["output_tokens"]


def test_the_output_estimate_is_the_mean_plus_three_sample_deviations_after_twenty_responses() -> None:
    outputs = [40, 60] * 10
    expected = math.ceil(statistics.mean(outputs) + 3 * statistics.stdev(outputs))
    assert expected == 81
    assert _estimate_after(outputs) == expected
    assert _estimate_after(outputs[:19]) == 1000  # nineteen are not enough: max_tokens
    skewed = [10] * 15 + [300, 5, 80, 120, 7, 64]
    assert _estimate_after(skewed) == math.ceil(statistics.mean(skewed) + 3 * statistics.stdev(skewed))
    assert _estimate_after([0] * 20) == 1  # never below one token
    assert _estimate_after([900, 10] * 10) == 1000  # never above max_tokens
    assert _estimate_after(outputs, max_tokens=70) == 70


def test_the_default_reservation_is_max_tokens_whatever_was_seen() -> None:
    b = broker()
    for i in range(25):
        b.request(ask(f"r{i}", max_tokens=500), float(i))
        (lease,) = b.grant_ready(float(i))
        b.release(lease.lease_id, float(i), usage={"input_tokens": 1, "output_tokens": 3})
    b.request(ask("next", max_tokens=500), 100.0)
    (lease,) = b.grant_ready(100.0)
    assert isinstance(lease, Lease) and lease.reserved["output_tokens"] == 500.0


def test_the_earliest_wake_over_every_limit_key_and_capped_tenant() -> None:
    b = broker()
    b.request(ask("h0", model="haiku-3"), 0.0)  # haiku's queue comes first, sonnet's second
    b.request(ask("s0", max_tokens=3000), 0.0)
    b.request(ask("s1", max_tokens=3000), 0.0)  # 60 s for sonnet's output tokens
    for i in range(60):
        b.request(ask(f"h{i + 1}", model="haiku-3"), 0.0)  # the 61st waits 1 s for a request
    b.grant_ready(0.0)
    assert b.waiting_by_key() == {"haiku": 1, "sonnet": 1}
    assert b.next_wake_s(0.0) == pytest.approx(1.0)  # haiku (first key) is the nearest, not sonnet (last)
    capped = broker(tenant_limits=lambda t: {"requests": 60} if t == "fast" else {"requests": 30})
    for i in range(60):
        capped.request(ask(f"f{i}", "fast", model="haiku-3"), 0.0)
    for i in range(30):
        capped.request(ask(f"c{i}", "slow"), 0.0)
    capped.grant_ready(0.0)
    capped.request(ask("f-next", "fast", model="haiku-3"), 0.0)  # fast refills 1/s: 1 s
    capped.request(ask("c-next", "slow"), 0.0)  # slow refills 0.5/s: 2 s
    assert capped.grant_ready(0.0) == []
    assert capped.next_wake_s(0.0) == pytest.approx(1.0)


def test_a_tenant_is_not_served_before_its_own_cap_allows() -> None:
    b = broker()
    for i in range(30):
        b.request(ask(f"c{i}", "capped"), 0.0)
    assert len(b.grant_ready(0.0)) == 30
    b.request(ask("soon", "capped"), 1.5)  # 0.75 of a request refilled: half a second to go
    assert b.grant_ready(1.5) == []
    assert b.next_wake_s(1.5) == pytest.approx(0.5)
    assert [lease.lease_id for lease in b.grant_ready(2.0)] == ["soon"]


def test_releases_are_counted_and_waits_reported_to_the_microsecond() -> None:
    b = broker()
    b.request(ask("x"), 0.0)
    b.request(ask("y"), 0.0)
    leases = b.grant_ready(0.12345678)
    assert leases[0].as_dict()["waited_s"] == 0.123457
    for lease in leases:
        b.release(lease.lease_id, 1.0, usage={"input_tokens": 1, "output_tokens": 1})
    assert b.stats.released == 2
