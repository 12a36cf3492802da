"""Spend by model and lane, per tenant and UTC day, in the tenant's usage hash of the day
(`cluster.budgets`): every LLM call the provider answered adds what it cost and what it
would have cost at list price (real-time) under `spend|<lane>|<model>`, `list|<lane>|<model>`
and `calls|<lane>|<model>`. `agentpool cost` reads them back over a period (`read_spend`),
with the response cache's counts that `cluster.responses` keeps in the same hashes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from typing import Any, cast

import redis

from agentpool.cluster.budgets import DAY_KEY_TTL_S, utc_day
from agentpool.cluster.connection import Pipelined, Scripted, raised
from agentpool.cluster.keys import Keys

# One call's spend added to its tenant's day (KEYS[1]) under `<kind>|<lane>|<model>`
# (ARGV[1] is `<lane>|<model>`), the hash kept for its TTL: one command, not four.
_RECORD = """
redis.call('HINCRBYFLOAT', KEYS[1], 'spend|' .. ARGV[1], ARGV[2])
redis.call('HINCRBYFLOAT', KEYS[1], 'list|' .. ARGV[1], ARGV[3])
redis.call('HINCRBY', KEYS[1], 'calls|' .. ARGV[1], 1)
return redis.call('EXPIRE', KEYS[1], ARGV[4])
"""


class SpendLog:
    """Adds each LLM call's spend to its tenant's day, with the process's next batch of Redis
    writes (`pipelined`: `StoreBase._pipelined`)."""

    def __init__(self, pipelined: Pipelined, keys: Keys, *, wall_clock: Callable[[], float]) -> None:
        self._pipelined = pipelined
        self._keys = keys
        self._now = wall_clock

    async def record(self, tenant: str, *, model: str, lane: str, cost_usd: float, list_usd: float) -> None:
        day = self._keys.usage(tenant, utc_day(self._now()))
        write = Scripted(_RECORD, (day,), (f"{lane}|{model}", cost_usd, list_usd, DAY_KEY_TTL_S))

        def add(pipe: Any) -> int:
            write.add_to(pipe)
            return 1

        for result in await self._pipelined(add):
            raised(result)


def days_back(days: int, now_unix: float) -> list[str]:
    """The last `days` UTC days, today first."""
    today = dt.datetime.fromtimestamp(now_unix, dt.UTC).date()
    return [(today - dt.timedelta(days=n)).isoformat() for n in range(days)]


def read_spend(
    client: redis.Redis, keys: Keys, days: Iterable[str], tenants: Iterable[str] | None = None
) -> dict[str, dict[str, dict[str, float]]]:
    """tenant -> day -> the day's usage fields, for `days` (every tenant with a usage hash on
    one of them when `tenants` is None, found with SCAN)."""
    days = list(days)
    if tenants is None:
        found: set[str] = set()
        for day in days:
            pattern = keys.usage("*", day)
            for key in client.scan_iter(match=pattern, count=1000):
                name = key.decode() if isinstance(key, bytes) else str(key)
                found.add(name[name.index("{") + 1 : name.index("}")])
        tenants = sorted(found)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for tenant in tenants:
        pipe = client.pipeline(transaction=False)
        for day in days:
            pipe.hgetall(keys.usage(tenant, day))
        for day, raw in zip(days, cast(list[dict[Any, Any]], pipe.execute()), strict=True):
            fields = {_text(k): float(v) for k, v in raw.items() if not _text(k).startswith("lease:")}
            if fields:
                out.setdefault(tenant, {})[day] = fields
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
