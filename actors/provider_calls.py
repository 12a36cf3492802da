"""How an agent worker's tasks reach the provider (no Ray): the worker's one SDK client,
the lane each task's calls take (real time, or the worker's batch lane), the response cache
in front, and the spend of every call the provider answered, by lane and model."""

from __future__ import annotations

import functools
import time

import anthropic
import httpx2
from pydantic import SecretStr

from agentpool import events
from agentpool.actors.backoff import Backoff
from agentpool.actors.batch_lane import BatchLane
from agentpool.actors.cached_calls import through_cache
from agentpool.actors.checkpoint import LoopState
from agentpool.actors.gate import TaskGate
from agentpool.actors.lane_calls import through_batch_lane
from agentpool.actors.llm import LLMClient
from agentpool.actors.session_task import CallLLM
from agentpool.background import Background
from agentpool.cluster.store import ResultStore
from agentpool.config import PoolConfig
from agentpool.lanes import lane_of
from agentpool.models import AgentTask, TenantPolicy
from agentpool.pricing import PriceTable
from agentpool.response_cache import cache_mode
from agentpool.secrets import Scrubber
from agentpool.vocabulary import Lane


class ProviderCalls:
    """One worker's way to the provider, shared by all its agent loops."""

    def __init__(
        self,
        config: PoolConfig,
        *,
        api_key: SecretStr,
        base_url: str | None,
        scrub: Scrubber,
        prices: PriceTable,
        store: ResultStore,
    ) -> None:
        self._config = config
        self._api_key = api_key
        self._base_url = base_url
        self._scrub = scrub
        self._prices = prices
        self._llm: LLMClient | None = None
        self._responses = store.responses
        self._spend = store.spend
        self._spending = Background()
        #: This worker's batch lane, made when its first batch-lane task comes.
        self._batches: BatchLane | None = None

    def client(self) -> LLMClient:
        # Built on first use, inside the actor's event loop, and shared by all its loops:
        # one connection pool per process rather than per task. The SDK's aiohttp transport:
        # httpx's pool checks every connection on each request, which with 64 calls in
        # flight cost the worker about a third of its CPU.
        if self._llm is None:
            config = self._config
            limits = httpx2.Limits(
                max_connections=config.worker_concurrency * 2, max_keepalive_connections=config.worker_concurrency
            )
            client = anthropic.AsyncAnthropic(
                api_key=self._api_key.get_secret_value(),
                base_url=self._base_url,
                max_retries=0,
                timeout=config.llm_request_timeout_s,
                http_client=anthropic.DefaultAioHttpClient(limits=limits, timeout=config.llm_request_timeout_s),
                # Our `chat {model}` span covers each attempt (the SDK's own span would be a
                # second one per call, counting the same tokens again), and the trace context
                # stays inside the pool rather than going out to the provider.
                open_telemetry={"traces": {"enabled": False}, "propagation": False},
            )
            self._llm = LLMClient(client, Backoff(config.retry), clock=time.monotonic, scrub=self._scrub)
        return self._llm

    def for_task(self, task: AgentTask, policy: TenantPolicy, gate: TaskGate, state: LoopState | None) -> CallLLM:
        """The task's LLM call: its lane, behind the response cache when it may use it."""
        return through_cache(
            self._lane_call(task, gate, state),
            self._responses,
            tenant=task.tenant,
            mode=cache_mode(task.cache, policy.cache),
            ttl_s=policy.cache_ttl_s,
            prices=self._prices,
        )

    def _lane_call(self, task: AgentTask, gate: TaskGate, state: LoopState | None) -> CallLLM:
        """On the real-time lane, or through this worker's batch lane until the task's time
        for it runs out."""
        realtime = functools.partial(self.client().create, gate=gate, stream=task.stream)
        lanes = self._config.batch_lane
        if lane_of(task, lanes) is not Lane.BATCH:
            return realtime
        if self._batches is None:
            self._batches = BatchLane(lambda: self.client().sdk, lanes)
        left_s = task.timeout_s - (state.elapsed_s if state is not None else 0.0)
        give_up_at = time.monotonic() + left_s - lanes.realtime_reserve_s
        return through_batch_lane(realtime, self._batches, gate, give_up_at=lambda: give_up_at)

    def spent(self, tenant: str, call: events.LlmCall | events.SessionCompacted) -> None:
        """Adds a provider call's spend (an agent turn, or a session's summary) to its
        tenant's day, by model and lane, off the loop's path (`agentpool cost`); a write that
        fails loses only this report's line."""
        if call.cached:
            return
        price = self._prices.price(call.model)
        factor = price.batch_factor if price is not None and call.lane is Lane.BATCH else 1.0
        record = self._spend.record(
            tenant, model=call.model, lane=call.lane, cost_usd=call.cost_usd, list_usd=call.cost_usd / factor
        )
        self._spending.spawn(record, then=lambda done: done.cancelled() or done.exception())
