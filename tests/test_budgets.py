"""Daily budgets against a real redis-server: atomic reservations under concurrency,
reconciliation, expiry of abandoned reservations, and state that outlives its client."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agentpool.budgets import Day, Hold, Limits
from agentpool.cluster.budgets import BudgetLedger, Reservation, seconds_to_reset, utc_day
from agentpool.cluster.keys import Keys
from agentpool.errors import BudgetExceeded
from agentpool.models import TenantPolicy, Usage

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


def test_the_redis_scripts_do_what_the_arithmetic_says(redis_url: str) -> None:
    """Random sequences of reservations, settlements, refunds and time passing, run through
    the ledger on a real redis-server and through `agentpool.budgets.Day`: every answer and
    every field of the day's hash agree."""

    class Machine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.loop = asyncio.new_event_loop()
            self.client = connect(redis_url)
            self.clock = Clock()
            self.prefix = f"t{uuid.uuid4().hex[:10]}"
            self.book = ledger(self.client, self.prefix, self.clock, ttl=30.0)
            self.policy = TenantPolicy(daily_token_budget=1000, daily_cost_budget_usd=2.5)
            self.limits = Limits(tokens=1000, cost_usd=2.5)
            self.day = Day()
            self.leases: list[str] = []  # every lease granted, held or not

        def run(self, coro: Any) -> Any:
            return self.loop.run_until_complete(coro)

        @rule(tokens=st.integers(0, 600), cents=st.integers(0, 150))
        def reserve(self, tokens: int, cents: int) -> None:
            lease = f"l{len(self.leases) + 1}"
            now = self.clock.now
            expected = self.day.reserve(self.limits, lease, tokens, cents / 100, now=now, expires_at=now + 30.0)
            try:
                self.run(self.book.reserve("acme", self.policy, lease, tokens, cents / 100))
            except BudgetExceeded as exc:
                assert expected is not None and exc.fields["reason"] == expected.value
            else:
                assert expected is None
                self.leases.append(lease)

        @precondition(lambda self: self.leases)
        @rule(data=st.data(), share=st.sampled_from([0.0, 0.5, 1.0]), refund=st.booleans())
        def settle(self, data: st.DataObject, share: float, refund: bool) -> None:
            lease = data.draw(st.sampled_from(self.leases))
            hold = self.day.holds.get(lease, Hold(200, 0.5, 0.0))
            usage = Usage(
                input_tokens=int(hold.tokens * share),
                output_tokens=int(hold.tokens * share / 2),
                cache_read_input_tokens=3,
                cache_creation_input_tokens=1,
                cost_usd=round(hold.cost_usd * share, 2),
            )
            reservation = Reservation(self.book._keys.usage("acme", utc_day(self.clock.now)), lease)
            if refund:
                self.day.settle(lease, None)
                self.run(self.book.refund(reservation))
            else:
                self.day.settle(lease, usage)
                self.run(self.book.settle("acme", reservation, usage))

        @rule(seconds=st.sampled_from([1.0, 10.0, 29.0, 30.0, 45.0]))
        def tick(self, seconds: float) -> None:
            self.clock.now += seconds

        @invariant()
        def the_hash_is_the_day(self) -> None:
            raw = self.run(self.client.hgetall(self.book._keys.usage("acme", utc_day(self.clock.now))))
            holds = {k.removeprefix("lease:"): v for k, v in raw.items() if k.startswith("lease:")}
            assert set(holds) == set(self.day.holds)
            counts = {k: float(v) for k, v in raw.items() if not k.startswith("lease:")}
            for name in (
                "tokens",
                "reserved_tokens",
                "input_tokens",
                "output_tokens",
                "cache_read_input_tokens",
                "cache_creation_input_tokens",
                "calls",
                "expired_reservations",
            ):
                assert counts.get(name, 0.0) == getattr(self.day, name), name
            for name in ("cost_usd", "reserved_cost_usd"):
                assert counts.get(name, 0.0) == pytest.approx(getattr(self.day, name), abs=1e-9), name

        def teardown(self) -> None:
            self.run(self.client.aclose())
            self.loop.close()

    Machine.TestCase.settings = settings(max_examples=30, stateful_step_count=30, deadline=None)
    Machine.TestCase().runTest()


def test_a_budget_reached_exactly_is_not_crossed_here_or_in_redis(redis_url: str) -> None:
    # 1.05 + 0.30 + 1.05 + 0.10 is 2.5000000000000004 in Python floats and 2.5 in Redis's
    # HINCRBYFLOAT: both must take the last reservation (a budget is crossed only by more
    # than a nano-dollar).
    async def scenario() -> None:
        client = connect(redis_url)
        book = ledger(client, f"t{uuid.uuid4().hex[:10]}", Clock())
        policy, day = TenantPolicy(daily_cost_budget_usd=2.5), Day()
        for i, cents in enumerate((105, 30, 105, 10)):
            await book.reserve("acme", policy, f"l{i}", 0, cents / 100)
            assert day.reserve(Limits(cost_usd=2.5), f"l{i}", 0, cents / 100, now=0.0, expires_at=60.0) is None
        with pytest.raises(BudgetExceeded):
            await book.reserve("acme", policy, "l9", 0, 0.01)
        await client.aclose()

    asyncio.run(scenario())
