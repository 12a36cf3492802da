"""Changing a pool's configuration while it runs (`pool.update_config`), pure parts: which
fields may change and how they are validated (`PoolConfig.with_live`), and how the buckets,
the permit broker, the per-model dispatch and the scheduler's core take new limits and
policies without losing what they hold (levels, pauses, leases, waiters, what they learnt).
The same through a real pool is in `test_live_config_pool.py`."""

from __future__ import annotations

import pytest

from agentpool import InvalidConfig, PoolConfig, RateLimit, TenantPolicy
from agentpool.config import LIVE_FIELDS
from agentpool.scheduler.buckets import BucketSet, TokenBucket
from agentpool.scheduler.capacity import LimiterBacklog, ModelDispatch
from agentpool.scheduler.core import Start
from tests.core_cases import config, core_of, queued, result, task
from tests.test_permits_exact import ask, broker

# --- which fields, validated how -------------------------------------------------------------


def test_live_fields_are_the_tenants_and_the_limits() -> None:
    assert LIVE_FIELDS == ("tenants", "default_tenant_policy", "strict_tenants", "limits", "max_queued")
    base = PoolConfig(name="live", max_queued=10)
    changed = base.with_live(
        {"tenants": {"acme": {"weight": 2.0, "max_concurrency": 3}}, "limits": {"claude-haiku-4-5": RateLimit(rpm=60)}}
    )
    assert changed.tenants == {"acme": TenantPolicy(weight=2.0, max_concurrency=3)}
    assert changed.limits == {"claude-haiku-4-5": RateLimit(rpm=60)}
    assert changed.max_queued == 10 and changed.name == "live" and base.tenants == {}  # a copy
    assert changed.live_fields() == {
        "tenants": {"acme": TenantPolicy(weight=2.0, max_concurrency=3).model_dump(mode="json")},
        "default_tenant_policy": TenantPolicy().model_dump(mode="json"),
        "strict_tenants": False,
        "limits": {"claude-haiku-4-5": {"rpm": 60, "itpm": None, "otpm": None}},
        "max_queued": 10,
    }
    assert base.with_live(changed.live_fields()) == changed  # what Redis keeps reads back the same


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"num_workers": 3}, "num_workers: not changeable while the pool runs"),
        ({"redis_url": "redis://x", "name": "y"}, "name, redis_url: not changeable while the pool runs"),
        ({"max_queued": 0}, "max_queued: Input should be greater than or equal to 1"),
        ({"tenants": {"acme": {"weight": -1}}}, "tenants.acme.weight: Input should be greater than 0"),
        ({"tenants": {"acme": {"wieght": 1}}}, "tenants.acme.wieght: Extra inputs are not permitted"),
        ({"limits": {"m": {"rpm": "lots"}}}, "limits.m.rpm: Input should be a valid integer"),
    ],
)
def test_anything_else_is_refused_saying_what(changes: dict[str, object], problem: str) -> None:
    with pytest.raises(InvalidConfig) as refused:
        PoolConfig().with_live(changes)
    assert problem in str(refused.value) and refused.value.problems[0].startswith(problem.split(":")[0])


# --- buckets and the permit broker ----------------------------------------------------------------


def test_a_bucket_retuned_keeps_its_level_within_the_new_capacity() -> None:
    bucket = TokenBucket(60, 0.0, margin_s=0.5)
    bucket.take(50, 0.0)  # level 10
    bucket.retune(600, 0.0)
    assert (bucket.capacity, bucket.rate, bucket.margin, bucket.level(0.0)) == (600.0, 10.0, 5.0, 10.0)  # no burst
    assert bucket.level(1.0) == 20.0  # refills at the new rate
    bucket.retune(6, 1.0)
    assert bucket.level(1.0) == 6.0 and bucket.rate == 0.1  # capped at the new capacity
    with pytest.raises(ValueError, match="positive"):
        bucket.retune(0, 1.0)


def test_a_bucket_set_retuned_adds_full_dimensions_drops_others_and_keeps_its_pause() -> None:
    buckets = BucketSet.from_limits({"requests": 10, "input_tokens": 1000}, 0.0)
    buckets.take({"requests": 4, "input_tokens": 100}, 0.0)
    buckets.pause(30.0)
    buckets.retune({"requests": 20, "output_tokens": 500}, 0.0, margin_s=0.0)
    assert set(buckets.buckets) == {"requests", "output_tokens"}
    assert buckets.buckets["requests"].level(0.0) == 6.0 and buckets.buckets["output_tokens"].level(0.0) == 500.0
    assert buckets.paused_until == 30.0 and buckets.granted["requests"] == 4.0


def test_a_broker_retuned_grants_what_waited_for_the_old_limits_and_keeps_its_leases() -> None:
    b = broker(model_limits={"sonnet": {"requests": 1}})
    b.request(ask("first"), 0.0)
    b.request(ask("second"), 0.0)
    assert [lease.lease_id for lease in b.grant_ready(0.0)] == ["first"]
    b.request(ask("capped", tenant="capped"), 0.0)
    b.retune(
        model_limits={"sonnet": {"requests": 120}},
        limit_key=lambda model: "sonnet",
        tenant_limits=lambda t: {"requests": 1} if t == "capped" else {},
        tenant_weight=lambda t: 2.0,
        now=0.0,
    )
    assert b.models["sonnet"].buckets["requests"].level(0.0) == 0.0  # the level stays: no burst
    assert [lease.lease_id for lease in b.grant_ready(1.0)] == ["second", "capped"]  # 120/min: 2 in 1 s
    assert set(b.leases) == {"first", "second", "capped"}
    assert b.tenants["capped"] is not None and b.tenants["capped"].buckets["requests"].capacity == 1.0
    b.retune(
        model_limits={},
        limit_key=lambda model: None,
        tenant_limits=lambda t: {},
        tenant_weight=lambda t: 1.0,
        now=1.0,
    )
    assert b.models["sonnet"].buckets == {} and b.tenants["capped"] is None  # no longer limited
    b.request(ask("free"), 1.0)
    assert [lease.lease_id for lease in b.grant_ready(1.0)] == ["free"]


# --- the scheduler's core -----------------------------------------------------------------------


def test_model_dispatch_retuned_keeps_what_it_learnt_and_forgets_dropped_keys() -> None:
    dispatch = ModelDispatch({"a": RateLimit(rpm=60), "b": RateLimit(rpm=60)})
    learnt = dispatch.capacity["a"]
    dispatch.backlog(LimiterBacklog({"a": 1, "b": 1}))
    dispatch.retune({"a": RateLimit(rpm=120), "c": RateLimit(otpm=1000)})
    assert dispatch.capacity["a"] is learnt and learnt._per_minute == {"requests": 120}
    assert set(dispatch.capacity) == {"a", "c"} and dispatch.has_room("b") and dispatch.tasks_per_s("b") is None
    t = task()
    dispatch.learn("b", result(t), 1.0)  # a task of a key no longer limited teaches nothing, and fails nothing


def test_a_reconfigured_core_applies_new_caps_and_bounds_from_the_next_decision() -> None:
    cfg = config(max_queued=3)
    core = core_of(cfg, workers=1, slots=4)
    for n in range(3):
        queued(core, task("b", n))  # tenant b: max_concurrency 1
    assert [d.ticket.item for d in core.dispatch(0.0) if isinstance(d, Start)] == ["b-0"]
    tenants = {**cfg.tenants, "b": TenantPolicy(weight=2.0, max_concurrency=3)}
    core.reconfigure(cfg.with_live({"tenants": tenants, "max_queued": 10}))
    assert [d.ticket.item for d in core.dispatch(0.0) if isinstance(d, Start)] == ["b-1", "b-2"]
    for n in range(3, 10):
        queued(core, task("a", n))  # the bound is 10 now, not 3
    assert core.waiting == 7 and core.config.max_queued == 10
