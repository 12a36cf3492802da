"""Daily budgets against a real redis-server: atomic reservations under concurrency,
reconciliation, expiry of abandoned reservations, and state that outlives its client."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentpool.errors import BudgetExceeded
from agentpool.models import TenantPolicy, Usage
from cluster.keys import Keys
from scheduler.budgets import BudgetLedger, seconds_to_reset, utc_day

NOON = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.UTC).timestamp()


class Clock:
    def __init__(self, now: float = NOON) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def connect(url: str) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(url, decode_responses=True, max_connections=32)
    return aioredis.Redis(connection_pool=pool)


def ledger(client: aioredis.Redis, prefix: str, clock: Clock, ttl: float = 60.0) -> BudgetLedger:
    return BudgetLedger(lambda: client, Keys(prefix), reservation_ttl_s=ttl, wall_clock=clock)


def used(tokens: int, cost: float = 0.0) -> Usage:
    return Usage(input_tokens=tokens, cost_usd=cost)


async def test_concurrent_reservations_cannot_overspend(redis_url: str, key_prefix: str) -> None:
    client = connect(redis_url)
    book = ledger(client, key_prefix, Clock())
    policy = TenantPolicy(daily_token_budget=5000)

    async def one(i: int) -> bool:
        try:
            await book.reserve("acme", policy, f"l{i}", 100, 0.0)
        except BudgetExceeded as exc:
            assert exc.fields["reason"] == "daily_token_budget"
            assert exc.fields["retry_after_s"] == pytest.approx(12 * 3600)
            assert exc.fields["resets_at"].startswith("2026-11-22T00:00:00")
            return False
        return True

    outcomes = await asyncio.gather(*(one(i) for i in range(200)))
    assert sum(outcomes) == 50
    spent = await book.spent("acme")
    assert spent["reserved_tokens"] == 5000 and spent.get("tokens", 0) == 0
    await client.aclose()


async def test_settle_replaces_the_reservation_and_state_survives_a_new_client(redis_url: str, key_prefix: str) -> None:
    clock = Clock()
    client = connect(redis_url)
    book = ledger(client, key_prefix, clock)
    policy = TenantPolicy(daily_token_budget=1000, daily_cost_budget_usd=1.0)
    first = await book.reserve("acme", policy, "a", 900, 0.5)
    with pytest.raises(BudgetExceeded):
        await book.reserve("acme", policy, "b", 200, 0.1)
    await book.settle("acme", first, used(300, 0.2))
    second = await book.reserve("acme", policy, "b", 600, 0.1)  # fits now: 300 spent
    await book.refund(second)
    assert await book.check("acme", policy) is None
    await client.aclose()

    # A "restarted scheduler": a new client and ledger see the same day.
    client = connect(redis_url)
    book = ledger(client, key_prefix, clock)
    spent = await book.spent("acme")
    assert spent["tokens"] == 300 and spent["reserved_tokens"] == 0 and spent["cost_usd"] == pytest.approx(0.2)
    await book.settle("acme", None, used(800, 0.9))  # usage without a reservation still counts
    rejection = await book.check("acme", policy)
    assert rejection is not None and rejection.fields["reason"] == "daily_token_budget"
    assert await book.check("acme", TenantPolicy(daily_cost_budget_usd=1.0)) is not None
    assert await book.check("other", policy) is None
    clock.now += 13 * 3600  # the next UTC day starts afresh
    assert await book.check("acme", policy) is None
    await client.aclose()


async def test_an_abandoned_reservation_expires_into_spending(redis_url: str, key_prefix: str) -> None:
    clock = Clock()
    client = connect(redis_url)
    book = ledger(client, key_prefix, clock, ttl=60)
    policy = TenantPolicy(daily_token_budget=1000)
    await book.reserve("acme", policy, "dead-worker", 700, 0.0)
    with pytest.raises(BudgetExceeded):
        await book.reserve("acme", policy, "x", 400, 0.0)
    clock.now += 61
    with pytest.raises(BudgetExceeded):  # swept, but counted as spent: 700 + 400 > 1000
        await book.reserve("acme", policy, "x", 400, 0.0)
    spent = await book.spent("acme")
    assert spent["tokens"] == 700 and spent["reserved_tokens"] == 0 and spent["expired_reservations"] == 1
    await book.reserve("acme", policy, "y", 300, 0.0)
    await client.aclose()


def test_day_boundaries() -> None:
    assert utc_day(NOON) == "2026-11-21"
    assert seconds_to_reset(NOON) == pytest.approx(12 * 3600)
    assert seconds_to_reset(NOON + 12 * 3600 - 1) == pytest.approx(1)


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.integers(1, 400)),
        st.tuples(st.just("settle"), st.floats(0, 1)),
        st.tuples(st.just("refund"), st.just(0)),
        st.tuples(st.just("advance"), st.integers(1, 90)),
    ),
    max_size=30,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_reservations_never_let_spending_pass_the_budget(redis_url: str, ops: list[tuple[str, float]]) -> None:
    """Any sequence of reservations, settlements (actual <= reserved), refunds and expiries:
    spent + reserved never exceeds the budget, and reserved always equals what is held."""

    async def scenario() -> None:
        client = connect(redis_url)
        clock = Clock()
        book = ledger(client, f"p{uuid.uuid4().hex[:8]}", clock, ttl=60)
        policy = TenantPolicy(daily_token_budget=1000)
        held: list[tuple[object, int, float]] = []  # reservation, tokens, reserved at
        for n, (op, value) in enumerate(ops):
            if op == "reserve":
                try:
                    held.append((await book.reserve("acme", policy, f"l{n}", int(value), 0.0), int(value), clock.now))
                except BudgetExceeded:
                    pass
            elif op == "settle" and held:
                reservation, tokens, _ = held.pop(0)
                await book.settle("acme", reservation, used(int(tokens * value)))  # type: ignore[arg-type]
            elif op == "refund" and held:
                await book.refund(held.pop()[0])  # type: ignore[arg-type]
            elif op == "advance":
                clock.now += value
            spent = await book.spent("acme")
            assert spent.get("tokens", 0) + spent.get("reserved_tokens", 0) <= 1000
            live = sum(t for _, t, at in held if at + 60 > clock.now)
            assert spent.get("reserved_tokens", 0) >= live  # expired ones are swept lazily
        await client.aclose()

    asyncio.run(scenario())
