"""Checkpoint formats across versions of agentpool (a rolling upgrade): a checkpoint in a
format this version reads is resumed from; any other (a newer format, a payload that does
not parse or validate) is discarded, the task runs again from its first turn, and its
record says why."""

from __future__ import annotations

import json

import pytest
import redis

from agentpool import AgentPool, AgentTask
from agentpool.actors.checkpoint import CHECKPOINT_FORMAT, READABLE_FORMATS, LoopState, load_checkpoint
from agentpool.cluster.keys import Keys
from agentpool.models import Usage
from tests.pools import small_config


def state(**fields: object) -> LoopState:
    return LoopState(messages=[{"role": "user", "content": "hi"}], **fields)  # type: ignore[arg-type]


def test_a_checkpoint_in_the_current_format_is_resumed_from() -> None:
    saved = state(iterations=2, usage=Usage(input_tokens=10))
    assert saved.version == CHECKPOINT_FORMAT and CHECKPOINT_FORMAT in READABLE_FORMATS
    loaded, why = load_checkpoint(saved.model_dump_json())
    assert why is None and loaded == saved
    assert load_checkpoint(None) == (None, None)  # no checkpoint: nothing to say


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("{not json", "the checkpoint is not JSON"),
        ("[1, 2]", "checkpoint format None is not one this version reads (1)"),
        (json.dumps({"messages": []}), "checkpoint format None is not one this version reads (1)"),
        (
            json.dumps({"version": 2, "messages": [], "turns": []}),
            "checkpoint format 2 is not one this version reads (1)",
        ),
        (json.dumps({"version": "1", "messages": []}), "checkpoint format '1' is not one this version reads (1)"),
        (
            json.dumps({"version": 1, "messages": "no"}),
            "checkpoint format 1 does not validate: messages: Input should be a valid list",
        ),
    ],
)
def test_any_other_checkpoint_is_discarded_saying_why(raw: str, why: str) -> None:
    assert load_checkpoint(raw) == (None, why)


@pytest.mark.usefixtures("ray_session")
def test_a_task_whose_checkpoint_a_newer_version_wrote_runs_from_its_start_and_says_so(
    redis_url: str, redis_client: redis.Redis
) -> None:
    cfg = small_config(redis_url, tag="ck")
    newer = {"version": CHECKPOINT_FORMAT + 1, "messages": [{"role": "user", "content": "?"}], "iterations": 7}
    stale = AgentTask(tenant="acme", prompt="sim: answer fresh start")
    fine = AgentTask(tenant="acme", prompt="sim: answer resumed")
    keys = Keys(cfg.key_prefix)
    redis_client.set(keys.checkpoint("acme", stale.task_id), json.dumps(newer))
    with AgentPool.start(cfg) as pool:
        (discarded,) = pool.run([stale])
        (plain,) = pool.run([fine])
    assert discarded.status == "succeeded" and discarded.answer == "fresh start"
    assert discarded.iterations == 1 and discarded.resumes == 0  # from its first turn, not the 7th
    assert discarded.checkpoint_discarded == "checkpoint format 2 is not one this version reads (1)"
    assert plain.checkpoint_discarded is None
    assert redis_client.get(keys.checkpoint("acme", stale.task_id)) is None  # gone with the record
