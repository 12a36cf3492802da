"""An in-process OTLP/HTTP (protobuf) receiver: what a collector would get from the pool.

It decodes `/v1/traces` and `/v1/metrics` requests with the OpenTelemetry protobuf
definitions and keeps the spans and metric points as plain dicts for assertions.
"""

from __future__ import annotations

import gzip
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return _attributes(v.kvlist_value.values)
    return getattr(v, kind) if kind else None


def _attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs if isinstance(kv, KeyValue)}


@dataclass
class Received:
    spans: list[dict[str, Any]] = field(default_factory=list)
    #: The latest data point of each series (process, metric, attributes): metric name, kind,
    #: attributes, value(s), resource. Points are cumulative, so the latest one holds the total.
    points: dict[tuple[Any, ...], dict[str, Any]] = field(default_factory=dict)
    requests: int = 0


class OTLPReceiver:
    """`with OTLPReceiver() as r:` serves on `r.endpoint` until the block ends."""

    def __init__(self) -> None:
        self.received = Received()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == "/v1/traces":
                    receiver._traces(body)
                    reply = ExportTraceServiceResponse().SerializeToString()
                elif self.path == "/v1/metrics":
                    receiver._metrics(body)
                    reply = ExportMetricsServiceResponse().SerializeToString()
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def __enter__(self) -> OTLPReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _traces(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        spans = []
        for rs in request.resource_spans:
            resource = _attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(
                        {
                            "name": s.name,
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent_span_id": s.parent_span_id.hex(),
                            "kind": s.kind,
                            "attributes": _attributes(s.attributes),
                            "status_code": s.status.code,
                            "resource": resource,
                            "duration_ns": s.end_time_unix_nano - s.start_time_unix_nano,
                        }
                    )
        with self._lock:
            self.received.spans += spans
            self.received.requests += 1

    def _metrics(self, body: bytes) -> None:
        request = ExportMetricsServiceRequest.FromString(body)
        points = []
        for rm in request.resource_metrics:
            resource = _attributes(rm.resource.attributes)
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    for p in getattr(m, kind).data_points:
                        point: dict[str, Any] = {
                            "name": m.name,
                            "kind": kind,
                            "unit": m.unit,
                            "attributes": _attributes(p.attributes),
                            "resource": resource,
                        }
                        if kind == "histogram":
                            point.update(count=p.count, sum=p.sum, bounds=list(p.explicit_bounds))
                        else:
                            point["value"] = p.as_double if p.WhichOneof("value") == "as_double" else p.as_int
                        points.append(point)
        with self._lock:
            for point in points:
                series = (
                    point["resource"].get("service.instance.id"),
                    point["name"],
                    json.dumps(point["attributes"], sort_keys=True),
                )
                self.received.points[series] = point
            self.received.requests += 1

    def spans(self, trace_id: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [s for s in self.received.spans if trace_id is None or s["trace_id"] == trace_id]

    def points(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [p for p in self.received.points.values() if p["name"] == name]
