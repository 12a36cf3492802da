"""Traces and metrics through the OpenTelemetry API: span names and attributes after the
GenAI semantic conventions, the pool's instruments, and W3C trace-context propagation.

Only the API lives here. Until `cluster.telemetry.setup` installs the SDK in a process (it
does when the standard `OTEL_*` variables ask for an exporter) every call below is a no-op
costing about a microsecond, so the hot path pays nothing for telemetry that is off.

One task is one trace: the submitting process opens it (or continues the caller's own
trace), and each process the task passes through continues it from the `traceparent` the
task carries: the scheduler (`invoke_agent`, `queue_wait`), the worker (`agent_run`,
`chat {model}` per LLM attempt, `execute_tool {name}`) and the tool executor
(`run_tool {name}`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

#: `gen_ai.provider.name` of every LLM span and metric.
PROVIDER = "anthropic"
#: The standard switch for recording prompt and completion content on spans.
CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
#: Content attributes longer than this are cut (a conversation can be megabytes).
CONTENT_MAX_CHARS = 32_000

# Bucket boundaries the GenAI conventions give for their two client histograms.
TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864]
DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]
#: Whole tasks and queue waits run longer than one LLM call.
TASK_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640, 1280]

_PROPAGATOR = TraceContextTextMapPropagator()
tracer = trace.get_tracer("agentpool")
meter = metrics.get_meter("agentpool")

# --- instruments (proxies until a MeterProvider is installed) -------------------------------

token_usage = meter.create_histogram(
    "gen_ai.client.token.usage",
    unit="{token}",
    description="Number of input and output tokens used.",
    explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
)
operation_duration = meter.create_histogram(
    "gen_ai.client.operation.duration",
    unit="s",
    description="GenAI operation duration.",
    explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
)
tasks_ended = meter.create_counter(
    "agentpool.tasks", unit="{task}", description="Tasks that reached a final status, by tenant and status."
)
task_duration = meter.create_histogram(
    "agentpool.task.duration",
    unit="s",
    description="Time from admission to the final record, by tenant and status.",
    explicit_bucket_boundaries_advisory=TASK_BUCKETS,
)
queue_wait = meter.create_histogram(
    "agentpool.queue.wait",
    unit="s",
    description="Time a task waited in the scheduler's queue for a worker slot.",
    explicit_bucket_boundaries_advisory=TASK_BUCKETS,
)
shed = meter.create_counter("agentpool.shed", unit="{task}", description="Tasks rejected at admission, by reason.")
permit_wait = meter.create_histogram(
    "agentpool.permit.wait",
    unit="s",
    description="Time an LLM attempt waited for rate-limit permits.",
    explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
)
tokens = meter.create_counter(
    "agentpool.tokens", unit="{token}", description="Tokens used, by tenant, model and token type."
)
cost = meter.create_counter("agentpool.cost", unit="USD", description="Spend, by tenant and model.")
escalations = meter.create_counter(
    "agentpool.escalations", unit="{escalation}", description="Routed tasks moved up to a stronger model, by reason."
)
response_cache = meter.create_counter(
    "agentpool.response_cache", unit="{call}", description="Response-cache lookups, by tenant and result (hit, miss)."
)
tool_calls = meter.create_counter("agentpool.tool.calls", unit="{call}", description="Tool calls, by tool and outcome.")
tool_duration = meter.create_histogram(
    "agentpool.tool.duration",
    unit="s",
    description="Tool call duration as the worker saw it.",
    explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
)
alerts = meter.create_counter("agentpool.alerts", unit="{alert}", description="Alerts raised, by tenant and kind.")
rollout_tasks = meter.create_counter(
    "agentpool.rollout.tasks",
    unit="{task}",
    description="Tasks of a live rollout that ended, by agent, version, side (stable, canary, shadow) and status.",
)
rollout_transitions = meter.create_counter(
    "agentpool.rollout.transitions", unit="{transition}", description="Rollout changes, by agent and phase."
)


# --- trace context -----------------------------------------------------------------------


def context_of(traceparent: str) -> otel_context.Context:
    """A context whose current span is the remote one `traceparent` names (empty if none)."""
    if not traceparent:
        return otel_context.Context()
    return _PROPAGATOR.extract({"traceparent": traceparent})


def current_traceparent(fallback: str = "") -> str:
    """The W3C `traceparent` of the current span; `fallback` when no span is recording."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent", fallback)


def span_traceparent(span: trace.Span, fallback: str = "") -> str:
    """The `traceparent` naming `span`, to hand to the next process; `fallback` if it is invalid."""
    if not span.get_span_context().is_valid:
        return fallback
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", fallback)


def trace_id_of(traceparent: str) -> str:
    """The 32-hex trace id inside a `traceparent` ("" if it is malformed)."""
    parts = traceparent.split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else ""


def capture_content() -> bool:
    """Whether prompt and completion content go on spans (off unless explicitly enabled)."""
    return os.environ.get(CAPTURE_CONTENT_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def content(value: Any) -> str:
    """A content attribute's value: JSON, cut at `CONTENT_MAX_CHARS`."""
    text = value if isinstance(value, str) else json.dumps(value, default=str, separators=(",", ":"))
    return text if len(text) <= CONTENT_MAX_CHARS else text[:CONTENT_MAX_CHARS] + "...[truncated]"


# --- GenAI attributes --------------------------------------------------------------------


def usage_attributes(usage: Mapping[str, Any] | None) -> dict[str, int]:
    """Span attributes of an Anthropic `usage` object, by the conventions' Anthropic rule:
    `gen_ai.usage.input_tokens` counts every input token, cache reads and writes included
    (Anthropic's own `input_tokens` excludes them), and the cache counts go alongside."""
    usage = usage or {}
    cache_read = int(usage.get("cache_read_input_tokens") or 0)
    cache_write = int(usage.get("cache_creation_input_tokens") or 0)
    return {
        "gen_ai.usage.input_tokens": int(usage.get("input_tokens") or 0) + cache_read + cache_write,
        "gen_ai.usage.output_tokens": int(usage.get("output_tokens") or 0),
        "gen_ai.usage.cache_read.input_tokens": cache_read,
        "gen_ai.usage.cache_creation.input_tokens": cache_write,
    }


def chat_attributes(model: str, request: Mapping[str, Any], server: tuple[str, int] | None) -> dict[str, Any]:
    """The attributes a `chat {model}` span starts with (request side)."""
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": PROVIDER,
        "gen_ai.request.model": model,
    }
    if "max_tokens" in request:
        attributes["gen_ai.request.max_tokens"] = int(request["max_tokens"])
    for key in ("temperature", "top_p", "top_k"):
        if request.get(key) is not None:
            attributes[f"gen_ai.request.{key}"] = request[key]
    if server is not None:
        attributes["server.address"], attributes["server.port"] = server
    return attributes


def metric_attributes(span_attributes: Mapping[str, Any]) -> dict[str, Any]:
    """The low-cardinality subset of a `chat` span's attributes that the GenAI metrics carry."""
    keep = (
        "gen_ai.operation.name",
        "gen_ai.provider.name",
        "gen_ai.request.model",
        "gen_ai.response.model",
        "server.address",
        "server.port",
        "error.type",
    )
    return {k: span_attributes[k] for k in keep if k in span_attributes}


class ChatSpan:
    """One LLM attempt as a `chat {model}` client span plus the two GenAI client metrics.

    Exactly one of `succeeded`, `failed` ends it.
    """

    def __init__(self, model: str, request: Mapping[str, Any], server: tuple[str, int] | None) -> None:
        self._attributes = chat_attributes(model, request, server)
        self._started = time.perf_counter()
        self.span = tracer.start_span(f"chat {model}", kind=trace.SpanKind.CLIENT, attributes=self._attributes)
        if capture_content() and self.span.is_recording():
            if request.get("system"):
                self.span.set_attribute("gen_ai.system_instructions", content(request["system"]))
            self.span.set_attribute("gen_ai.input.messages", content(request.get("messages", [])))

    def _end(self) -> None:
        self.span.end()
        operation_duration.record(time.perf_counter() - self._started, metric_attributes(self._attributes))

    def succeeded(self, body: Mapping[str, Any]) -> None:
        """Ends the span with the response's model, id, finish reason and usage."""
        self._attributes["gen_ai.response.model"] = str(body.get("model", ""))
        response = {
            "gen_ai.response.model": self._attributes["gen_ai.response.model"],
            "gen_ai.response.id": str(body.get("id", "")),
            "gen_ai.response.finish_reasons": [str(body.get("stop_reason") or "")],
            **usage_attributes(body.get("usage")),
        }
        self.span.set_attributes(response)
        if capture_content() and self.span.is_recording():
            message = [{"role": "assistant", "content": body.get("content", [])}]
            self.span.set_attribute("gen_ai.output.messages", content(message))
        labels = metric_attributes(self._attributes)
        token_usage.record(response["gen_ai.usage.input_tokens"], {**labels, "gen_ai.token.type": "input"})
        token_usage.record(response["gen_ai.usage.output_tokens"], {**labels, "gen_ai.token.type": "output"})
        self._end()

    def failed(self, error_type: str, message: str) -> None:
        """Ends the span as an error (`error.type`: the provider's error type, or the
        exception's class for a connection error or a cancellation)."""
        self._attributes["error.type"] = error_type or "_OTHER"
        self.span.set_attribute("error.type", self._attributes["error.type"])
        self.span.set_status(trace.Status(trace.StatusCode.ERROR, message[:500]))
        self._end()
