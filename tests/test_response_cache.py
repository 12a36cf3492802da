"""The response cache's rules (pure): the key a call is kept under, which calls may use the
cache and which responses may be kept."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from agentpool.response_cache import cache_key, cache_mode, keepable, may_use
from agentpool.vocabulary import CacheMode

scalars = st.one_of(st.integers(-5, 5), st.text(max_size=5), st.booleans(), st.none())
requests = st.dictionaries(
    st.sampled_from(["model", "max_tokens", "system", "messages", "tools", "temperature", "stop_sequences"]),
    st.one_of(scalars, st.lists(scalars, max_size=3)),
    min_size=1,
)
chains = st.lists(st.sampled_from(["claude-haiku-4-5", "claude-sonnet-4-5", "claude-opus-4-5"]), min_size=1, max_size=3)


@given(requests, chains, st.randoms())
def test_the_same_call_has_the_same_key_whatever_its_field_order(
    request: dict[str, Any], models: list[str], rnd: Any
) -> None:
    items = list(request.items())
    rnd.shuffle(items)
    assert cache_key(dict(items), models) == cache_key(request, models)


@given(requests, chains, st.sampled_from(["max_tokens", "system", "messages", "temperature"]), scalars)
def test_any_difference_in_the_call_or_its_chain_is_another_key(
    request: dict[str, Any], models: list[str], field: str, value: Any
) -> None:
    if request.get(field, object()) != value:
        assert cache_key({**request, field: value}, models) != cache_key(request, models)
    assert cache_key(request, [*models, "claude-3-haiku"]) != cache_key(request, models)


def test_only_a_tenant_or_task_that_opts_in_uses_the_cache() -> None:
    assert may_use(CacheMode.EXACT, {}) and not may_use(CacheMode.OFF, {})
    # A request naming a sampling temperature (not ours: the API takes none) is cached only at 0.
    assert may_use(CacheMode.EXACT, {"temperature": 0}) and not may_use(CacheMode.EXACT, {"temperature": 0.5})
    assert cache_mode(None, CacheMode.EXACT) is CacheMode.EXACT
    assert cache_mode(CacheMode.OFF, CacheMode.EXACT) is CacheMode.OFF


def test_only_complete_answers_are_kept() -> None:
    text = [{"type": "text", "text": "hi"}]
    assert keepable({"stop_reason": "end_turn", "content": text})
    assert keepable({"stop_reason": "tool_use", "content": [{"type": "tool_use"}]})
    assert not keepable({"stop_reason": "max_tokens", "content": text})  # truncated
    assert not keepable({"stop_reason": "refusal", "content": text})
    assert not keepable({"stop_reason": "end_turn", "content": []})


def test_a_call_s_key_is_stable_across_versions() -> None:
    """Entries one version of the pool keeps are found by the next (a rolling upgrade keeps
    its cache): the canonical form is pinned, values JSON cannot hold included (as `str`)."""
    request = {"max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    assert (
        cache_key(request, ["claude-haiku-4-5"]) == "93e4d0d2524c1c2e50bb0ae6bc78694855f09699d8f90e9163bda149aac439f5"
    )
    odd = {**request, "extra": b"x"}
    assert cache_key(odd, ["claude-haiku-4-5"]) == "408b3ba0dbd112b966a4516fb120fb0eb64e43af922e4ec75cb15e659d5d5042"
