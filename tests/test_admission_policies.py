"""Admission control's pure logic, driven with an injected clock: buckets, leases, the fair
queue and dispatch capacity (the shedding rules: tests/test_shedding.py). No Ray, no Redis,
no sleeping."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agentpool.models import RateLimit
from agentpool.scheduler.buckets import BucketSet, TokenBucket
from agentpool.scheduler.capacity import ModelCapacity
from agentpool.scheduler.fair import PRIORITIES, FairQueue
from agentpool.scheduler.permits import PermitBroker, PermitRequest

# --- token buckets ---------------------------------------------------------------------------


class BucketMachine(RuleBasedStateMachine):
    """Over any window, the net amount granted (takes minus refunds) never exceeds
    capacity + rate x window, and the level never exceeds capacity."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.bucket = TokenBucket(600, self.now)  # 10 per second
        self.log: list[tuple[float, float]] = []  # (time, net amount granted)
        self.held: list[float] = []

    @rule(dt=st.floats(0, 30))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(amount=st.floats(0.5, 600))
    def take_if_it_fits(self, amount: float) -> None:
        if self.bucket.wait_s(amount, self.now) == 0:
            self.bucket.take(amount, self.now)
            self.log.append((self.now, amount))
            self.held.append(amount)

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data())
    def refund_part(self, data: st.DataObject) -> None:
        amount = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        back = data.draw(st.floats(0, amount))
        self.bucket.give(back, self.now)
        self.log.append((self.now, -back))

    @invariant()
    def bounded(self) -> None:
        assert self.bucket.level(self.now) <= self.bucket.capacity + 1e-6
        times = sorted({t for t, _ in self.log})
        for start, end in itertools.combinations_with_replacement(times, 2):
            net = sum(a for t, a in self.log if start <= t <= end)
            assert net <= self.bucket.capacity + self.bucket.rate * (end - start) + 1e-6


TestBuckets = BucketMachine.TestCase
TestBuckets.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_wait_is_exact_and_debt_is_repaid_first() -> None:
    bucket = TokenBucket(60, 0.0)  # 1 per second
    bucket.take(60, 0.0)
    assert bucket.wait_s(5, 0.0) == pytest.approx(5.0)
    assert bucket.wait_s(5, 5.0) == 0
    bucket.take(10, 5.0)  # reconciling a call that used more than it reserved: level -5
    assert bucket.wait_s(1, 5.0) == pytest.approx(6.0)


def test_bucket_set_takes_all_or_waits_for_the_slowest_and_for_a_pause() -> None:
    buckets = BucketSet.from_limits({"requests": 60, "input_tokens": 600}, 0.0)
    assert buckets.wait_s({"requests": 1, "input_tokens": 600}, 0.0) == 0
    buckets.take({"requests": 1, "input_tokens": 600}, 0.0)
    assert buckets.wait_s({"requests": 1, "input_tokens": 100}, 0.0) == pytest.approx(10.0)
    buckets.pause(30.0)
    assert buckets.wait_s({"requests": 1, "input_tokens": 100}, 20.0) == pytest.approx(10.0)
    assert buckets.lower_to({"input_tokens": 5}, 60.0) == ["input_tokens"]
    assert buckets.lower_to({"input_tokens": 10_000}, 60.0) == []  # headers never raise our view


# --- leases ---------------------------------------------------------------------------------

LIMITS = {"claude-sonnet-4": {"requests": 120, "input_tokens": 6000, "output_tokens": 3000}}
TTL = 50.0


def make_broker(now: float = 0.0, **kwargs: object) -> PermitBroker:
    def limit_key(model: str) -> str | None:
        return "claude-sonnet-4" if model.startswith("claude-sonnet-4") else None

    defaults: dict[str, object] = {
        "model_limits": LIMITS,
        "limit_key": limit_key,
        "tenant_limits": lambda t: {"requests": 30} if t == "capped" else {},
        "tenant_weight": lambda t: 1.0,
        "lease_ttl_s": TTL,
        "now": now,
    }
    return PermitBroker(**{**defaults, **kwargs})  # type: ignore[arg-type]


class LeaseMachine(RuleBasedStateMachine):
    """Random interleavings of requests, grants, releases, failures, cancellations and
    holder deaths: the outstanding count always equals the leases live holders still hold
    or dead holders left behind, and once everything has ended (dead holders' leases by
    expiry) it returns to zero and every bucket refills to capacity: nothing leaks."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.broker = make_broker()
        self.ids = itertools.count()
        self.waiting: dict[str, str] = {}  # lease id -> holder
        self.held: dict[str, tuple[str, float, float]] = {}  # lease id -> holder, input, output reserved
        self.dead: set[str] = set()

    def _grant(self) -> None:
        for lease in self.broker.grant_ready(self.now):
            holder = self.waiting.pop(lease.lease_id)
            self.held[lease.lease_id] = (holder, lease.reserved["input_tokens"], lease.reserved["output_tokens"])

    @rule(
        holder=st.sampled_from(["w1", "w2", "w3"]),
        tenant=st.sampled_from(["a", "b", "capped"]),
        model=st.sampled_from(["claude-sonnet-4-5", "claude-haiku-4-5"]),
        input_tokens=st.integers(1, 8000),
        max_tokens=st.integers(1, 4000),
    )
    def request(self, holder: str, tenant: str, model: str, input_tokens: int, max_tokens: int) -> None:
        if holder in self.dead:
            return
        lease_id = f"l{next(self.ids)}"
        self.broker.request(PermitRequest(lease_id, tenant, model, input_tokens, max_tokens, holder), self.now)
        self.waiting[lease_id] = holder
        self._grant()

    @rule(dt=st.floats(0, 20))
    def advance(self, dt: float) -> None:
        self.now += dt
        for lease in self.broker.expire(self.now):
            # Abandoned leases, and those of holders slower than the TTL, and only once it passed.
            assert lease.granted_at + TTL <= self.now
            self.held.pop(lease.lease_id)
        self._grant()

    def _live(self) -> list[str]:
        return sorted(k for k, (h, _, _) in self.held.items() if h not in self.dead)

    @precondition(lambda self: bool(self._live()))
    @rule(data=st.data(), ok=st.booleans())
    def finish(self, data: st.DataObject, ok: bool) -> None:
        lease_id = data.draw(st.sampled_from(self._live()))
        _, reserved_in, reserved_out = self.held.pop(lease_id)
        usage = None
        if ok:
            usage = {
                "input_tokens": data.draw(st.floats(0, reserved_in)),
                "output_tokens": data.draw(st.floats(0, reserved_out)),
            }
        assert self.broker.release(lease_id, self.now, usage=usage) is not None
        self._grant()

    @precondition(lambda self: bool(self.waiting) or bool(self._live()))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        lease_id = data.draw(st.sampled_from(sorted(self.waiting) + self._live()))
        assert self.broker.cancel(lease_id, self.now)
        self.waiting.pop(lease_id, None)
        self.held.pop(lease_id, None)
        self._grant()

    @rule(holder=st.sampled_from(["w1", "w2", "w3"]))
    def kill(self, holder: str) -> None:
        # A dead worker's waiting requests die with its call (the limiter cancels them);
        # the leases it holds are never released and must expire.
        self.dead.add(holder)
        for lease_id in [k for k, h in self.waiting.items() if h == holder]:
            assert self.broker.cancel(lease_id, self.now)
            del self.waiting[lease_id]
        self._grant()

    @rule()
    def provider_says_retry_after(self) -> None:
        self.broker.pause("claude-sonnet-4-5", self.now + 5)

    @invariant()
    def outstanding_matches(self) -> None:
        assert self.broker.outstanding == len(self.held)
        assert self.broker.waiting == len(self.waiting)

    def teardown(self) -> None:
        # Everyone alive finishes; time passes; abandoned leases expire; queued requests
        # are granted and finished in turn. In the end nothing is outstanding.
        for _ in range(10_000):
            for lease_id in self._live():
                self.held.pop(lease_id)
                self.broker.release(lease_id, self.now, usage=None)
            self.now += TTL + 1
            for lease in self.broker.expire(self.now):
                self.held.pop(lease.lease_id)
            self._grant()
            if not self.waiting and not self.held:
                break
        assert self.broker.outstanding == 0 and self.broker.waiting == 0
        self.now += 120
        for name, buckets in self.broker.models.items():
            for dim, bucket in buckets.buckets.items():
                assert bucket.level(self.now) == pytest.approx(bucket.capacity), (name, dim)


TestLeases = LeaseMachine.TestCase
TestLeases.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)


def test_a_large_request_is_not_overtaken_by_small_ones() -> None:
    """aiolimiter serves its smallest waiter first; the broker serves its head first."""
    broker = make_broker()
    broker.request(PermitRequest("drain", "a", "claude-sonnet-4-5", 6000, 1), 0.0)
    assert [lease.lease_id for lease in broker.grant_ready(0.0)] == ["drain"]
    broker.request(PermitRequest("big", "a", "claude-sonnet-4-5", 5000, 1), 0.0)
    for i in range(20):
        broker.request(PermitRequest(f"small{i}", "a", "claude-sonnet-4-5", 10, 1), 0.0)
    assert broker.grant_ready(1.0) == []  # 100 tokens refilled: the small ones would fit
    assert broker.next_wake_s(1.0) == pytest.approx(49.0)
    assert [lease.lease_id for lease in broker.grant_ready(50.0)] == ["big"]


def test_a_tenant_at_its_own_cap_waits_without_blocking_others() -> None:
    broker = make_broker()
    for i in range(30):
        broker.request(PermitRequest(f"c{i}", "capped", "claude-sonnet-4-5", 1, 1), 0.0)
    assert len(broker.grant_ready(0.0)) == 30
    broker.request(PermitRequest("c30", "capped", "claude-sonnet-4-5", 1, 1), 0.0)
    broker.request(PermitRequest("free", "a", "claude-sonnet-4-5", 1, 1), 0.0)
    assert [lease.lease_id for lease in broker.grant_ready(0.0)] == ["free"]
    assert broker.next_wake_s(0.0) == pytest.approx(2.0)  # the capped tenant refills 0.5/s


def test_release_reconciles_and_a_429_pauses_the_model_for_everyone() -> None:
    broker = make_broker()
    broker.request(PermitRequest("x", "a", "claude-sonnet-4-5", 1000, 3000), 0.0)
    assert len(broker.grant_ready(0.0)) == 1
    out = broker.models["claude-sonnet-4"].buckets["output_tokens"]
    assert out.level(0.0) == 0  # reserved max_tokens
    broker.release("x", 0.0, usage={"input_tokens": 400, "output_tokens": 100})
    assert out.level(0.0) == 2900
    assert broker.models["claude-sonnet-4"].buckets["input_tokens"].level(0.0) == 5600
    broker.pause("claude-sonnet-4-5", 7.0)
    broker.request(PermitRequest("y", "b", "claude-sonnet-4-5", 1, 1), 0.0)
    assert broker.grant_ready(0.0) == [] and broker.next_wake_s(0.0) == pytest.approx(7.0)
    assert [x.lease_id for x in broker.grant_ready(7.0)] == ["y"]
    assert broker.release("never-granted", 7.0, usage=None) is None


def test_output_estimate_mode_reserves_less_once_it_has_seen_responses() -> None:
    broker = make_broker(output_reservation="estimate")
    for i in range(25):
        broker.request(PermitRequest(f"r{i}", "a", "claude-sonnet-4-5", 1, 1000), float(i))
        (lease,) = broker.grant_ready(float(i))
        broker.release(lease.lease_id, float(i), usage={"input_tokens": 1, "output_tokens": 50 + i % 3})
    broker.request(PermitRequest("next", "a", "claude-sonnet-4-5", 1, 1000), 30.0)
    (lease,) = broker.grant_ready(30.0)
    assert 50 < lease.model_taken["output_tokens"] < 60


# --- fair queue -----------------------------------------------------------------------------

WEIGHTS = {"t1": 1.0, "t2": 2.0, "t5": 5.0}


@settings(max_examples=40, deadline=None)
@given(costs=st.lists(st.integers(1, 100), min_size=200, max_size=400), weights=st.sampled_from([WEIGHTS]))
def test_backlogged_shares_converge_to_weights_and_nobody_starves(costs: list[int], weights: dict[str, float]) -> None:
    """Every tenant always backlogged: weighted service never differs by more than the
    largest cost over the smallest weight (VTC's bound), and every tenant is served within a
    bounded number of dispatches."""
    queue: FairQueue[int] = FairQueue(weights.__getitem__)
    served = dict.fromkeys(weights, 0.0)
    last_served = dict.fromkeys(weights, 0)
    max_cost, min_cost = 100, 1
    gap_bound = (len(weights) - 1) * (math.ceil(max_cost * max(weights.values()) / min(weights.values())) + 1) + 1
    for tenant in weights:
        queue.push(tenant, "standard", -1)
        queue.push(tenant, "standard", 0)
    for step, cost in enumerate(costs, start=1):
        tenant, _ = queue.pop()
        queue.push(tenant, "standard", step)  # stays backlogged
        queue.charge(tenant, cost)
        served[tenant] += cost
        assert step - last_served[tenant] <= gap_bound * max_cost // min_cost
        last_served[tenant] = step
        normalised = [served[t] / weights[t] for t in weights]
        assert max(normalised) - min(normalised) <= max_cost / min(weights.values()) + 1e-9


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(sorted(WEIGHTS)), st.integers(1, 100), st.integers(1, 400), st.integers(0, 8)),
        min_size=50,
        max_size=300,
    )
)
def test_refunds_of_overestimates_cannot_buy_a_burst(steps: list[tuple[str, int, int, int]]) -> None:
    """Charged an estimate at dispatch and corrected when the work ends, possibly much later
    and many at once: a refund never takes a backlogged tenant further below the others than
    VTC's bound, so nobody else waits behind refunded credit."""
    queue: FairQueue[int] = FairQueue(WEIGHTS.__getitem__)
    for tenant in WEIGHTS:
        queue.push(tenant, "standard", 0)
    running: list[tuple[str, int, int]] = []  # (tenant, estimate, actual)
    for n, (_, actual, estimate, finishing) in enumerate(steps):
        tenant, _ = queue.pop()
        queue.push(tenant, "standard", n)  # stays backlogged
        queue.charge(tenant, estimate)
        running.append((tenant, estimate, actual))
        for done_tenant, done_estimate, done_actual in running[:finishing]:
            before = {t: queue.counters[t] for t in WEIGHTS}
            queue.charge(done_tenant, done_actual - done_estimate)
            others = min(before[t] for t in WEIGHTS if t != done_tenant)
            after = queue.counters[done_tenant]
            exact = before[done_tenant] + (done_actual - done_estimate) / WEIGHTS[done_tenant]
            if done_actual < done_estimate:  # refunded down to the others' smallest counter, no further
                assert after == pytest.approx(max(exact, min(before[done_tenant], others)))
            else:
                assert after == pytest.approx(exact)
        del running[:finishing]


def test_a_new_tenant_refunded_for_its_first_estimates_does_not_make_others_wait() -> None:
    """The noisy-neighbour case: a flood from a new tenant is charged from max_tokens, then
    refunded in a batch; a calm tenant arriving next is served within two dispatches. It
    arrives level with the flood (lifted to its counter), and a tie goes to the tenant
    backlogged longest: one more of the flood, then the calm tenant."""
    queue: FairQueue[str] = FairQueue({"noisy": 1.0, "calm": 2.0}.__getitem__)
    for i in range(200):
        queue.push("noisy", "standard", f"n{i}")
    for _ in range(32):  # 32 slots filled, each charged 210 but really costing 60
        queue.pop()
        queue.charge("noisy", 210)
    for _ in range(32):
        queue.charge("noisy", 60 - 210)
    queue.push("calm", "standard", "c")
    assert queue.counters["calm"] == queue.counters["noisy"] == 32 * 60
    tenant, _ = queue.pop()
    queue.charge(tenant, 60)
    assert tenant == "noisy"
    assert queue.pop() == ("calm", "c")


def test_a_tenant_back_from_idle_cannot_burst_on_saved_credit() -> None:
    queue: FairQueue[int] = FairQueue(lambda t: 1.0)
    for i in range(100):
        queue.push("busy", "standard", i)
    for _ in range(50):
        queue.pop()
        queue.charge("busy", 10)
    for i in range(10):
        queue.push("returning", "standard", i)  # counter lifted to busy's 500, not left at 0
    order = []
    for _ in range(10):
        tenant, _ = queue.pop()
        queue.charge(tenant, 10)
        order.append(tenant)
    assert order.count("returning") == 5  # alternates instead of taking all ten first


@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(PRIORITIES), st.booleans()),
        min_size=1,
        max_size=80,
    )
)
def test_priority_within_a_tenant_and_fifo_within_a_class(ops: list[tuple[str, str, bool]]) -> None:
    queue: FairQueue[tuple[str, str, int]] = FairQueue(lambda t: 1.0)
    model: dict[str, list[tuple[str, str, int]]] = {"a": [], "b": [], "c": []}
    for n, (tenant, priority, pop) in enumerate(ops):
        if pop and len(queue):
            got_tenant, item = queue.pop()
            expected = min(model[got_tenant], key=lambda x: (PRIORITIES.index(x[1]), x[2]))
            assert item == expected
            model[got_tenant].remove(item)
        else:
            queue.push(tenant, priority, (tenant, priority, n))
            model[tenant].append((tenant, priority, n))
    assert len(queue) == sum(map(len, model.values()))
    assert queue.depth() == {
        t: {p: c for p in PRIORITIES if (c := sum(1 for x in items if x[1] == p))}
        for t, items in model.items()
        if items
    }


@given(
    queued=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(PRIORITIES)), max_size=40),
    tenant=st.sampled_from(["a", "b", "c"]),
    priority=st.sampled_from(PRIORITIES),
)
def test_eviction_never_takes_more_important_work_nor_from_a_smaller_holder(
    queued: list[tuple[str, str]], tenant: str, priority: str
) -> None:
    queue: FairQueue[int] = FairQueue(lambda t: 2.0 if t == "b" else 1.0)
    for n, (t, p) in enumerate(queued):
        queue.push(t, p, n)
    before = {t: queue.weighted_length(t) for t in "abc"}
    victim = queue.evict_for(tenant, priority)
    if victim is None:
        return
    victim_tenant, victim_item = victim
    victim_priority = queued[victim_item][1]
    rank, arrival_rank = PRIORITIES.index(victim_priority), PRIORITIES.index(priority)
    assert rank >= arrival_rank
    if rank == arrival_rank:
        assert victim_tenant != tenant
        assert before[victim_tenant] > (before[tenant] * queue.weight(tenant) + 1) / queue.weight(tenant)


# --- dispatch capacity per rate-limited model ------------------------------------------------


def test_model_capacity_follows_the_binding_limit_and_the_unqueued_service_time() -> None:
    requests_bound = ModelCapacity(RateLimit(rpm=600))
    assert requests_bound.cap() is None  # nothing learnt yet: no cap
    for _ in range(50):  # two calls a task, 0.3 s of work plus 0.5 s waiting for permits
        requests_bound.observe(calls=2, input_tokens=400, output_tokens=100, run_s=0.8, permit_wait_s=0.5)
    assert requests_bound.tasks_per_s() == pytest.approx(5.0)  # 10 calls/s, 2 per task
    assert requests_bound.cap() == math.ceil(5.0 * 0.3 * 1.1) + 1
    tokens_bound = ModelCapacity(RateLimit(rpm=600, itpm=60_000, otpm=10**9))
    for _ in range(50):
        tokens_bound.observe(calls=1, input_tokens=500, output_tokens=10, run_s=1.0, permit_wait_s=0.0)
    assert tokens_bound.tasks_per_s() == pytest.approx(2.0)  # 1,000 input tokens/s, 500 a task
    assert tokens_bound.cap() == math.ceil(2.0 * 1.0 * 1.1) + 1
