"""The Redis key layout (a contract: see DESIGN.md). Braces are Redis Cluster hash tags, so
all of one tenant's keys share a slot and an ACL pattern `~agentpool:{acme}:*` covers them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from agentpool.models import PRIORITIES


@dataclass(frozen=True)
class Keys:
    prefix: str = "agentpool"

    def _tenant(self, tenant: str) -> str:
        return f"{self.prefix}:{{{tenant}}}"

    def result(self, tenant: str, task_id: str) -> str:
        return f"{self._tenant(tenant)}:result:{task_id}"

    def results(self, tenant: str) -> str:
        return f"{self._tenant(tenant)}:results"

    def events(self, tenant: str) -> str:
        return f"{self._tenant(tenant)}:events"

    def task_events(self, tenant: str, task_id: str) -> str:
        """Stream: one task's events (copies of its entries in `events`), kept for
        `PoolConfig.task_events_ttl_s` after the last; what `pool.events` and SSE follow."""
        return f"{self._tenant(tenant)}:events:{task_id}"

    def audit(self, tenant: str) -> str:
        """Stream: the append-only audit trail of the tenant's tool calls."""
        return f"{self._tenant(tenant)}:audit"

    def checkpoint(self, tenant: str, task_id: str) -> str:
        return f"{self._tenant(tenant)}:checkpoint:{task_id}"

    def admitted(self, tenant: str, pool: str) -> str:
        """Hash task_id -> admission: the tasks a pool accepted and has not finished yet."""
        return f"{self._tenant(tenant)}:admitted:{pool}"

    def admitted_pattern(self, pool: str) -> str:
        """A SCAN pattern matching every tenant's admissions hash of one pool."""
        return f"{self.prefix}:{{*}}:admitted:{pool}"

    def backlog(self, tenant: str, pool: str, priority: str) -> str:
        """Sorted set task_id -> arrival number: the order in which the tenant's accepted,
        unfinished tasks of one priority class are served (their bodies are in `admitted`)."""
        return f"{self._tenant(tenant)}:backlog:{pool}:{priority}"

    def backlogs(self, tenant: str, pool: str) -> list[str]:
        """The tenant's backlog sets, one per priority class, the most important first."""
        return [self.backlog(tenant, pool, p) for p in PRIORITIES]

    def backlog_pattern(self, pool: str) -> str:
        """A SCAN pattern matching every tenant's backlog sets of one pool."""
        return f"{self.prefix}:{{*}}:backlog:{pool}:*"

    def arrivals(self, tenant: str, pool: str) -> str:
        """Counter: the arrival number of the tenant's latest accepted task (orders the backlog)."""
        return f"{self._tenant(tenant)}:arrivals:{pool}"

    def lease(self, tenant: str, task_id: str) -> str:
        """Which run of a task holds it now (a worker refreshes it while it runs)."""
        return f"{self._tenant(tenant)}:lease:{task_id}"

    def cancel(self, tenant: str, task_id: str) -> str:
        """Set when a task is to be cancelled; a run starting or resuming later honours it."""
        return f"{self._tenant(tenant)}:cancel:{task_id}"

    def approvals(self, tenant: str) -> str:
        """Stream of the tenant's pending approval requests (an entry leaves once decided)."""
        return f"{self._tenant(tenant)}:approvals"

    def approval(self, tenant: str, task_id: str) -> str:
        """The decision on a paused task's pending tool calls."""
        return f"{self._tenant(tenant)}:approval:{task_id}"

    def task_keys(self, tenant: str, task_id: str) -> list[str]:
        """Keys that live only while a task runs and go when its final record is written."""
        return [
            self.checkpoint(tenant, task_id),
            self.lease(tenant, task_id),
            self.cancel(tenant, task_id),
            self.approval(tenant, task_id),
        ]

    def usage(self, tenant: str, day: str) -> str:
        return f"{self._tenant(tenant)}:usage:{day}"

    def response(self, tenant: str, digest: str) -> str:
        """A response kept in the tenant's response cache (`cluster.responses`), with its TTL."""
        return f"{self._tenant(tenant)}:resp:{digest}"

    def tool_call(self, tenant: str, task_id: str, tool_use_id: str) -> str:
        """A side-effecting tool call's record: started, then its outcome."""
        return f"{self._tenant(tenant)}:toolcall:{task_id}:{tool_use_id}"

    def api_keys(self) -> str:
        """Hash key_id -> JSON: every HTTP API key (tenant, salt, salted hash, when made)."""
        return f"{self.prefix}:apikeys"

    def tenant_api_keys(self, tenant: str) -> str:
        """Set: the ids of the tenant's API keys."""
        return f"{self._tenant(tenant)}:apikeys"

    def auth_failures(self, source: str) -> str:
        """Counter: failed authentications from one source address in the current window."""
        return f"{self.prefix}:authfail:{source}"

    def idempotency(self, tenant: str, digest: str) -> str:
        """An `Idempotency-Key`'s record (digest of the key): the request's fingerprint, and
        its response once there is one."""
        return f"{self._tenant(tenant)}:idem:{digest}"

    def batch(self, tenant: str, batch_id: str) -> str:
        """List: the task ids of one batch submitted over HTTP, in input order."""
        return f"{self._tenant(tenant)}:batch:{batch_id}"

    def webhooks(self, tenant: str) -> str:
        """Hash endpoint_id -> JSON: the tenant's webhook endpoints (URL, events, secret)."""
        return f"{self._tenant(tenant)}:webhooks"

    def webhook_tenants(self) -> str:
        """Set: the tenants with at least one webhook endpoint (whose results the deliverer reads)."""
        return f"{self.prefix}:webhook_tenants"

    def webhook_jobs(self, tenant: str) -> str:
        """Hash delivery_id -> JSON: the tenant's deliveries not yet done (message, attempts)."""
        return f"{self._tenant(tenant)}:whjobs"

    def webhook_due(self, tenant: str) -> str:
        """Sorted set delivery_id -> when its next attempt is due (unix seconds)."""
        return f"{self._tenant(tenant)}:whdue"

    def webhook_log(self, tenant: str, task_id: str) -> str:
        """List: every delivery attempt of a run's messages (JSON), oldest first."""
        return f"{self._tenant(tenant)}:whlog:{task_id}"

    def webhook_dead(self, tenant: str) -> str:
        """Stream: deliveries given up on (dead letters), with their last error."""
        return f"{self._tenant(tenant)}:whdead"

    def session(self, tenant: str, session_id: str) -> str:
        """Hash: a session's history (`messages`, JSON), `version` (one more per stored turn),
        `turns`, `compactions`, `updated`, `last_task`; it lives the tenant's session TTL."""
        return f"{self._tenant(tenant)}:session:{session_id}"

    def session_tasks(self, tenant: str, session_id: str) -> str:
        """Sorted set task_id -> when its record was written: the session's tasks (what a
        deletion removes with it)."""
        return f"{self._tenant(tenant)}:session:{session_id}:tasks"

    def sessions(self, tenant: str) -> str:
        """Sorted set session_id -> last use (unix seconds): the tenant's sessions."""
        return f"{self._tenant(tenant)}:sessions"

    # The agent registry, rollouts and eval reports: pool-wide, in one hash slot (`{agents}`).

    def agent_names(self) -> str:
        """Set: the names of the registered agents."""
        return f"{self.prefix}:{{agents}}:names"

    def agent_versions(self, name: str) -> str:
        """Hash sha256 -> `AgentVersion` JSON: an agent's versions, written once each."""
        return f"{self.prefix}:{{agents}}:{name}:versions"

    def agent_labels(self, name: str) -> str:
        """Hash label -> sha256: an agent's labels, each set once."""
        return f"{self.prefix}:{{agents}}:{name}:labels"

    def agent_current(self) -> str:
        """Hash name -> sha256: the version a task naming just the agent runs (no rollout)."""
        return f"{self.prefix}:{{agents}}:current"

    def rollouts(self, pool: str) -> str:
        """Hash agent -> `RolloutState` JSON: one pool's rollouts, live or ended."""
        return f"{self.prefix}:{{agents}}:rollouts:{pool}"

    def rollout_sides(self, pool: str) -> str:
        """Hash agent -> JSON of both sides' figures (`rollouts.Side`), for a restart."""
        return f"{self.prefix}:{{agents}}:rollout_sides:{pool}"

    def rollout_events(self, pool: str) -> str:
        """Stream: every transition of one pool's rollouts (`agent`, `phase`, `weight`, `reason`)."""
        return f"{self.prefix}:{{agents}}:rollout_events:{pool}"

    def live_config(self, pool: str) -> str:
        """Hash `version`, `fields`: a pool's live configuration (`pool.update_config`), which
        every process of the pool applies over the configuration it started with; `drain`
        while this start of the pool drains (`LiveConfig.save_drain`)."""
        return f"{self.prefix}:{{pools}}:config:{pool}"

    def eval_reports(self, suite: str) -> str:
        """Hash agent version tag -> `EvalReport` JSON: a suite's latest report per version."""
        return f"{self.prefix}:{{agents}}:eval:{suite}"

    def tool_cache(self, tenant: str, tool: str, digest: str) -> str:
        """A cacheable tool's result for one set of arguments."""
        return f"{self._tenant(tenant)}:toolcache:{tool}:{digest}"


#: A stream entry as read back: its id and its fields.
Entry = tuple[str, dict[str, str]]


def stream_entries(reply: object) -> list[Entry]:
    """redis-py's reply to XRANGE or XREVRANGE, typed as what a client with
    `decode_responses=True` gives (its stubs also allow bytes and None)."""
    return cast(list[Entry], reply or [])
