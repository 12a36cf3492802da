"""The daily budgets' arithmetic (`agentpool/budgets.py`), pure: exact steps, and the
promise that calls settling within their reservations never take a day over its limits."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentpool.budgets import Day, Hold, Limits, admission_check
from agentpool.models import Usage
from agentpool.vocabulary import ErrorReason


def test_a_reservation_fits_up_to_the_limit_and_not_beyond() -> None:
    day = Day()
    limits = Limits(tokens=100, cost_usd=1.0)
    assert day.reserve(limits, "a", 60, 0.5, now=0.0, expires_at=10.0) is None
    assert day.reserve(limits, "b", 41, 0.1, now=0.0, expires_at=10.0) is ErrorReason.DAILY_TOKEN_BUDGET
    assert day.reserve(limits, "b", 40, 0.6, now=0.0, expires_at=10.0) is ErrorReason.DAILY_COST_BUDGET
    assert day.reserve(limits, "b", 40, 0.5, now=0.0, expires_at=10.0) is None
    assert (day.reserved_tokens, day.reserved_cost_usd) == (100, 1.0)
    assert day.holds == {"a": Hold(60, 0.5, 10.0), "b": Hold(40, 0.5, 10.0)}
    assert not Limits() and Limits(tokens=1) and Limits(cost_usd=0.5)
    assert Day().reserve(Limits(), "x", 10**9, 10.0**9, now=0.0, expires_at=1.0) is None


def test_settling_replaces_the_reservation_by_the_usage_and_a_refund_gives_it_back() -> None:
    day = Day()
    limits = Limits(tokens=1000)
    day.reserve(limits, "a", 500, 2.0, now=0.0, expires_at=10.0)
    day.reserve(limits, "b", 300, 1.0, now=0.0, expires_at=10.0)
    day.settle(
        "a",
        Usage(
            input_tokens=100, output_tokens=50, cache_read_input_tokens=7, cache_creation_input_tokens=3, cost_usd=0.25
        ),
    )
    day.settle("b", None)
    assert (day.tokens, day.cost_usd, day.reserved_tokens, day.reserved_cost_usd, day.calls) == (160, 0.25, 0, 0.0, 1)
    assert (day.input_tokens, day.output_tokens, day.cache_read_input_tokens, day.cache_creation_input_tokens) == (
        100,
        50,
        7,
        3,
    )
    day.settle(None, Usage(input_tokens=5, cost_usd=0.01))  # a call with nothing reserved (no budget then)
    assert (day.tokens, day.calls, day.holds) == (165, 2, {})


def test_a_dead_holder_s_reservation_is_swept_as_spent_only_when_room_is_needed() -> None:
    day = Day()
    limits = Limits(tokens=100)
    day.reserve(limits, "dead", 70, 0.7, now=0.0, expires_at=30.0)
    assert day.reserve(limits, "small", 20, 0.0, now=100.0, expires_at=130.0) is None
    assert "dead" in day.holds  # there was room: nothing swept
    assert (
        day.reserve(limits, "big", 20, 0.0, now=29.0, expires_at=59.0) is ErrorReason.DAILY_TOKEN_BUDGET
    )  # not expired yet
    assert (
        day.reserve(limits, "big", 20, 0.0, now=130.0, expires_at=160.0) is ErrorReason.DAILY_TOKEN_BUDGET
    )  # both swept: 90 spent
    assert (day.tokens, day.cost_usd, day.expired_reservations, day.holds) == (90, 0.7, 2, {})
    assert day.reserve(limits, "last", 10, 0.0, now=130.0, expires_at=160.0) is None
    day.settle("dead", Usage(input_tokens=70, cost_usd=0.7))  # its call reports after all: counted once
    assert (day.tokens, day.calls) == (90, 1)


def test_at_the_door_reservations_are_left_out_and_a_reached_cost_budget_is_spent() -> None:
    limits = Limits(tokens=100, cost_usd=1.0)
    assert admission_check({"tokens": 90, "cost_usd": 0.5}, limits, first_call_tokens=10) is None
    assert (
        admission_check({"tokens": 90, "cost_usd": 0.5}, limits, first_call_tokens=11) is ErrorReason.DAILY_TOKEN_BUDGET
    )
    assert admission_check({"tokens": 0, "cost_usd": 1.0}, limits) is ErrorReason.DAILY_COST_BUDGET
    assert admission_check({"tokens": 0, "cost_usd": 0.99}, limits) is None
    assert admission_check({}, Limits(tokens=0), first_call_tokens=1) is ErrorReason.DAILY_TOKEN_BUDGET
    assert admission_check({"tokens": 10**9, "cost_usd": 10.0**9}, Limits()) is None
    assert (
        ErrorReason.DAILY_TOKEN_BUDGET == "daily_token_budget" and ErrorReason.DAILY_COST_BUDGET == "daily_cost_budget"
    )


steps = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.integers(0, 400), st.integers(0, 300)),  # tokens, cost in cents
        st.tuples(st.just("settle"), st.integers(0, 50), st.floats(0, 1)),  # which hold, fraction used
        st.tuples(st.just("refund"), st.integers(0, 50), st.just(0.0)),
        st.tuples(st.just("tick"), st.integers(0, 40), st.just(0.0)),  # seconds
    ),
    max_size=80,
)


@given(steps, st.integers(1, 2000), st.integers(1, 1000))
def test_calls_within_their_reservations_never_take_a_day_over_its_limits(
    ops: list[tuple[str, int, float]], token_limit: int, cost_cents: int
) -> None:
    limits = Limits(tokens=token_limit, cost_usd=cost_cents / 100)
    day, now, n = Day(), 0.0, 0
    for op, a, b in ops:
        if op == "reserve":
            n += 1
            why = day.reserve(limits, f"l{n}", a, b / 100, now=now, expires_at=now + 30)
            if why is None:
                assert f"l{n}" in day.holds
            else:  # refused: nothing held, and it does not fit even after the sweep
                assert f"l{n}" not in day.holds
                assert not any(h.expires_at <= now for h in day.holds.values())
                tokens_over = day.tokens + day.reserved_tokens + a > token_limit
                assert why is (ErrorReason.DAILY_TOKEN_BUDGET if tokens_over else ErrorReason.DAILY_COST_BUDGET)
                assert tokens_over or day.cost_usd + day.reserved_cost_usd + b / 100 > limits.cost_usd
        elif op in ("settle", "refund") and day.holds:
            lease = sorted(day.holds)[a % len(day.holds)]
            hold = day.holds[lease]
            used = int(hold.tokens * b)
            day.settle(lease, None if op == "refund" else Usage(input_tokens=used, cost_usd=hold.cost_usd * b))
        elif op == "tick":
            now += a
        assert day.reserved_tokens == sum(h.tokens for h in day.holds.values())
        assert day.reserved_cost_usd == pytest.approx(sum(h.cost_usd for h in day.holds.values()), abs=1e-9)
        assert day.tokens + day.reserved_tokens <= token_limit
        assert day.cost_usd + day.reserved_cost_usd <= limits.cost_usd + 1e-9


def test_what_is_missing_from_the_day_counts_as_nothing() -> None:
    assert admission_check({"tokens": 100}, Limits(tokens=100)) is None  # no first call given: 0
    assert admission_check({}, Limits(tokens=10), first_call_tokens=10) is None
    assert admission_check({}, Limits(cost_usd=0.5)) is None


def test_usage_accumulates_field_by_field() -> None:
    day = Day()
    day.settle(
        None,
        Usage(input_tokens=1, output_tokens=2, cache_read_input_tokens=3, cache_creation_input_tokens=4, cost_usd=0.5),
    )
    day.settle(
        None,
        Usage(
            input_tokens=10, output_tokens=20, cache_read_input_tokens=30, cache_creation_input_tokens=40, cost_usd=0.25
        ),
    )
    assert (day.input_tokens, day.output_tokens, day.cache_read_input_tokens, day.cache_creation_input_tokens) == (
        11,
        22,
        33,
        44,
    )
    assert (day.tokens, day.cost_usd, day.calls) == (110, 0.75, 2)


def test_a_sweep_moves_only_the_expired_reservations() -> None:
    day = Day()
    limits = Limits(tokens=100, cost_usd=10.0)
    day.reserve(limits, "old", 10, 1.5, now=0.0, expires_at=5.0)
    day.reserve(limits, "new", 20, 2.0, now=4.0, expires_at=34.0)
    day.sweep(5.0)
    assert (day.reserved_tokens, day.reserved_cost_usd, day.tokens, day.cost_usd) == (20, 2.0, 10, 1.5)
    assert list(day.holds) == ["new"] and day.expired_reservations == 1
