"""What the HTTP API reads and answers: request bodies (bounded, parsed, checked), the
shapes of its answers and errors, and its per-request metrics."""

import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentpool.cluster.front import StoredResponse
from agentpool.http.gateway import Gateway
from agentpool.models import AgentResult
from agentpool.vocabulary import ErrorReason, TaskStatus
from agentpool.webhooks import WebhookEvent

_BodyT = TypeVar("_BodyT", bound=BaseModel)


class WebhookBody(BaseModel):
    url: str = Field(max_length=2048)
    events: list[str] = Field(default_factory=lambda: [WebhookEvent.RUN_COMPLETED.value], max_length=10)
    description: str = Field(default="", max_length=200)


class ApprovalBody(BaseModel):
    approved: bool
    note: str = Field(default="", max_length=2000)


def problem(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"message": message, **extra}}, status_code=status)


def task_from(body: Any, tenant: str, index: int | None = None) -> dict[str, Any]:
    """A task's fields from a request body, with the tenant of the key (a body naming
    another tenant is refused: the key decides)."""
    if not isinstance(body, dict):
        where = "" if index is None else f" (task {index})"
        raise HTTPException(422, f"a task is a JSON object{where}")
    named = body.get("tenant")
    if named is not None and named != tenant:
        raise HTTPException(422, "the tenant comes from the API key; the body names another")
    return {**body, "tenant": tenant}


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused (413) past `limit` bytes without reading further."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise HTTPException(413, f"the body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def body_as(model: type[_BodyT], raw: bytes) -> _BodyT:
    """A small JSON body as `model` (whatever its Content-Type says), or 422 with the
    problems (never the values)."""
    try:
        return model.model_validate(parse_json(raw))
    except ValidationError as exc:
        problems = [{"loc": e["loc"], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        raise HTTPException(422, {"message": "the body is not valid", "problems": problems}) from None


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPException(400, f"the body is not JSON: {exc}"[:300]) from None


def run_reply(task_id: str, status: str, record: AgentResult | None) -> StoredResponse:
    """The answer to a run's admission: 202 for an accepted run (or one that ended already),
    429 with `Retry-After` if the pool shed it, 409 (with `Retry-After`) if its session is
    running another task and it asked `on_busy="reject"`, 403 if it was refused for good."""
    location = f"/v1/runs/{task_id}"
    body: dict[str, Any] = {"task_id": task_id, "status": status, "url": location}
    if status != TaskStatus.REJECTED or record is None:
        return StoredResponse(202, body, location)
    body["result"] = record.model_dump(mode="json")
    if record.error is not None and record.error.reason == ErrorReason.SESSION_BUSY:
        return StoredResponse(409, body, location, str(max(1, round(record.retry_after_s or 1))))
    if record.retry_after_s is not None:
        return StoredResponse(429, body, location, str(max(1, round(record.retry_after_s))))
    return StoredResponse(403, body, location)


class RequestMetrics:
    """Counts every response by method, route and status, and times it (a plain ASGI
    middleware: Starlette's BaseHTTPMiddleware costs a task and a stream per request)."""

    def __init__(self, app: ASGIApp, gateway: Callable[[], Gateway | None]) -> None:
        self._app = app
        self._gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                g = self._gateway()
                if g is not None:
                    route = getattr(scope.get("route"), "path", "unmatched")
                    g.metrics.requests.labels(scope["method"], route, str(status)).inc()
                    g.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - started)
            await send(message)

        await self._app(scope, receive, sending)


def stored_response(stored: StoredResponse) -> JSONResponse:
    response = JSONResponse(stored.body, status_code=stored.status_code)
    if stored.location:
        response.headers["Location"] = stored.location
    if stored.retry_after:
        response.headers["Retry-After"] = stored.retry_after
    return response


def batch_bodies(raw: bytes, content_type: str, limit: int) -> list[Any]:
    """A batch body's tasks: JSON `{"tasks": [...]}` (or a bare list), or JSONL."""
    bodies: list[Any] = []
    if "jsonl" in content_type or "ndjson" in content_type:
        for number, line in enumerate(raw.splitlines(), start=1):
            if line.strip():
                try:
                    bodies.append(json.loads(line))
                except (ValueError, UnicodeDecodeError):
                    raise HTTPException(400, f"line {number} of the body is not JSON") from None
    else:
        parsed = parse_json(raw)
        listed = parsed.get("tasks") if isinstance(parsed, dict) else parsed
        if not isinstance(listed, list):
            raise HTTPException(422, 'a batch is {"tasks": [...]} or JSONL')
        bodies = listed
    if not bodies:
        raise HTTPException(422, "the batch has no tasks")
    if len(bodies) > limit:
        raise HTTPException(413, f"the batch has {len(bodies)} tasks; at most {limit}")
    return bodies
