"""A tenant's events stream and audit trail: queued in order, sent in pipelined batches."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from agentpool.cluster.connection import MAX_PENDING_EVENTS, REDIS_DOWN, Posting, StoreBase
from agentpool.cluster.keys import Entry, stream_entries
from agentpool.events import AgentTag, Event
from agentpool.redact import redact_fields

#: One JSON line per structured event, when `PoolConfig.event_log` is on.
EVENT_LOG = logging.getLogger("agentpool.events")


def log_events_to_stderr() -> None:
    """The event log's lines go to the actor's stderr: Ray's worker log files (set up once,
    by the first event a process logs)."""
    if not EVENT_LOG.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        EVENT_LOG.addHandler(handler)
        EVENT_LOG.setLevel(logging.INFO)
        EVENT_LOG.propagate = False


class EventLog(StoreBase):
    async def emit(
        self, tenant: str, event: Event, *, task_id: str, trace_id: str, agent: AgentTag = (None, None)
    ) -> None:
        """Queues one structured event (see `post`)."""
        self.post(tenant, event, task_id=task_id, trace_id=trace_id, agent=agent)

    def post(self, tenant: str, event: Event, *, task_id: str, trace_id: str, agent: AgentTag = (None, None)) -> None:
        """Queues one structured event for the tenant's events stream.

        Events leave in pipelined batches, in order: those emitted in one turn of the event
        loop right after it (in a worker, within `LINGER_S`, 2 ms, of the first one queued,
        or sooner with a write a caller awaits, a task's final record say), and `flush`
        sends the rest at once (the worker calls it before returning a task's result,
        so a result's events are in Redis by then).
        While Redis is unreachable they wait here, up to `MAX_PENDING_EVENTS`, and the outbox
        retries them; beyond that the oldest are dropped and counted in `events_dropped`.
        `agent` is the task's agent and version tag (`AgentResult.agent`, `.agent_version`),
        written as the entry's `agent` and `agent_version` when it has one.
        """
        entry = self._entry(tenant, event, task_id=task_id, trace_id=trace_id, agent=agent)
        self._logged(tenant, entry)
        # The task's own stream too, for `pool.events` and SSE (when they are kept at all).
        task_stream = self.keys.task_events(tenant, task_id) if self._task_events_ttl else None
        stream, maxlen = self.keys.events(tenant), self._maxlen
        self._queue(Posting(stream, entry, maxlen, task_stream, self._task_events_maxlen, self._task_events_ttl))

    def _entry(
        self, tenant: str, event: Event, *, task_id: str, trace_id: str, agent: AgentTag = (None, None)
    ) -> dict[str, str]:
        """An event's entry in its tenant's stream, with the tenant's PII redaction applied."""
        fields = redact_fields(event.data(), self._pii(tenant))
        entry = {
            "event": event.TYPE.value,
            "task_id": task_id,
            "trace_id": trace_id,
            "ts": f"{time.time():.6f}",
            "data": json.dumps(fields, default=str, separators=(",", ":")),
        }
        if agent[0]:
            entry["agent"], entry["agent_version"] = agent[0], agent[1] or ""
        return entry

    async def task_events(self, tenant: str, task_id: str, *, after: str = "-", count: int = 10_000) -> list[Entry]:
        """The entries of the task's own events stream after id `after` (`-`: from its
        first), oldest first, at most `count`."""
        start = after if after == "-" else f"({after}"
        return stream_entries(await self.redis.xrange(self.keys.task_events(tenant, task_id), min=start, count=count))

    def _logged(self, tenant: str, entry: dict[str, str]) -> None:
        """The event log's line for an entry written to the stream (`PoolConfig.event_log`)."""
        if self._event_log:
            log_events_to_stderr()
            EVENT_LOG.info(json.dumps({"tenant": tenant, **entry, "data": json.loads(entry["data"])}, default=str))

    def audit(self, tenant: str, **fields: Any) -> None:
        """Appends one entry to the tenant's append-only audit trail (`...:audit` stream; see
        `PoolConfig.audit_maxlen`). The caller redacts secrets from what it passes; the
        tenant's PII redaction applies here."""
        fields = redact_fields(fields, self._pii(tenant))
        entry = {k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in fields.items()}
        entry["ts"] = f"{time.time():.6f}"
        self._queue(Posting(self.keys.audit(tenant), entry, self._audit_maxlen))

    def _queue(self, item: Posting) -> None:
        self._events.append(item)
        if len(self._events) > MAX_PENDING_EVENTS:
            del self._events[0]
            self.events_dropped += 1
        self._kick_flush(linger=self._linger_events)

    @property
    def pending_events(self) -> int:
        return len(self._events)

    async def flush(self) -> None:
        """Sends every queued event; leaves them queued (for the outbox to retry) if Redis fails."""
        try:
            await self._send_queued()
        except REDIS_DOWN as exc:
            self._down(exc)
            if self._drainer is None or self._drainer.done():
                self._drainer = self._spawn(self._drain())
