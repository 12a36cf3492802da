"""Daily tenant budgets (tokens and USD), reserved atomically in Redis: the storage of the
arithmetic in `agentpool.budgets`, whose steps the scripts here run on the day's hash.

Before an LLM call the worker reserves the call's worst case (estimated input plus the
output reservation, priced at the dearer of input and cache-write rates); after it the
reservation is replaced by the actual usage, or refunded when the call failed. The check
and the reservation are one Lua script, so concurrent calls cannot overspend together, and
the state lives in the tenant's `usage:<yyyy-mm-dd>` hash, so it survives any restart.

A reservation whose holder died is swept once it is older than the lease TTL, and counted
as spent: the call may have reached the provider. Days are UTC days.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from agentpool.budgets import COST_SLACK_USD, Limits, admission_check
from agentpool.cluster.connection import Scripted
from agentpool.cluster.keys import Keys
from agentpool.errors import BudgetExceeded
from agentpool.models import TenantPolicy, Usage
from agentpool.vocabulary import ErrorReason

#: Day hashes live 35 days: budgets need today's, `agentpool cost` a month of them.
DAY_KEY_TTL_S = 35 * 24 * 3600
# The scripts subtract as `0 - x`, never `-x`: Lua's -0 reaches Redis as "-0", which HINCRBY
# refuses ("not an integer"), so settling a reservation of 0 tokens failed.

_OVER = """
local function over(key, tb, cb, t, c)
  local v = redis.call('HMGET', key, 'tokens', 'reserved_tokens', 'cost_usd', 'reserved_cost_usd')
  local tokens = (tonumber(v[1]) or 0) + (tonumber(v[2]) or 0)
  local cost = (tonumber(v[3]) or 0) + (tonumber(v[4]) or 0)
  if tb >= 0 and tokens + t > tb then return 'daily_token_budget' end
  if cb >= 0 and cost + c > cb + SLACK then return 'daily_cost_budget' end
  return false
end
""".replace("SLACK", repr(COST_SLACK_USD))

# KEYS[1] usage hash. ARGV: lease id, tokens, cost, token budget (-1: none), cost budget
# (-1: none), now (unix s), lease expiry (unix s), key TTL (s).
_RESERVE = (
    _OVER
    + """
local key = KEYS[1]
local t, c = tonumber(ARGV[2]), tonumber(ARGV[3])
local tb, cb, now = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local why = over(key, tb, cb, t, c)
if why then
  local all = redis.call('HGETALL', key)
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, 6) == 'lease:' then
      local lt, lc, exp = string.match(all[i + 1], '([^|]+)|([^|]+)|([^|]+)')
      if tonumber(exp) <= now then
        redis.call('HDEL', key, all[i])
        redis.call('HINCRBY', key, 'reserved_tokens', 0 - tonumber(lt))
        redis.call('HINCRBYFLOAT', key, 'reserved_cost_usd', 0 - tonumber(lc))
        redis.call('HINCRBY', key, 'tokens', tonumber(lt))
        redis.call('HINCRBYFLOAT', key, 'cost_usd', tonumber(lc))
        redis.call('HINCRBY', key, 'expired_reservations', 1)
      end
    end
  end
  why = over(key, tb, cb, t, c)
  if why then return why end
end
redis.call('HINCRBY', key, 'reserved_tokens', t)
redis.call('HINCRBYFLOAT', key, 'reserved_cost_usd', c)
redis.call('HSET', key, 'lease:' .. ARGV[1], ARGV[2] .. '|' .. ARGV[3] .. '|' .. ARGV[7])
redis.call('EXPIRE', key, ARGV[8])
return ''
"""
)

# KEYS[1] usage hash. ARGV: lease id ('' when nothing was reserved), then input, output,
# cache read and cache write tokens and cost, or nothing at all for a refund; key TTL last.
_SETTLE = """
local key = KEYS[1]
local lease = ARGV[1]
local swept = false
if lease ~= '' then
  local v = redis.call('HGET', key, 'lease:' .. lease)
  if v then
    local lt, lc = string.match(v, '([^|]+)|([^|]+)|')
    redis.call('HDEL', key, 'lease:' .. lease)
    redis.call('HINCRBY', key, 'reserved_tokens', 0 - tonumber(lt))
    redis.call('HINCRBYFLOAT', key, 'reserved_cost_usd', 0 - tonumber(lc))
  else
    swept = true
  end
end
if #ARGV == 8 then
  if not swept then
    local i, o, cr, cw = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
    redis.call('HINCRBY', key, 'tokens', i + o + cr + cw)
    redis.call('HINCRBY', key, 'input_tokens', i)
    redis.call('HINCRBY', key, 'output_tokens', o)
    redis.call('HINCRBY', key, 'cache_read_input_tokens', cr)
    redis.call('HINCRBY', key, 'cache_creation_input_tokens', cw)
    redis.call('HINCRBYFLOAT', key, 'cost_usd', tonumber(ARGV[6]))
  end
  redis.call('HINCRBY', key, 'calls', tonumber(ARGV[7]))
end
redis.call('EXPIRE', key, ARGV[#ARGV])
return 1
"""


def utc_day(now_unix: float) -> str:
    return dt.datetime.fromtimestamp(now_unix, tz=dt.UTC).strftime("%Y-%m-%d")


def seconds_to_reset(now_unix: float) -> float:
    """Seconds until the next UTC midnight, when daily budgets start again."""
    today = dt.datetime.fromtimestamp(now_unix, tz=dt.UTC).date()
    midnight = dt.datetime.combine(today + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    return midnight.timestamp() - now_unix


def limits_of(policy: TenantPolicy) -> Limits:
    return Limits(tokens=policy.daily_token_budget, cost_usd=policy.daily_cost_budget_usd)


def _budget_error(tenant: str, reason: ErrorReason, now_unix: float, spent: dict[str, float]) -> BudgetExceeded:
    wait = seconds_to_reset(now_unix)
    resets_at = dt.datetime.fromtimestamp(now_unix + wait, tz=dt.UTC).isoformat()
    what = "token" if reason is ErrorReason.DAILY_TOKEN_BUDGET else "cost"
    return BudgetExceeded(
        f"tenant {tenant!r} has spent its daily {what} budget; it resets at {resets_at}",
        tenant=tenant,
        reason=reason,
        retry_after_s=round(wait, 3),
        resets_at=resets_at,
        spent=spent,
    )


@dataclass(frozen=True)
class Reservation:
    key: str
    lease_id: str


class BudgetLedger:
    """Reserve, settle and refund against a tenant's daily usage hash."""

    def __init__(
        self,
        redis: Callable[[], aioredis.Redis],
        keys: Keys,
        *,
        reservation_ttl_s: float,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._ttl = reservation_ttl_s
        self._now = wall_clock
        self._scripts: dict[str, Any] = {}

    def _script(self, name: str, source: str) -> Any:
        if name not in self._scripts:
            self._scripts[name] = self._redis().register_script(source)
        return self._scripts[name]

    async def reserve(
        self, tenant: str, policy: TenantPolicy, lease_id: str, tokens: int, cost_usd: float
    ) -> Reservation | None:
        """Reserves a call's worst case; None when the tenant has no budget to reserve against.

        Raises:
            BudgetExceeded: If the reservation would take the tenant over a daily budget.
        """
        limits = limits_of(policy)
        if not limits:
            return None
        now = self._now()
        key = self._keys.usage(tenant, utc_day(now))
        why = await self._script("reserve", _RESERVE)(
            keys=[key],
            args=[
                lease_id,
                int(tokens),
                repr(float(cost_usd)),
                limits.tokens if limits.tokens is not None else -1,
                repr(float(limits.cost_usd)) if limits.cost_usd is not None else -1,
                repr(now),
                repr(now + self._ttl),
                DAY_KEY_TTL_S,
            ],
        )
        if why:
            raise _budget_error(tenant, ErrorReason(why), now, await self.spent(tenant))
        return Reservation(key, lease_id)

    async def settle(self, tenant: str, reservation: Reservation | None, usage: Usage, calls: int = 1) -> None:
        """Records the actual usage of `calls` calls, releasing their reservation (if any)."""
        write = self.settle_write(tenant, reservation, usage, calls)
        await self._script("settle", _SETTLE)(keys=list(write.keys), args=list(write.args))

    def settle_write(self, tenant: str, reservation: Reservation | None, usage: Usage, calls: int = 1) -> Scripted:
        """`settle` as a write to send in a pipeline with others (`ResultStore.write_result`)."""
        key = reservation.key if reservation else self._keys.usage(tenant, utc_day(self._now()))
        args = (
            reservation.lease_id if reservation else "",
            usage.input_tokens,
            usage.output_tokens,
            usage.cache_read_input_tokens,
            usage.cache_creation_input_tokens,
            repr(float(usage.cost_usd)),
            calls,
            DAY_KEY_TTL_S,
        )
        return Scripted(_SETTLE, (key,), args)

    async def refund(self, reservation: Reservation | None) -> None:
        """Gives a failed or abandoned call's reservation back."""
        if reservation is not None:
            await self._script("settle", _SETTLE)(keys=[reservation.key], args=[reservation.lease_id, DAY_KEY_TTL_S])

    async def spent(self, tenant: str) -> dict[str, float]:
        """Today's usage of `tenant`: tokens, cost and what is reserved by calls in flight."""
        raw = await self._redis().hgetall(self._keys.usage(tenant, utc_day(self._now())))
        return {str(k): float(v) for k, v in raw.items() if not str(k).startswith("lease:")}

    async def check(self, tenant: str, policy: TenantPolicy, first_call_tokens: int = 0) -> BudgetExceeded | None:
        """At admission: the rejection when what is left of a daily budget cannot cover even
        the task's first call (`first_call_tokens`), else None. Reservations of calls in
        flight are not counted here: they may yet be refunded."""
        limits = limits_of(policy)
        if not limits:
            return None
        now = self._now()
        spent = await self.spent(tenant)
        why = admission_check(spent, limits, first_call_tokens)
        return None if why is None else _budget_error(tenant, why, now, spent)

    async def usage_today(self, tenants: Iterable[str]) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for tenant in tenants:
            spent = await self.spent(tenant)
            if spent:
                out[tenant] = spent
        return out
