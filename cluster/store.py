"""The Redis result store the pool's actors use: the exactly-once final record, the
admission journal, runs (leases, checkpoints), and the events and audit streams.

`ResultStore` puts together the store's parts, one module per concern: `cluster.records`,
`cluster.journal`, `cluster.runs` and `cluster.event_log`, on the connection and outbox of
`cluster.connection`. `cluster.reader.ResultsReader` is the blocking side a user's process
reads results with.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

from agentpool.cluster.event_log import EventLog
from agentpool.cluster.journal import Journal
from agentpool.cluster.keys import Keys
from agentpool.cluster.live_config import LiveConfig
from agentpool.cluster.records import FinalRecords
from agentpool.cluster.responses import ResponseCache
from agentpool.cluster.runs import Runs, RunStart
from agentpool.cluster.sessions import SessionStore
from agentpool.cluster.spend import SpendLog
from agentpool.config import PoolConfig
from agentpool.models import TenantPolicy

__all__ = ["ResultStore", "RunStart"]


class ResultStore(FinalRecords, Journal, Runs, EventLog):
    """Async access to one pool's keys, for the scheduler and the workers."""

    @classmethod
    def for_pool(
        cls,
        url: str,
        config: PoolConfig,
        current: Callable[[], PoolConfig] | None = None,
        *,
        linger_events: bool = False,
    ) -> ResultStore:
        """The store as a pool's actors use it: layout, TTL, stream bounds and event log from
        `config`; the tenants' policies from `current()` when given (a process whose
        configuration changes live), else from `config`. `linger_events`: a worker's events
        wait up to `LINGER_S` for its next write (`StoreBase`)."""
        now = current or (lambda: config)

        def policy(tenant: str) -> TenantPolicy:
            live = now()
            return live.policy_for(tenant) or live.default_tenant_policy

        return cls(
            url,
            keys=Keys(config.key_prefix),
            pool=config.name,
            result_ttl_s=config.result_ttl_s,
            stream_maxlen=config.stream_maxlen,
            event_log=config.event_log,
            audit_maxlen=config.audit_maxlen,
            task_events_ttl_s=config.task_events_ttl_s,
            task_events_maxlen=config.task_events_maxlen,
            wait_replicas=config.redis_wait_replicas,
            wait_timeout_ms=config.redis_wait_timeout_ms,
            pii=lambda tenant: policy(tenant).guardrails.pii,
            session_ttl=lambda tenant: policy(tenant).sessions.ttl_s,
            linger_events=linger_events,
        )

    @property
    def live_config(self) -> LiveConfig:
        """The pool's live configuration (`pool.update_config`), on this store's connection."""
        return LiveConfig(lambda: self.redis, self.keys, self.pool)

    @property
    def responses(self) -> ResponseCache:
        """The response cache, its lookups and writes in this store's batches."""
        return ResponseCache(self._pipelined, self.keys, wall_clock=time.time)

    @property
    def spend(self) -> SpendLog:
        """Spend by lane and model per tenant and day, written in this store's batches."""
        return SpendLog(functools.partial(self._pipelined, linger=True), self.keys, wall_clock=time.time)

    @property
    def sessions(self) -> SessionStore:
        """Sessions' histories, exports and deletions, on this store's connection."""
        return SessionStore(lambda: self.redis, self.keys, pool=self.pool)
