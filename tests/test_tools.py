"""Tool registration, schemas, validation, the built-ins and the tool runner."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentpool.actors.tool_runtime import ToolRunner
from agentpool.builtin_tools import evaluate, search
from agentpool.errors import ConfigError
from agentpool.protocol import ToolCall
from agentpool.tools import load_tools, tool

TOOLS = load_tools(["agentpool.builtin_tools", "tests.toolkit"])


def call(name: str, **args: object) -> ToolCall:
    return ToolCall(task_id="t", tenant="acme", tool_use_id="u1", name=name, arguments=args)


def test_schema_and_description_come_from_the_function() -> None:
    d = TOOLS["web_search"].definition()
    assert d["description"].startswith("Searches a small offline encyclopedia")
    props = d["input_schema"]["properties"]
    assert props["query"]["type"] == "string" and props["query"]["description"] == "What to look for, in a few words."
    assert props["max_results"]["default"] == 3
    assert d["input_schema"]["required"] == ["query"]
    assert TOOLS["shout"].is_async and not TOOLS["calculator"].is_async


def test_bad_tool_definitions_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="type hint"):

        @tool
        def untyped(x):  # type: ignore[no-untyped-def]
            return x

    with pytest.raises(ConfigError, match="must match"):

        @tool(name="has space")
        def named(x: int) -> int:
            return x

    with pytest.raises(ConfigError, match="cannot import"):
        load_tools(["no.such.module"])


@given(a=st.integers(-(10**6), 10**6), b=st.integers(-(10**6), 10**6), c=st.integers(1, 1000))
def test_calculator_matches_integer_arithmetic(a: int, b: int, c: int) -> None:
    assert evaluate(f"({a})*({b})+({a})//{c}-{b}%{c}") == a * b + a // c - b % c


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('true')",
        "(1).__class__",
        "open('x')",
        "a",
        "2**99999999",
        "10**300*10**300",
        "1/0",
        "lambda: 1",
        "[1,2]",
        "x" * 600,
        "sqrt(-1)",
    ],
)
def test_calculator_refuses_everything_else(expr: str) -> None:
    with pytest.raises(ValueError):
        evaluate(expr)


def test_calculator_and_search_answers() -> None:
    assert TOOLS["calculator"].fn("1234*5678") == "7006652"
    assert TOOLS["calculator"].fn("2^10") == "1024"
    assert search("capital of France")[0][0] == "Paris"
    assert TOOLS["web_search"].fn("qwxyz") == "No results."


async def test_runner_turns_every_failure_into_an_error_outcome() -> None:
    runner = ToolRunner(TOOLS, output_max_chars=500)
    ok = await runner.execute(call("calculator", expression="6*7"))
    assert (ok.content, ok.is_error, ok.error_kind) == ("42", False, None)
    cases = {
        "unknown_tool": call("nope"),
        "invalid_arguments": call("calculator", expression=5),
        "error": call("explode", message="kaput"),
    }
    for kind, c in cases.items():
        out = await runner.execute(c)
        assert out.is_error and out.error_kind == kind, (kind, out)
        assert out.as_block()["is_error"] is True
    assert "kaput" in (await runner.execute(call("explode", message="kaput"))).content
    big = await runner.execute(call("huge", size=10_000))
    assert len(big.content) < 600 and "truncated 9500" in big.content


@pytest.mark.parametrize("name", ["stall_async", "stall_sync"])
async def test_timeouts_hold_for_sync_and_async_tools(name: str) -> None:
    runner = ToolRunner(TOOLS)
    started = time.monotonic()
    out = await runner.execute(call(name))
    assert out.error_kind == "timeout" and "timed out after 0.2s" in out.content
    assert time.monotonic() - started < 0.9  # returned at its timeout, not when the tool woke


_arrived: dict[str, int] = {}
_met: dict[str, asyncio.Event] = {}


@tool(timeout_s=10)
async def rendezvous(group: str, size: int) -> int:
    """Waits until `size` calls of `group` have started (5 s at most); returns how many had.

    Args:
        group: Calls that meet.
        size: How many must meet.
    """
    _arrived[group] = _arrived.get(group, 0) + 1
    met = _met.setdefault(group, asyncio.Event())
    if _arrived[group] >= size:
        met.set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(met.wait(), 5)
    return _arrived[group]


async def test_runner_runs_calls_concurrently() -> None:
    """Fifty calls all meet inside the tool: a runner that ran them one by one would return
    1, 2, ... after five seconds each, not fifty fifty times."""
    runner = ToolRunner({**TOOLS, "rendezvous": rendezvous.__agentpool_tool__})  # type: ignore[attr-defined]
    outs = await asyncio.gather(*(runner.execute(call("rendezvous", group="g", size=50)) for _ in range(50)))
    assert [o.content for o in outs] == ["50"] * 50
    outs = await asyncio.gather(*(runner.execute(call("shout", text=str(i))) for i in range(50)))
    assert [o.content for o in outs] == [str(i).upper() for i in range(50)]
