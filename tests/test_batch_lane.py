"""The worker's batch lane against the simulator's Batches API (no Ray): calls grouped by
window and size, answers handed back by custom_id, a call out of time missed, and a batch
nobody waits for cancelled at the provider."""

from __future__ import annotations

import asyncio
import time

import anthropic
import pytest

from agentpool.actors.batch_lane import BatchLane, LaneMissed
from agentpool.lanes import BatchLaneConfig
from agentpool.simulator import SimulatorConfig, SimulatorServer


def lane(sim: SimulatorServer, **config: object) -> tuple[BatchLane, anthropic.AsyncAnthropic]:
    sdk = anthropic.AsyncAnthropic(api_key="k", base_url=sim.url, max_retries=0)
    settings = {"enabled": True, "window_s": 0.2, "poll_s": 0.05, **config}
    return BatchLane(lambda: sdk, BatchLaneConfig(**settings)), sdk  # type: ignore[arg-type]


def ask(text: str) -> dict[str, object]:
    return {"max_tokens": 50, "messages": [{"role": "user", "content": text}]}


async def test_calls_in_one_window_share_batches_of_at_most_max_requests(sim: SimulatorServer) -> None:
    sim.sim.configure(SimulatorConfig(batch_delay_ms=100))
    batches, _sdk = lane(sim, max_requests=4)
    far = time.monotonic() + 30
    answers = await asyncio.gather(
        *(batches.call(ask(f"sim: answer {i}"), "claude-haiku-4-5", give_up_at=far) for i in range(10))
    )
    assert [a["content"][0]["text"] for a in answers] == [str(i) for i in range(10)]
    assert batches.stats["batches"] == 3 and batches.stats["answered"] == 10  # 4 + 4 + 2
    await batches.close()


async def test_a_call_out_of_time_is_missed_and_its_lonely_batch_cancelled(sim: SimulatorServer) -> None:
    sim.sim.configure(SimulatorConfig(batch_delay_ms=60_000))
    batches, sdk = lane(sim)
    with pytest.raises(LaneMissed, match="time"):
        await batches.call(ask("slow"), "claude-haiku-4-5", give_up_at=time.monotonic() + 0.5)
    for _ in range(100):
        listed = [b async for b in sdk.messages.batches.list(limit=1)]
        if listed and listed[0].cancel_initiated_at is not None:
            break
        await asyncio.sleep(0.05)
    assert listed[0].cancel_initiated_at is not None
    assert batches.stats["missed"] == 1 and batches.stats["batches_cancelled"] == 1
    await batches.close()


async def test_an_errored_request_is_missed_for_the_real_time_lane(sim: SimulatorServer) -> None:
    sim.sim.configure(SimulatorConfig(batch_delay_ms=0))
    batches, _ = lane(sim)
    ok, bad = await asyncio.gather(
        batches.call(ask("sim: answer fine"), "m", give_up_at=time.monotonic() + 30),
        batches.call(ask("sim: fail 500 always"), "m", give_up_at=time.monotonic() + 30),
        return_exceptions=True,
    )
    assert isinstance(ok, dict) and isinstance(bad, LaneMissed) and "errored" in str(bad)
    await batches.close()
