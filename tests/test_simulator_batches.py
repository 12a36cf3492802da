"""The simulator's Message Batches endpoints, proven by the official SDK: create, retrieve,
list, results as JSONL, cancel, expiry, per-request errors and delete."""

from __future__ import annotations

import asyncio
from typing import Any

import anthropic
import pytest

from agentpool.simulator import SimulatorConfig, SimulatorServer


def client(sim: SimulatorServer) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key="test-key", base_url=sim.url, max_retries=0)


def request(custom_id: str, prompt: str, model: str = "claude-haiku-4-5") -> dict[str, Any]:
    params = {"model": model, "max_tokens": 100, "messages": [{"role": "user", "content": prompt}]}
    return {"custom_id": custom_id, "params": params}


async def ended(c: anthropic.AsyncAnthropic, batch_id: str, timeout_s: float = 10) -> Any:
    for _ in range(int(timeout_s / 0.05)):
        batch = await c.messages.batches.retrieve(batch_id)
        if batch.processing_status == "ended":
            return batch
        await asyncio.sleep(0.05)
    raise AssertionError("the batch did not end")


async def test_a_batch_ends_with_each_request_answered_or_errored(sim: SimulatorServer) -> None:
    sim.sim.configure(SimulatorConfig(batch_delay_ms=200))
    c = client(sim)
    batch = await c.messages.batches.create(
        requests=[request("a", "sim: answer one"), request("b", "sim: fail 400 always"), request("c", "sim: answer 3")]
    )
    assert batch.processing_status == "in_progress" and batch.id.startswith("msgbatch_")
    assert batch.request_counts.processing == 3 and batch.results_url is None
    with pytest.raises(anthropic.AnthropicError, match="finished processing"):
        await c.messages.batches.results(batch.id)  # no results before the batch ends
    done = await ended(c, batch.id)
    assert done.request_counts.succeeded == 2 and done.request_counts.errored == 1
    assert done.request_counts.processing == 0 and done.ended_at is not None and done.results_url
    results = {r.custom_id: r.result async for r in await c.messages.batches.results(batch.id)}
    assert results["a"].type == "succeeded" and results["a"].message.content[0].text == "one"
    assert results["a"].message.usage.output_tokens > 0
    assert results["b"].type == "errored" and results["b"].error.error.type == "invalid_request_error"
    listed = [b.id async for b in c.messages.batches.list(limit=10)]
    assert batch.id in listed
    deleted = await c.messages.batches.delete(batch.id)
    assert deleted.type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        await c.messages.batches.retrieve(batch.id)


async def test_a_cancelled_batch_ends_with_its_unfinished_requests_canceled(sim: SimulatorServer) -> None:
    sim.sim.configure(SimulatorConfig(batch_delay_ms=60_000))
    c = client(sim)
    batch = await c.messages.batches.create(requests=[request("a", "x"), request("b", "y")])
    with pytest.raises(anthropic.BadRequestError):
        await c.messages.batches.delete(batch.id)  # not ended yet
    cancelled = await c.messages.batches.cancel(batch.id)
    assert cancelled.cancel_initiated_at is not None
    done = await ended(c, batch.id)
    assert done.request_counts.canceled == 2
    assert {r.result.type async for r in await c.messages.batches.results(batch.id)} == {"canceled"}


async def test_requests_not_done_by_the_expiry_expire(sim: SimulatorServer) -> None:
    sim.sim.configure(SimulatorConfig(batch_delay_ms=0, batch_expiry_s=0.5))
    c = client(sim)
    batch = await c.messages.batches.create(
        requests=[request("fast", "sim: answer f"), request("slow", "sim: delay 5000")]
    )
    done = await ended(c, batch.id)
    kinds = {r.custom_id: r.result.type async for r in await c.messages.batches.results(batch.id)}
    assert kinds == {"fast": "succeeded", "slow": "expired"}
    assert done.request_counts.expired == 1


@pytest.mark.parametrize(
    "requests",
    [
        [],
        [request("same", "x"), request("same", "y")],
        [{"custom_id": "bad id!", "params": {"model": "m", "max_tokens": 1, "messages": []}}],
        [{"custom_id": "a"}],
    ],
)
async def test_a_malformed_batch_is_refused_whole(sim: SimulatorServer, requests: list[Any]) -> None:
    with pytest.raises(anthropic.BadRequestError):
        await client(sim).messages.batches.create(requests=requests)
