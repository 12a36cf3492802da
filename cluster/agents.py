"""The agent registry, the pool's rollouts and the eval reports in Redis (async; the keys
are in `Keys`, under the `{agents}` hash tag).

A version is written once (`HSETNX`), and a label names one version for ever; the current
version of a name moves only by `set_current` (by hand, or a rollout's promotion).
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from agentpool.agents import AgentCatalog, AgentSpec, AgentVersion
from agentpool.cluster.keys import Keys, stream_entries
from agentpool.errors import AgentConflict
from agentpool.evals import EvalReport
from agentpool.rollouts import RolloutState, Side, Transition

#: Versions one agent may have, and transitions kept in a pool's rollout stream.
MAX_VERSIONS = 1000
ROLLOUT_EVENTS_MAXLEN = 10_000


class AgentRegistry:
    """Registers, reads and moves agents' versions; keeps rollouts and eval reports."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    async def register(
        self, name: str, spec: AgentSpec, *, label: str | None = None, current: bool = False
    ) -> tuple[AgentVersion, bool]:
        """Registers a spec under `name`: (its version, whether it is new). The same spec
        again is the same version. Without a label, a new version is labelled `v<n>` (n:
        its number among the agent's versions). The agent's first version is its current
        one; a later one only with `current`.

        Raises:
            AgentConflict: If the label names another version already, or the version has
                another label, or the agent has `MAX_VERSIONS` versions.
        """
        sha = spec.digest()
        versions, labels = self._keys.agent_versions(name), self._keys.agent_labels(name)
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(versions, labels)
                    known = await pipe.hget(versions, sha)
                    if known is not None:
                        version = AgentVersion.model_validate_json(known)
                        if label is not None and label != version.label:
                            raise AgentConflict(
                                f"this spec is registered already as {version.ref}; a version keeps its label",
                                agent=name,
                            )
                        pipe.multi()
                        if current:
                            pipe.hset(self._keys.agent_current(), name, sha)
                        await pipe.execute()
                        return version, False
                    count = await pipe.hlen(versions)
                    if count >= MAX_VERSIONS:
                        raise AgentConflict(f"agent {name!r} has {count} versions; at most {MAX_VERSIONS}", agent=name)
                    taken = await pipe.hgetall(labels)
                    if label in taken:
                        raise AgentConflict(f"{name}@{label} names another version already", agent=name)
                    n = count + 1
                    while f"v{n}" in taken:
                        n += 1
                    given = label or f"v{n}"  # (not `label`: a retry after WatchError picks again)
                    created = round(time.time(), 3)
                    version = AgentVersion(name=name, sha=sha, label=given, created_unix=created, spec=spec)
                    pipe.multi()
                    pipe.hset(versions, sha, version.model_dump_json())
                    pipe.hset(labels, given, sha)
                    pipe.sadd(self._keys.agent_names(), name)
                    if current:
                        pipe.hset(self._keys.agent_current(), name, sha)
                    else:
                        pipe.hsetnx(self._keys.agent_current(), name, sha)
                    await pipe.execute()
                    return version, True
                except WatchError:
                    continue

    async def catalog(self) -> AgentCatalog:
        """Every agent's versions, labels and current version."""
        names = sorted(str(n) for n in await self._redis.smembers(self._keys.agent_names()))
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(self._keys.agent_current())
        for name in names:
            pipe.hgetall(self._keys.agent_versions(name))
            pipe.hgetall(self._keys.agent_labels(name))
        replies = await pipe.execute()
        current: dict[str, str] = replies[0]
        catalog = AgentCatalog.empty()
        for i, name in enumerate(names):
            raw_versions, labels = replies[1 + 2 * i], replies[2 + 2 * i]
            versions = {sha: AgentVersion.model_validate_json(raw) for sha, raw in raw_versions.items()}
            if not versions:
                continue
            catalog.versions[name] = versions
            catalog.labels[name] = dict(labels)
            newest = max(versions.values(), key=lambda v: v.created_unix).sha
            catalog.current[name] = current[name] if current.get(name) in versions else newest
        return catalog

    async def set_current(self, name: str, sha: str) -> None:
        await self._redis.hset(self._keys.agent_current(), name, sha)

    # --- rollouts ------------------------------------------------------------------------

    async def save_rollout(self, pool: str, state: RolloutState, sides: dict[str, Side] | None = None) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(self._keys.rollouts(pool), state.rollout.agent, state.model_dump_json())
        if sides is not None:
            pipe.hset(
                self._keys.rollout_sides(pool),
                state.rollout.agent,
                json.dumps({k: v.to_json() for k, v in sides.items()}, separators=(",", ":")),
            )
        await pipe.execute()

    async def rollouts(self, pool: str) -> dict[str, tuple[RolloutState, dict[str, Side]]]:
        """Every rollout of the pool (live or ended), with both sides' figures."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(self._keys.rollouts(pool))
        pipe.hgetall(self._keys.rollout_sides(pool))
        states, sides = await pipe.execute()
        out: dict[str, tuple[RolloutState, dict[str, Side]]] = {}
        for agent, raw in states.items():
            figures: dict[str, Any] = json.loads(sides.get(agent) or "{}")
            out[agent] = (
                RolloutState.model_validate_json(raw),
                {k: Side.from_json(v) for k, v in figures.items()},
            )
        return out

    async def post_transition(self, pool: str, agent: str, moved: Transition) -> None:
        await self._redis.xadd(
            self._keys.rollout_events(pool),
            {"agent": agent, **{k: str(v) for k, v in moved.model_dump(mode="json").items()}},
            maxlen=ROLLOUT_EVENTS_MAXLEN,
            approximate=True,
        )

    async def transitions(self, pool: str, *, count: int = 100) -> list[dict[str, str]]:
        """The latest transitions of the pool's rollouts, oldest first."""
        entries = stream_entries(await self._redis.xrevrange(self._keys.rollout_events(pool), count=count))
        return [{"id": entry_id, **fields} for entry_id, fields in reversed(entries)]

    # --- eval reports --------------------------------------------------------------------

    async def save_report(self, report: EvalReport) -> None:
        await self._redis.hset(self._keys.eval_reports(report.suite), report.version, report.model_dump_json())

    async def report(self, suite: str, version: str) -> EvalReport | None:
        raw = await self._redis.hget(self._keys.eval_reports(suite), version)
        return EvalReport.model_validate_json(raw) if raw is not None else None

    async def reports(self, suite: str) -> list[EvalReport]:
        raw = await self._redis.hgetall(self._keys.eval_reports(suite))
        return sorted((EvalReport.model_validate_json(r) for r in raw.values()), key=lambda r: r.started_unix)
