"""Approval requests and decisions in Redis: a tenant's pending requests (a stream; an entry
leaves once decided) and each task's decision (one key, read by the run that resumes it)."""

from __future__ import annotations

import json
import time
from typing import Any

from agentpool.cluster.keys import stream_entries
from agentpool.cluster.store import ResultStore
from agentpool.protocol import ApprovalDecision, Paused

#: How many pending approval requests of a tenant are read when looking one up.
_MAX_PENDING = 10_000


class Approvals:
    """A tenant's pending approval requests (a stream; an entry leaves once decided) and
    the decisions (one key per task, read by the run that resumes it)."""

    def __init__(self, store: ResultStore, ttl_s: int) -> None:
        self._store = store
        self._ttl_s = ttl_s

    async def request(self, paused: Paused, trace_id: str) -> None:
        """Lists the request unless it already is (a task paused again after a restart). The
        arguments are stored as given (the caller redacts them), cut to 20,000 characters."""
        if await self._entries(paused.tenant, paused.task_id):
            return
        await self._store.redis.xadd(
            self._store.keys.approvals(paused.tenant),
            {
                "task_id": paused.task_id,
                "trace_id": trace_id,
                "tools": json.dumps(paused.tools),
                "arguments": json.dumps(paused.arguments, default=str)[:20_000],
                "tool_use_ids": json.dumps(paused.tool_use_ids),
                "requested_unix": repr(paused.requested_unix),
                "deadline_unix": repr(paused.deadline_unix),
            },
        )

    async def decide(self, tenant: str, task_id: str, decision: ApprovalDecision) -> None:
        """Records the decision, then takes the request off the pending list."""
        redis = self._store.redis
        await redis.set(self._store.keys.approval(tenant, task_id), decision.model_dump_json(), ex=self._ttl_s)
        entries = await self._entries(tenant, task_id)
        if entries:
            await redis.xdel(self._store.keys.approvals(tenant), *entries)

    async def pending(self, tenant: str) -> list[dict[str, Any]]:
        raw = stream_entries(await self._store.redis.xrange(self._store.keys.approvals(tenant), count=_MAX_PENDING))
        return [
            {
                "entry_id": entry_id,
                "task_id": fields["task_id"],
                "tools": json.loads(fields["tools"]),
                "arguments": _json_or_none(fields["arguments"]),
                "tool_use_ids": json.loads(fields["tool_use_ids"]),
                "requested_unix": float(fields["requested_unix"]),
                "deadline_unix": float(fields["deadline_unix"]),
                "expired": float(fields["deadline_unix"]) < time.time(),
            }
            for entry_id, fields in raw
        ]

    async def _entries(self, tenant: str, task_id: str) -> list[str]:
        raw = stream_entries(await self._store.redis.xrange(self._store.keys.approvals(tenant), count=_MAX_PENDING))
        return [entry_id for entry_id, fields in raw if fields.get("task_id") == task_id]


def _json_or_none(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:  # cut short: arguments are bounded in the stream
        return None
