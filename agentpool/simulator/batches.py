"""The Message Batches API of the simulated provider, in Anthropic's wire format: create,
retrieve, list, results (JSONL at `results_url`), cancel and delete.

Time is evaluated lazily, so the simulator needs no background work: a request of a batch is
done `batch_delay_ms` after the batch was created (plus its own `sim: delay`); the batch ends
when every request is done, when it is cancelled (requests not done then are `canceled`), or
at `expires_at` (`batch_expiry_s` after creation; requests not done by then are `expired`).
As in the real API, request counts stay `processing` until the batch ends, and results exist
only once it has. A request answers as `/v1/messages` would (same directives, usage and
prompt cache), or errors with the error `/v1/messages` would have returned (`sim: fail`).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

#: Anthropic's limits on one batch.
MAX_REQUESTS = 100_000
_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

#: One request's outcome: ("succeeded", message) or ("errored", error object).
Answer = Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]


@dataclass
class _Request:
    custom_id: str
    params: dict[str, Any]
    due: float
    result: dict[str, Any] | None = None


@dataclass
class _Batch:
    id: str
    created: float
    expires: float
    requests: list[_Request]
    cancelled: float | None = None
    ended: float | None = None
    counts: dict[str, int] = field(default_factory=dict)


def _rfc3339(unix: float | None) -> str | None:
    if unix is None:
        return None
    return dt.datetime.fromtimestamp(unix, dt.UTC).isoformat().replace("+00:00", "Z")


class BatchDesk:
    """The simulator's batches, kept in memory (`answer` processes one request)."""

    def __init__(self, answer: Answer, *, delay_s: Callable[[], float], expiry_s: Callable[[], float]) -> None:
        self._answer = answer
        self._delay_s = delay_s
        self._expiry_s = expiry_s
        self._batches: dict[str, _Batch] = {}
        self.stats = {"batches": 0, "batch_requests": 0}

    def create(self, requests: Any, delay_of: Callable[[dict[str, Any]], float], now: float) -> _Batch:
        if not isinstance(requests, list) or not requests:
            raise ValueError("requests: must be a non-empty list")
        if len(requests) > MAX_REQUESTS:
            raise ValueError(f"requests: at most {MAX_REQUESTS} requests per batch")
        seen: set[str] = set()
        kept = []
        for i, item in enumerate(requests):
            if not isinstance(item, dict) or not isinstance(item.get("params"), dict):
                raise ValueError(f"requests.{i}: must be an object with custom_id and params")
            custom_id = item.get("custom_id")
            if not isinstance(custom_id, str) or not _CUSTOM_ID.match(custom_id):
                raise ValueError(f"requests.{i}.custom_id: 1-64 letters, digits, '-' or '_'")
            if custom_id in seen:
                raise ValueError(f"requests.{i}.custom_id: {custom_id!r} is used twice in this batch")
            if item["params"].get("stream"):
                raise ValueError(f"requests.{i}.params.stream: batches do not stream")
            seen.add(custom_id)
            kept.append(_Request(custom_id, item["params"], now + self._delay_s() + delay_of(item["params"])))
        batch = _Batch(f"msgbatch_sim_{uuid.uuid4().hex[:24]}", now, now + self._expiry_s(), kept)
        self._batches[batch.id] = batch
        self.stats["batches"] += 1
        self.stats["batch_requests"] += len(kept)
        return batch

    def get(self, batch_id: str) -> _Batch | None:
        return self._batches.get(batch_id)

    def advance(self, batch: _Batch, now: float) -> None:
        """Processes what is due; ends the batch when nothing is left (or it expired)."""
        if batch.ended is not None:
            return
        for request in batch.requests:
            if request.result is not None:
                continue
            if batch.cancelled is not None and request.due > batch.cancelled:
                request.result = {"type": "canceled"}
            elif request.due > batch.expires and now >= batch.expires:
                request.result = {"type": "expired"}
            elif request.due <= now and request.due <= batch.expires:
                kind, body = self._answer(request.params)
                request.result = (
                    {"type": kind, "message": body}
                    if kind == "succeeded"
                    else {
                        "type": "errored",
                        "error": {"type": "error", "error": body, "request_id": f"req_sim_{uuid.uuid4().hex[:24]}"},
                    }
                )
        if all(r.result is not None for r in batch.requests):
            counts = dict.fromkeys(("succeeded", "errored", "canceled", "expired"), 0)
            ends = [batch.created]
            for request in batch.requests:
                kind = str(request.result["type"]) if request.result else "expired"
                counts[kind] += 1
                ends.append({"canceled": batch.cancelled or now, "expired": batch.expires}.get(kind, request.due))
            batch.counts, batch.ended = counts, min(now, max(ends))

    def cancel(self, batch: _Batch, now: float) -> None:
        if batch.ended is None and batch.cancelled is None:
            batch.cancelled = now

    def delete(self, batch: _Batch) -> None:
        del self._batches[batch.id]

    def listed(self, limit: int) -> list[_Batch]:
        return sorted(self._batches.values(), key=lambda b: b.created, reverse=True)[:limit]


def batch_json(batch: _Batch, base_url: str) -> dict[str, Any]:
    """A `MessageBatch` object as the API returns it."""
    ended = batch.ended is not None
    counts = batch.counts if ended else {"succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
    status = "ended" if ended else "canceling" if batch.cancelled is not None else "in_progress"
    return {
        "id": batch.id,
        "type": "message_batch",
        "processing_status": status,
        "request_counts": {"processing": 0 if ended else len(batch.requests), **counts},
        "created_at": _rfc3339(batch.created),
        "expires_at": _rfc3339(batch.expires),
        "ended_at": _rfc3339(batch.ended),
        "cancel_initiated_at": _rfc3339(batch.cancelled),
        "archived_at": None,
        "results_url": f"{base_url}/v1/messages/batches/{batch.id}/results" if ended else None,
    }


def add_batch_routes(app: web.Application, desk: BatchDesk, *, read_json: Any, delay_of: Any) -> None:
    """The batch endpoints, on the simulator's app (`read_json` checks the key and the body)."""

    def payload(kind: str, message: str) -> dict[str, Any]:
        return {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_sim_batch"}

    def error(status: int, kind: str, message: str) -> web.Response:
        return web.json_response(payload(kind, message), status=status)

    def base(request: web.Request) -> str:
        return f"{request.scheme}://{request.host}"

    def found(request: web.Request) -> _Batch:
        """The batch the path names, brought up to date; a 404 as the API answers it if none."""
        batch = desk.get(request.match_info["batch_id"])
        if batch is None:
            message = f"message batch {request.match_info['batch_id']!r} not found"
            body = json.dumps(payload("not_found_error", message))
            raise web.HTTPNotFound(text=body, content_type="application/json")
        desk.advance(batch, time.time())
        return batch

    async def create(request: web.Request) -> web.Response:
        try:
            body = await read_json(request)
        except Exception as exc:  # the messages endpoint's own checks: key, size, JSON
            status = getattr(exc, "status", 400)
            return error(status, "invalid_request_error", getattr(exc, "message", str(exc)))
        try:
            batch = desk.create(body.get("requests"), delay_of, time.time())
        except ValueError as exc:
            return error(400, "invalid_request_error", str(exc))
        return web.json_response(batch_json(batch, base(request)))

    async def retrieve(request: web.Request) -> web.Response:
        return web.json_response(batch_json(found(request), base(request)))

    async def results(request: web.Request) -> web.StreamResponse:
        batch = found(request)
        if batch.ended is None:
            return error(400, "invalid_request_error", "the batch has not ended: its results are not ready")
        lines = (json.dumps({"custom_id": r.custom_id, "result": r.result}) for r in batch.requests)
        return web.Response(body="\n".join(lines) + "\n", content_type="application/binary")

    async def cancel(request: web.Request) -> web.Response:
        batch = found(request)
        desk.cancel(batch, time.time())
        desk.advance(batch, time.time())
        return web.json_response(batch_json(batch, base(request)))

    async def delete(request: web.Request) -> web.Response:
        batch = found(request)
        if batch.ended is None:
            return error(400, "invalid_request_error", "a batch can be deleted only once it has ended")
        desk.delete(batch)
        return web.json_response({"id": batch.id, "type": "message_batch_deleted"})

    async def listing(request: web.Request) -> web.Response:
        limit = min(max(int(request.query.get("limit", "20")), 1), 1000)
        batches = desk.listed(limit)
        for batch in batches:
            desk.advance(batch, time.time())
        data = [batch_json(b, base(request)) for b in batches]
        first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
        return web.json_response({"data": data, "has_more": False, "first_id": first, "last_id": last})

    app.router.add_post("/v1/messages/batches", create)
    app.router.add_get("/v1/messages/batches", listing)
    app.router.add_get("/v1/messages/batches/{batch_id}", retrieve)
    app.router.add_get("/v1/messages/batches/{batch_id}/results", results)
    app.router.add_post("/v1/messages/batches/{batch_id}/cancel", cancel)
    app.router.add_delete("/v1/messages/batches/{batch_id}", delete)
