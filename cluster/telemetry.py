"""Telemetry set-up in each process of a pool, from the standard OpenTelemetry variables.

`AgentPool.start` checks the variables (`check_env`) and hands every `OTEL_*` variable of
the starting process to each actor's runtime env (`exported_env`), so that a pool on a
`ray up` cluster exports exactly as configured where it was started. Each actor calls
`setup(role)` in its constructor and `flush()` before the pool stops it.

Understood, as the specification defines them:

| variable | values |
|---|---|
| `OTEL_SERVICE_NAME` | the `service.name` resource attribute (default `agentpool`) |
| `OTEL_RESOURCE_ATTRIBUTES` | more resource attributes |
| `OTEL_TRACES_EXPORTER` | `otlp`, `console`, `none` (comma-separated) |
| `OTEL_METRICS_EXPORTER` | `otlp`, `prometheus`, `console`, `none` |
| `OTEL_EXPORTER_OTLP_ENDPOINT` (and `_TRACES_`/`_METRICS_` forms) | the collector |
| `OTEL_EXPORTER_OTLP_PROTOCOL` (and per-signal forms) | `http/protobuf` (default); `grpc` (its exporter installed) |
| `OTEL_EXPORTER_PROMETHEUS_HOST` / `_PORT` | where `/metrics` is served (default `localhost:9464`) |
| `OTEL_BSP_*`, `OTEL_METRIC_EXPORT_INTERVAL`, `OTEL_EXPORTER_OTLP_HEADERS`, ... | read by the SDK itself |

One departure from the specification: with `OTEL_TRACES_EXPORTER` unset, traces are
exported over OTLP only when an OTLP endpoint is set (the specification's default, `otlp`,
would have every actor of a pool on a laptop log connection errors to a collector that is
not there); the same for metrics.

Every actor process on a host serves its own `/metrics`: the first on the configured port,
the others on a free port each. `AgentPool.metrics_targets()` lists them all, in the JSON
of Prometheus's file-based service discovery.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

log = logging.getLogger(__name__)

_TRACES = ("otlp", "console", "none")
_METRICS = ("otlp", "prometheus", "console", "none")
_PROTOCOLS = ("http/protobuf", "grpc")
DEFAULT_SERVICE_NAME = "agentpool"


class TelemetryConfigError(ValueError):
    """The `OTEL_*` variables ask for something this process cannot do."""


@dataclass
class Telemetry:
    """What `setup` installed in this process."""

    role: str = ""
    traces: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    #: `host:port` of this process's Prometheus endpoint, if it serves one.
    metrics_endpoint: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.traces or self.metrics)


_STATE: Telemetry | None = None


def exported_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The `OTEL_*` variables of this process, for the runtime env of every actor."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k.startswith("OTEL_")}


def _listed(environ: Mapping[str, str], name: str, allowed: tuple[str, ...], signal: str) -> list[str]:
    raw = environ.get(name, "").strip().lower()
    if not raw:  # see the module docstring: OTLP only when a collector is named
        endpoint = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
        return ["otlp"] if endpoint else []
    chosen = [part.strip() for part in raw.split(",") if part.strip()]
    unknown = [c for c in chosen if c not in allowed]
    if unknown:
        raise TelemetryConfigError(f"{name}={raw!r}: unknown exporter {unknown[0]!r}; use one of {', '.join(allowed)}")
    return [c for c in chosen if c != "none"]


def _protocol(environ: Mapping[str, str], signal: str) -> str:
    protocol = (
        environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
    ).strip().lower() or "http/protobuf"
    if protocol not in _PROTOCOLS:
        raise TelemetryConfigError(
            f"OTLP protocol {protocol!r} is not supported here; use http/protobuf (or grpc with "
            "opentelemetry-exporter-otlp-proto-grpc installed)"
        )
    return protocol


def check_env(environ: Mapping[str, str] | None = None) -> tuple[list[str], list[str]]:
    """The trace and metric exporters the variables ask for.

    Raises:
        TelemetryConfigError: On an unknown exporter or protocol, or a gRPC exporter that is
            not installed.
    """
    environ = os.environ if environ is None else environ
    traces = _listed(environ, "OTEL_TRACES_EXPORTER", _TRACES, "TRACES")
    metric_exporters = _listed(environ, "OTEL_METRICS_EXPORTER", _METRICS, "METRICS")
    for signal, chosen in (("TRACES", traces), ("METRICS", metric_exporters)):
        if "otlp" in chosen and _protocol(environ, signal) == "grpc":
            try:
                import opentelemetry.exporter.otlp.proto.grpc  # noqa: F401
            except ImportError:
                raise TelemetryConfigError(
                    "OTLP over gRPC needs `pip install opentelemetry-exporter-otlp-proto-grpc`; "
                    "or set OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf"
                ) from None
    return traces, metric_exporters


def _span_exporter(name: str, environ: Mapping[str, str]) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    if _protocol(environ, "TRACES") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter

        return GrpcSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def _metric_reader(name: str, environ: Mapping[str, str], state: Telemetry) -> MetricReader:
    if name == "console":
        return PeriodicExportingMetricReader(ConsoleMetricExporter())
    if name == "prometheus":
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        reader = PrometheusMetricReader()
        state.metrics_endpoint = _serve_prometheus(environ)
        return reader
    if _protocol(environ, "METRICS") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter

        return PeriodicExportingMetricReader(GrpcMetricExporter())
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    return PeriodicExportingMetricReader(OTLPMetricExporter())


def _serve_prometheus(environ: Mapping[str, str]) -> str:
    """Serves this process's `/metrics`: on the configured port if it is free, else on any."""
    from prometheus_client import start_http_server

    host = environ.get("OTEL_EXPORTER_PROMETHEUS_HOST", "localhost")
    port = int(environ.get("OTEL_EXPORTER_PROMETHEUS_PORT", "9464"))
    try:
        server, _ = start_http_server(port, addr=host)
    except OSError:  # another process of this host has it
        server, _ = start_http_server(0, addr=host)
    bound = server.server_port
    advertised = host if host not in ("0.0.0.0", "::", "") else socket.gethostbyname(socket.gethostname())
    return f"{advertised}:{bound}"


def setup(role: str, environ: Mapping[str, str] | None = None) -> Telemetry:
    """Installs the SDK in this process as the variables say (once; later calls return the
    first set-up). Never raises: an actor runs without telemetry rather than not at all."""
    global _STATE
    if _STATE is not None:
        return _STATE
    environ = os.environ if environ is None else environ
    state = Telemetry(role=role)
    try:
        state.traces, state.metrics = check_env(environ)
        if not state.enabled:
            _STATE = state
            return state
        resource = Resource.create(
            {
                "service.name": environ.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME,
                "service.instance.id": f"{role}-{socket.gethostname()}-{os.getpid()}",
                "process.pid": os.getpid(),
                "host.name": socket.gethostname(),
                "agentpool.role": role,
            }
        )
        if state.traces:
            provider = TracerProvider(resource=resource)
            for name in state.traces:
                provider.add_span_processor(BatchSpanProcessor(_span_exporter(name, environ)))
            trace.set_tracer_provider(provider)
            state.tracer_provider = provider
        if state.metrics:
            readers = [_metric_reader(name, environ, state) for name in state.metrics]
            meter_provider = MeterProvider(resource=resource, metric_readers=readers)
            metrics.set_meter_provider(meter_provider)
            state.meter_provider = meter_provider
    except Exception as exc:  # a bad variable must not stop an actor (AgentPool.start checks them first)
        log.warning("telemetry not set up in %s: %s", role, exc)
    _STATE = state
    return state


def state() -> Telemetry:
    """This process's telemetry (nothing installed if `setup` was never called)."""
    return _STATE or Telemetry()


def flush(timeout_ms: int = 5000) -> bool:
    """Exports what this process holds (spans, metrics) now; True if everything went out."""
    current = state()
    ok = True
    if current.tracer_provider is not None:
        ok = current.tracer_provider.force_flush(timeout_ms) and ok
    if current.meter_provider is not None:
        ok = current.meter_provider.force_flush(timeout_ms) and ok
    return ok


class Telemetered:
    """Mixin of every pool actor: its telemetry set up at start, flushed on request."""

    def _setup_telemetry(self, role: str) -> None:
        setup(role)

    def flush_telemetry(self) -> bool:
        """Exports this process's buffered spans and metrics (the pool calls it before stopping)."""
        return flush()

    def telemetry_info(self) -> dict[str, Any]:
        """Which exporters this process runs, and where it serves `/metrics`, if anywhere."""
        current = state()
        return {
            "role": current.role,
            "pid": os.getpid(),
            "traces": current.traces,
            "metrics": current.metrics,
            "metrics_endpoint": current.metrics_endpoint,
        }
