"""The simulator's wire format, proven by the official SDK parsing it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import anthropic
import pytest

from agentpool.simulator import SimulatorConfig, SimulatorServer

CALC = {
    "name": "calculator",
    "description": "arithmetic",
    "input_schema": {"type": "object", "properties": {"expression": {"type": "string"}}},
}


def client(sim: SimulatorServer, key: str | None = "test-key") -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key=key, base_url=sim.url, max_retries=0)


async def test_text_answer_with_usage_and_ids(sim: SimulatorServer) -> None:
    msg = await client(sim).messages.create(
        model="claude-sonnet-4-5", max_tokens=100, messages=[{"role": "user", "content": "sim: answer hello there"}]
    )
    assert msg.content[0].type == "text" and msg.content[0].text == "hello there"
    assert msg.stop_reason == "end_turn" and msg.id.startswith("msg_")
    assert msg.usage.input_tokens > 0 and msg.usage.output_tokens > 0
    assert msg.usage.cache_read_input_tokens == 0 and msg.usage.cache_creation_input_tokens == 0


async def test_tool_use_then_answer_quotes_result_and_caches_prefix(sim: SimulatorServer) -> None:
    c = client(sim)
    tools = [{**CALC, "cache_control": {"type": "ephemeral"}}]
    first = await c.messages.create(
        model="m", max_tokens=100, tools=tools, messages=[{"role": "user", "content": "What is 6*7?"}]
    )
    assert first.stop_reason == "tool_use"
    call = first.content[0]
    assert call.type == "tool_use" and call.name == "calculator" and call.input == {"expression": "6*7"}
    assert first.usage.cache_creation_input_tokens > 0
    second = await c.messages.create(
        model="m",
        max_tokens=100,
        tools=tools,
        messages=[
            {"role": "user", "content": "What is 6*7?"},
            {"role": "assistant", "content": [call.model_dump(exclude_none=True)]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "42"}]},
        ],
    )
    assert second.stop_reason == "end_turn" and "42" in second.content[0].text
    assert second.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens


async def test_tool_directives_run_in_order(sim: SimulatorServer) -> None:
    prompt = 'sim: tool a {"x": 1}\nsim: tool b {"y": 2}\nsim: answer done'
    c = client(sim)
    messages: list[dict] = [{"role": "user", "content": prompt}]
    names = []
    for _ in range(3):
        msg = await c.messages.create(model="m", max_tokens=50, messages=messages)
        if msg.stop_reason != "tool_use":
            break
        block = msg.content[0]
        names.append((block.name, block.input))
        messages += [
            {"role": "assistant", "content": [block.model_dump(exclude_none=True)]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "ok"}]},
        ]
    assert names == [("a", {"x": 1}), ("b", {"y": 2})]
    assert msg.content[0].text == "done"


@pytest.mark.parametrize(
    ("status", "exc_type", "error_type"),
    [
        (400, anthropic.BadRequestError, "invalid_request_error"),
        (401, anthropic.AuthenticationError, "authentication_error"),
        (403, anthropic.PermissionDeniedError, "permission_error"),
        (404, anthropic.NotFoundError, "not_found_error"),
        (413, anthropic.APIStatusError, "request_too_large"),
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (529, anthropic.OverloadedError, "overloaded_error"),
    ],
)
async def test_each_error_status_has_anthropic_shape(
    sim: SimulatorServer, status: int, exc_type: type, error_type: str
) -> None:
    c = client(sim)
    with pytest.raises(exc_type) as info:
        await c.messages.create(model="m", max_tokens=10, messages=[{"role": "user", "content": f"sim: fail {status}"}])
    err = info.value
    assert err.status_code == status
    assert err.request_id and err.request_id.startswith("req_")
    assert err.body["error"]["type"] == error_type
    headers = err.response.headers
    if status in (429, 500, 529):
        assert int(headers["retry-after"]) >= 1
    if status in (400, 401, 403, 404, 413):
        assert headers["x-should-retry"] == "false"
    # "fail the first attempt": the same request now succeeds
    again = await c.messages.create(
        model="m", max_tokens=10, messages=[{"role": "user", "content": f"sim: fail {status}"}]
    )
    assert again.stop_reason == "end_turn"


def test_missing_api_key_is_401(sim: SimulatorServer) -> None:
    body = json.dumps({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    request = urllib.request.Request(
        f"{sim.url}/v1/messages", data=body.encode(), method="POST", headers={"content-type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request)
    assert info.value.code == 401
    assert json.loads(info.value.read())["error"]["type"] == "authentication_error"


async def test_invalid_request_is_400(sim: SimulatorServer) -> None:
    with pytest.raises(anthropic.BadRequestError, match="first message"):
        await client(sim).messages.create(model="m", max_tokens=10, messages=[{"role": "assistant", "content": "hi"}])


async def test_server_side_rpm_limit_answers_429_with_headers(sim: SimulatorServer) -> None:
    sim.sim.configure(SimulatorConfig(latency_ms=0, rpm=2, itpm=10_000, otpm=10_000))
    c = client(sim)
    for _ in range(2):
        ok = await c.messages.with_raw_response.create(
            model="m", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
        assert ok.headers["anthropic-ratelimit-requests-limit"] == "2"
        assert "anthropic-ratelimit-input-tokens-remaining" in ok.headers
    with pytest.raises(anthropic.RateLimitError) as info:
        await c.messages.create(model="m", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    headers = info.value.response.headers
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert 1 <= int(headers["retry-after"]) <= 30
    stats = sim.sim.stats_json()
    assert stats["rate_limited"] == 1 and stats["responses"]["200"] == 2


async def test_output_tokens_limit_counts_max_tokens_then_refunds(sim: SimulatorServer) -> None:
    sim.sim.configure(SimulatorConfig(latency_ms=0, otpm=1000))
    c = client(sim)
    # max_tokens 600 is reserved at the start; the short answer refunds most of it.
    for _ in range(3):
        await c.messages.create(model="m", max_tokens=600, messages=[{"role": "user", "content": "sim: answer ok"}])
    with pytest.raises(anthropic.RateLimitError):
        await c.messages.create(model="m", max_tokens=1000, messages=[{"role": "user", "content": "sim: answer ok"}])


async def test_max_tokens_truncates(sim: SimulatorServer) -> None:
    msg = await client(sim).messages.create(
        model="m", max_tokens=2, messages=[{"role": "user", "content": "sim: answer " + "word " * 50}]
    )
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 2


async def test_streaming_and_count_tokens(sim: SimulatorServer) -> None:
    c = client(sim)
    async with c.messages.stream(
        model="m", max_tokens=50, messages=[{"role": "user", "content": "sim: answer streamed"}]
    ) as stream:
        final = await stream.get_final_message()
    assert final.content[0].text == "streamed" and final.usage.output_tokens > 0
    count = await c.messages.count_tokens(model="m", messages=[{"role": "user", "content": "hello world!"}])
    assert count.input_tokens == 3


async def test_bad_directive_is_400(sim: SimulatorServer) -> None:
    with pytest.raises(anthropic.BadRequestError, match="not JSON"):
        await client(sim).messages.create(
            model="m", max_tokens=10, messages=[{"role": "user", "content": "sim: tool calc {oops"}]
        )


def test_fault_injection_is_seeded_and_counted() -> None:
    with SimulatorServer(SimulatorConfig(latency_ms=0, fault_rates={529: 1.0})) as server:
        c = anthropic.Anthropic(api_key="k", base_url=server.url, max_retries=0)
        with pytest.raises(anthropic.OverloadedError):
            c.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        assert server.sim.stats_json()["responses"] == {"529": 1}


async def test_an_orphaned_tool_result_or_an_unanswered_tool_use_is_refused(sim: SimulatorServer) -> None:
    """As the real API: a tool_result must answer a tool_use of the message just before it,
    and a tool_use must be answered by the message just after it."""
    orphan = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}]},
    ]
    with pytest.raises(anthropic.BadRequestError, match="tool_result"):
        await client(sim).messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=orphan)  # type: ignore[arg-type]
    unanswered = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_y", "name": "calculator", "input": {}}]},
        {"role": "user", "content": "never mind"},
    ]
    with pytest.raises(anthropic.BadRequestError, match="toolu_y"):
        await client(sim).messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=unanswered)  # type: ignore[arg-type]


async def test_a_cache_mark_on_a_message_caches_the_conversation_so_far(sim: SimulatorServer) -> None:
    """A longer conversation reads the prefix a shorter one cached (at a message boundary
    before its own mark), and writes the rest up to its mark."""
    said = [f"question {i} " * 50 if i % 2 == 0 else f"answer {i} " * 50 for i in range(5)]

    def marked(upto: int) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for i, text in enumerate(said[:upto]):
            block: dict[str, object] = {"type": "text", "text": text}
            if i == upto - 2:
                block["cache_control"] = {"type": "ephemeral"}
            out.append({"role": "user" if i % 2 == 0 else "assistant", "content": [block]})
        return out

    first = await client(sim).messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=marked(3))  # type: ignore[arg-type]
    assert first.usage.cache_read_input_tokens == 0 and first.usage.cache_creation_input_tokens > 0
    second = await client(sim).messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=marked(5))  # type: ignore[arg-type]
    assert second.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens
    assert second.usage.cache_creation_input_tokens > 0 and second.usage.input_tokens > 0
