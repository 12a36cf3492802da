"""The sections of `PoolConfig` (retries, breakers, executor groups, autoscaling, placement,
admission, alerts, HTTP, webhooks): each its own model, all re-exported by `agentpool.config`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agentpool.vocabulary import Ingress

#: Where a tool call runs: in the executor's threads, or in a child process of its own.
Isolation = Literal["thread", "process"]


class RetryPolicy(BaseModel):
    """Our retries of LLM calls (the SDK's own are off so each attempt is visible to us).

    Delay before attempt n+1 is `min(max_delay_s, base_delay_s * 2**n)` scaled by a random
    factor in [1 - jitter, 1], and never shorter than the provider's `retry-after`.
    """

    max_attempts_per_model: int = Field(default=4, ge=1, le=20)
    base_delay_s: float = Field(default=0.5, ge=0, le=60)
    max_delay_s: float = Field(default=20.0, ge=0, le=600)
    jitter: float = Field(default=0.5, ge=0, le=1)


class BreakerConfig(BaseModel):
    """A tool's circuit breaker (resilience4j's semantics), shared by the whole cluster.

    Outcomes fill a sliding window: the last `window_size` calls (`window="count"`) or the
    calls of the last `window_size` seconds (`window="time"`). Once it holds `minimum_calls`,
    a failure rate (errors, timeouts, crashes) at or above `failure_rate`, or a rate of calls
    lasting `slow_call_s` or more at or above `slow_call_rate`, opens the breaker: calls are
    refused at once for `open_wait_s`, then `half_open_calls` trial calls decide whether it
    closes or opens again. `slow_call_s` defaults to half the tool's `timeout_s`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    window: Literal["count", "time"] = "count"
    window_size: int = Field(default=20, ge=1, le=10_000)
    minimum_calls: int = Field(default=10, ge=1, le=10_000)
    failure_rate: float = Field(default=0.5, gt=0, le=1)
    slow_call_s: float | None = Field(default=None, gt=0, le=3600)
    slow_call_rate: float = Field(default=1.0, gt=0, le=1)
    open_wait_s: float = Field(default=30.0, gt=0, le=86_400)
    half_open_calls: int = Field(default=3, ge=1, le=1000)

    @model_validator(mode="after")
    def _window_can_fill(self) -> BreakerConfig:
        if self.window == "count" and self.minimum_calls > self.window_size:
            raise ValueError(f"minimum_calls ({self.minimum_calls}) exceeds the window of {self.window_size} calls")
        return self


class ExecutorGroupConfig(BaseModel):
    """A set of tool-executor actors of their own, for the tools pinned to it (`@tool(group=...)`).

    A sync tool that overruns its timeout keeps its thread; an executor with `max_stuck_threads`
    such threads stops taking calls, lets the others finish and is replaced by a new process.
    Tools under process isolation never leave a thread stuck and never take the executor down.
    """

    model_config = ConfigDict(extra="forbid")

    executors: int = Field(default=1, ge=1, le=1024)
    concurrency: int = Field(default=64, ge=1, le=10_000)
    max_stuck_threads: int = Field(default=8, ge=1, le=10_000)
    #: CPU priority of the group's processes (Unix niceness; an executor takes it as it
    #: starts, its first second importing Ray runs at the cluster's). Tools default to 19, the
    #: lowest, below the pool's own actors (0), so that a tool burning CPU slows only tools,
    #: never the agent loops or the scheduler.
    niceness: int = Field(default=19, ge=0, le=19)
    #: How the group runs tools that do not choose (`@tool(isolation=...)`): "thread", in
    #: the executor's process; "process", each call in a forked child of its own that is
    #: killed at its timeout and whose crash costs only that call, not the executor.
    isolation: Isolation = "thread"


class AutoscaleConfig(BaseModel):
    """The number of agent workers follows load between `min_workers` and `max_workers`.

    Demand is the agent loops running or queued; the pool wants `demand / target` workers
    (`target_loops_per_worker`, by default 80% of `worker_concurrency`). It grows only to a
    count every observation of the last `upscale_delay_s` asked for, and shrinks only to one
    none of the last `downscale_delay_s` asked more than; a worker leaving finishes its
    running tasks first. Workers that do not fit on the cluster wait for Ray's autoscaler
    to add a node with their resources (`PlacementConfig.worker_resources`).
    """

    model_config = ConfigDict(extra="forbid")

    min_workers: int = Field(default=1, ge=1, le=1024)
    max_workers: int = Field(default=8, ge=1, le=1024)
    target_loops_per_worker: float | None = Field(default=None, gt=0, le=10_000)
    upscale_delay_s: float = Field(default=5.0, ge=0, le=3600)
    downscale_delay_s: float = Field(default=60.0, ge=0, le=86_400)
    #: A load within this fraction of the target leaves the count as it is.
    tolerance: float = Field(default=0.1, ge=0, le=0.9)
    #: How often demand is observed.
    interval_s: float = Field(default=1.0, gt=0, le=60)
    #: Longest a new worker may take to start (a node being added) before it is given up.
    start_timeout_s: float = Field(default=600.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscaleConfig:
        if self.min_workers > self.max_workers:
            raise ValueError("min_workers must not exceed max_workers")
        return self


class PlacementConfig(BaseModel):
    """Where the pool's actors go on a multi-node cluster, by Ray custom resources.

    `ray-cluster.yaml` gives agent-worker nodes `{"agent_worker": N}` and tool-executor
    nodes `{"tool_executor": N}`; asking for a share of them here keeps each kind of actor
    on its kind of node, and makes Ray's autoscaler add such a node when none has room.
    Empty (the default) places actors anywhere, as on one machine.
    """

    model_config = ConfigDict(extra="forbid")

    worker_resources: dict[str, float] = Field(default_factory=dict, max_length=16)
    executor_resources: dict[str, float] = Field(default_factory=dict, max_length=16)
    #: For the scheduler, the limiter and the tool board (a head-only resource keeps them
    #: on the head node).
    control_resources: dict[str, float] = Field(default_factory=dict, max_length=16)
    #: Spread agent workers across nodes (Ray's SPREAD strategy) rather than packing them.
    spread_workers: bool = True


class AdmissionConfig(BaseModel):
    """Load shedding at admission and in the queue.

    Interactive work, a task with a `deadline_s` or of `sheddable` priority, is rejected at
    once when its predicted queue wait exceeds its deadline (or `max_queue_wait_s`, if set),
    or when the chance that it waits longer is over `late_chance` (the dispatches ahead of
    it taken as a Poisson process at the measured rate), and dropped if it waits longer.
    A lower `late_chance` refuses more at arrival and drops fewer after a wait. Overload
    is detected CoDel-style on the waits of interactive work: when even the shortest wait
    seen over `interval_s` stays above `target_wait_s`, a standing queue has formed; new
    interactive `sheddable` tasks are then rejected, and after `escalate_intervals` such
    intervals in a row `standard` ones too. `critical` tasks are refused only when the queue
    is full, and then a queued task of a lower class makes room for them.

    A task with no deadline that is not `sheddable` is a batch: it waits its turn however
    long the backlog is (in Redis), bounded only by `PoolConfig.max_queued`, and is never shed for
    overload; a batch submitted at once is not an overload. `max_queue_wait_s`, if set,
    caps every task's wait, batches included.
    """

    max_queue_wait_s: float | None = Field(default=None, gt=0, le=86_400)
    target_wait_s: float = Field(default=0.5, gt=0, le=3600)
    interval_s: float = Field(default=2.0, gt=0, le=3600)
    escalate_intervals: int = Field(default=3, ge=1, le=1000)
    late_chance: float = Field(default=0.05, gt=0, le=1)


class AlertConfig(BaseModel):
    """Thresholds that raise `alert` events (tenant's events stream, warning log line, the
    `agentpool.alerts` metric). None turns a check off.

    A run's cost alerts on each run over it. The error rate (`failed` and `timed_out` among
    the tasks that ran) and the p95 of their total time are taken per tenant over the last
    `window_s`, once it holds `min_tasks`; each alerts when it crosses its threshold and
    again (`resolved`) when it is back under.
    """

    model_config = ConfigDict(extra="forbid")

    run_cost_usd: float | None = Field(default=None, gt=0)
    error_rate: float | None = Field(default=None, gt=0, le=1)
    p95_latency_s: float | None = Field(default=None, gt=0)
    window_s: float = Field(default=300.0, gt=0, le=86_400)
    min_tasks: int = Field(default=20, ge=1, le=1_000_000)


class HttpConfig(BaseModel):
    """The HTTP API on Ray Serve (`agentpool serve`, `agentpool.http.serve`)."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    #: What takes connections in front of the replicas (`Ingress`): HAProxy, where it is
    #: found, adds about a millisecond to a request where Serve's proxy adds 3 to 6. Read
    #: when Serve starts: a Serve already running on the cluster keeps its own.
    ingress: Ingress = Ingress.AUTO
    #: Serve's autoscaling of the API's replicas (each holds no state of its own).
    min_replicas: int = Field(default=1, ge=1, le=100)
    max_replicas: int = Field(default=4, ge=1, le=1000)
    #: Requests in progress per replica that Serve's autoscaler aims for; SSE streams count.
    target_ongoing_requests: float = Field(default=200, gt=0)
    max_ongoing_requests: int = Field(default=2000, ge=1)
    #: A comment line on an SSE stream after this long without an event (proxies and
    #: load balancers close idle connections).
    sse_heartbeat_s: float = Field(default=15.0, gt=0, le=300)
    #: How long an `Idempotency-Key`'s response is replayed (the key is free again after).
    idempotency_ttl_s: int = Field(default=24 * 3600, ge=60, le=30 * 24 * 3600)
    #: Failed authentications from one source address allowed per window; the source's
    #: failures past it get 429 (a valid key is never refused for them: behind HAProxy, or
    #: any shared proxy, every client has the same source address).
    auth_failures_per_window: int = Field(default=20, ge=1)
    auth_failure_window_s: int = Field(default=60, ge=1, le=3600)
    #: `POST /v1/runs/wait`: the longest `wait_s` a request may ask for.
    max_wait_s: float = Field(default=300.0, gt=0, le=3600)
    #: Request bodies: one run, and a batch (JSON or JSONL).
    max_run_bytes: int = Field(default=1 << 20, ge=1024)
    max_batch_bytes: int = Field(default=128 << 20, ge=1024)
    max_batch_tasks: int = Field(default=100_000, ge=1, le=1_000_000)
    #: How long a batch's list of members is kept (its records have their own TTL).
    batch_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)


class WebhookConfig(BaseModel):
    """Delivery of webhooks (`pool.add_webhook`, `POST /v1/webhooks`): at least once, by the
    pool's deliverer actor, retried with exponential backoff and jitter, then dead-lettered."""

    model_config = ConfigDict(extra="forbid")

    #: Loopback, link-local and private addresses are refused unless this is on (a receiver
    #: inside the cluster's own network; no SSRF through webhooks otherwise).
    allow_private_addresses: bool = False
    timeout_s: float = Field(default=10.0, gt=0, le=120)
    first_retry_s: float = Field(default=5.0, gt=0, le=3600)
    max_retry_s: float = Field(default=3600.0, gt=0, le=24 * 3600)
    #: A message still undelivered this long after its first attempt goes to the dead letters.
    give_up_after_s: float = Field(default=24 * 3600, gt=0, le=30 * 24 * 3600)
    #: Deliverer actors (they share the work: a consumer group, and leases on deliveries).
    deliverers: int = Field(default=1, ge=1, le=64)
    #: Deliveries in flight at once (per deliverer).
    concurrency: int = Field(default=64, ge=1, le=10_000)
    #: How long delivery logs and dead letters are kept.
    log_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)
    #: Endpoints per tenant, at most.
    max_endpoints: int = Field(default=20, ge=1, le=1000)
