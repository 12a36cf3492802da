"""The price table's worst case, which per-task dollar caps (`max_cost_usd`) rely on: no call
within a request's bounds costs more, on any model of its chain, cache pricing included;
and the pool's input estimate bounds what the simulator bills."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentpool.conversation import estimate_input_tokens
from agentpool.models import Usage
from agentpool.pricing import DEFAULT_PRICES, ModelPrice, PriceTable
from agentpool.simulator import SimulatorConfig
from agentpool.simulator.server import Simulator
from agentpool.spend import summarise

rates = st.floats(0, 100, allow_nan=False, allow_infinity=False)
prices = st.builds(ModelPrice, input=rates, output=rates, cache_write=st.none() | rates, cache_read=st.none() | rates)


@given(prices, st.integers(0, 200_000), st.integers(0, 64_000), st.data())
def test_no_call_within_its_bounds_costs_more_than_the_worst_case(
    price: ModelPrice, input_tokens: int, max_tokens: int, data: st.DataObject
) -> None:
    # Any split of the input between plain, cache-write and cache-read tokens, any output.
    written = data.draw(st.integers(0, input_tokens))
    read = data.draw(st.integers(0, input_tokens - written))
    usage = Usage(
        input_tokens=input_tokens - written - read,
        cache_creation_input_tokens=written,
        cache_read_input_tokens=read,
        output_tokens=data.draw(st.integers(0, max_tokens)),
    )
    assert price.cost_usd(usage) <= price.worst_cost_usd(input_tokens, max_tokens) + 1e-9


@given(st.lists(st.sampled_from([*DEFAULT_PRICES, "unknown-model"]), min_size=1, max_size=4), st.integers(0, 10**6))
def test_a_chain_s_worst_case_is_its_dearest_model_s(models: list[str], tokens: int) -> None:
    table = PriceTable()
    worst = table.worst_cost_usd(models, tokens, tokens)
    for model in models:
        usage = Usage(cache_creation_input_tokens=tokens, output_tokens=tokens)
        assert table.priced(model, usage).cost_usd <= worst + 1e-9
    assert worst == max((table.worst_cost_usd([m], tokens, tokens) for m in models), default=0.0)


texts = st.text(st.characters(codec="utf-8"), min_size=1, max_size=300)
blocks = st.one_of(
    texts,
    st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts}), min_size=1, max_size=3),
)


@given(
    st.lists(blocks, min_size=1, max_size=8),
    st.none() | texts,
    st.booleans(),
)
def test_the_input_estimate_bounds_what_the_simulator_bills(
    contents: list[object], system: str | None, marked: bool
) -> None:
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(contents)]
    if marked and isinstance(messages[-1]["content"], list):
        messages[-1]["content"][-1]["cache_control"] = {"type": "ephemeral"}
    request: dict[str, object] = {"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": messages}
    if system is not None:
        request["system"] = [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}]
    billed = Simulator(SimulatorConfig()).usage_for(request)
    assert sum(billed.values()) <= estimate_input_tokens(request, 3.0)


days_of_fields = st.dictionaries(
    st.sampled_from(["t1", "t2"]),
    st.dictionaries(
        st.sampled_from(["2026-12-01", "2026-12-02"]),
        st.fixed_dictionaries(
            {},
            optional={
                f"{kind}|{lane}|{model}": st.floats(0, 10)
                for kind in ("spend", "calls")
                for lane in ("realtime", "batch")
                for model in ("a", "b")
            },
        ),
    ),
)


@given(days_of_fields)
def test_the_cost_report_adds_up_whichever_way_it_is_cut(raw: dict[str, dict[str, dict[str, float]]]) -> None:
    # What a call would have cost at list price: the same in real time, twice on the batch lane.
    for days in raw.values():
        for fields in days.values():
            for name in [n for n in fields if n.startswith("spend|")]:
                fields["list" + name.removeprefix("spend")] = fields[name] * (2 if "|batch|" in name else 1)
    report = summarise(raw)
    for group in ("by_tenant", "by_model", "by_lane"):
        assert sum(r["spend_usd"] for r in report[group].values()) == pytest.approx(report["total_usd"], abs=1e-6)
    batch = report["by_lane"].get("batch", {"spend_usd": 0.0})["spend_usd"]
    assert report["saved"]["batch_lane_usd"] == pytest.approx(batch, abs=1e-6)
    assert report["cache"]["hit_rate"] is None


def test_the_cost_report_of_two_tenants_exactly() -> None:
    third = 1 / 3
    raw = {
        "acme": {
            "2026-12-01": {
                "tokens": 999.0,  # the budget's own fields are not spend
                "spend|batch|claude-sonnet-4-5": 0.25,
                "list|batch|claude-sonnet-4-5": 0.25 + third,
                "calls|batch|claude-sonnet-4-5": 1.0,
                "spend|realtime|claude-haiku-4-5": third,
                "list|realtime|claude-haiku-4-5": third,
                "calls|realtime|claude-haiku-4-5": 2.0,
                "cache_hits": 3.0,
                "cache_misses": 1.0,
                "cache_saved_usd": third,
                "cost_usd": 9.0,
                "spend|realtime": 5.0,  # malformed: no model
            },
            "2026-12-02": {"spend|realtime|claude-haiku-4-5": 1.0, "list|realtime|claude-haiku-4-5": 1.0},
        },
        "globex": {"2026-12-02": {"cache_misses": 2.0, "cache_saved_usd": 0.5}},
    }
    report = summarise(raw)
    haiku = {"spend_usd": round(third + 1, 10), "list_usd": round(third + 1, 10), "calls": 2}
    sonnet = {"spend_usd": 0.25, "list_usd": round(0.25 + third, 10), "calls": 1}
    assert report == {
        "total_usd": round(third + 1.25, 10),
        "list_usd": round(2 * third + 1.25, 10),
        "saved": {"batch_lane_usd": round(third, 10), "response_cache_usd": round(third + 0.5, 10)},
        "calls": 3,
        "cache": {"hits": 3, "misses": 3, "hit_rate": 0.5},
        "by_tenant": {
            "acme": {"spend_usd": round(third + 1.25, 10), "list_usd": round(2 * third + 1.25, 10), "calls": 3}
        },
        "by_model": {"claude-haiku-4-5": haiku, "claude-sonnet-4-5": sonnet},
        "by_lane": {"realtime": haiku, "batch": sonnet},
    }
    # The dearest first, whatever order the fields came in.
    assert list(report["by_model"]) == ["claude-haiku-4-5", "claude-sonnet-4-5"]
    assert list(report["by_lane"]) == ["realtime", "batch"]
    assert summarise({"t": {"d": {"cache_hits": 1.0, "cache_misses": 2.0}}})["cache"]["hit_rate"] == 0.3333
    assert summarise({})["cache"] == {"hits": 0, "misses": 0, "hit_rate": None}
