"""The HTTP API (FastAPI, served by Ray Serve: `agentpool.http.serve`).

Every pattern a service uses to call agents: start a run and poll it (`POST /v1/runs`,
`GET /v1/runs/{id}`), start one and wait for it (`POST /v1/runs/wait`), follow one live
over Server-Sent Events that resume with `Last-Event-ID`, batches of up to 100,000 tasks,
cancellation and approvals. The tenant comes from the API key (`Authorization: Bearer`),
never from the body; another tenant's run is a 404. Bad requests get a 4xx with a reason,
and nothing is enqueued for them.
"""

import asyncio
import contextlib
import hashlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Annotated, Any

import ray
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import generate_latest
from redis.exceptions import RedisError
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from agentpool.cluster.api_keys import ApiKey
from agentpool.cluster.front import IdemState, StoredResponse
from agentpool.errors import AgentPoolError, InvalidTaskInput
from agentpool.http.gateway import Gateway
from agentpool.http.messages import (
    ApprovalBody,
    RequestMetrics,
    WebhookBody,
    batch_bodies,
    body_as,
    parse_json,
    problem,
    read_body,
    run_reply,
    stored_response,
    task_from,
)
from agentpool.http.sessions import session_routes
from agentpool.models import AgentResult, AgentTask, TaskState, validate_tasks
from agentpool.protocol import new_trace_id, pack, traceparent
from agentpool.vocabulary import EventType, TaskPhase, TaskStatus
from agentpool.webhooks import check_endpoint, new_secret

_ENTRY_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
_TASK_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
#: Tasks per `enqueue` call when a batch is sent to the scheduler.
_CHUNK = 1000


def build_app(connect: Callable[[], Awaitable[Gateway]]) -> FastAPI:
    """The API's app; `connect` gives the replica's `Gateway` at start-up."""
    holder: dict[str, Gateway] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        holder["gw"] = await connect()
        try:
            yield
        finally:
            await holder["gw"].close()

    app = FastAPI(
        lifespan=lifespan,
        title="agentpool",
        version="1",
        summary="Agent runs on a Ray pool: start, wait, poll, follow live, cancel, approve, batch.",
    )

    def gw() -> Gateway:
        return holder["gw"]

    app.add_middleware(RequestMetrics, gateway=lambda: holder.get("gw"))

    async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
        response = problem(503, f"the pool cannot answer now: {type(exc).__name__}", retryable=True)
        response.headers["Retry-After"] = "1"
        return response

    for unavailable in (RedisError, OSError, ray.exceptions.RayError):
        app.add_exception_handler(unavailable, _unavailable)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, dict) else {"message": str(exc.detail)}
        return JSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _malformed(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return problem(422, "the request is not valid", problems=problems[:50])

    @app.exception_handler(InvalidTaskInput)
    async def _invalid(request: Request, exc: InvalidTaskInput) -> JSONResponse:
        return problem(422, exc.message, problems=exc.problems[:50])

    @app.exception_handler(AgentPoolError)
    async def _refused(request: Request, exc: AgentPoolError) -> JSONResponse:
        return problem(422 if not exc.retryable else 503, exc.message, type=type(exc).__name__)

    async def tenant_key(request: Request) -> ApiKey:
        """The caller's API key (401 without a valid one; 429 once its address has failed
        too often). A valid key is never refused for its address's failures: behind HAProxy
        (or any shared proxy) every client has the same address, and one client retrying a
        revoked key must not lock the others out. Neither the key nor its hash is logged."""
        g = gw()
        source = request.client.host if request.client else "unknown"
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        key, failures = await g.api_keys.check(presented.strip() if scheme.lower() == "bearer" else "", source)
        if key is not None:
            return key
        if failures >= g.http.auth_failures_per_window:
            raise HTTPException(
                429, "too many failed authentications", headers={"Retry-After": str(g.http.auth_failure_window_s)}
            )
        await g.api_keys.failed(source, g.http.auth_failure_window_s)
        raise HTTPException(401, "a valid API key is required", headers={"WWW-Authenticate": "Bearer"})

    Tenant = Annotated[ApiKey, Depends(tenant_key)]

    async def owned(task_id: str, key: ApiKey, *, progress: bool = False) -> TaskState:
        """The task's state if it is the key's tenant's; 404 otherwise (another tenant's
        task is indistinguishable from none). Its progress (read from its events by the
        scheduler) only when asked: most callers need only where it is."""
        if not _TASK_ID.match(task_id):
            raise HTTPException(404, "no such run")
        state: TaskState | None = await gw().scheduler.where.remote(task_id, key.tenant, progress=progress)
        if state is None:
            raise HTTPException(404, "no such run")
        return state

    async def idempotent(
        request: Request, key: ApiKey, raw: bytes, handle: Callable[[], Awaitable[StoredResponse]]
    ) -> Response:
        """Runs `handle` once per `Idempotency-Key` (when given): a retry gets the stored
        response, a concurrent one 409, the same key with another request 422."""
        g = gw()
        idem = request.headers.get("idempotency-key")
        if idem is None:
            return stored_response(await handle())
        if not 1 <= len(idem) <= 255:
            raise HTTPException(400, "Idempotency-Key must be 1 to 255 characters")
        fingerprint = hashlib.sha256(f"{request.method} {request.url.path}\n".encode() + raw).hexdigest()
        ttl = g.http.idempotency_ttl_s
        claim = await g.store.claim(key.tenant, idem, fingerprint, ttl)
        if isinstance(claim, StoredResponse):
            response = stored_response(claim)
            response.headers["Idempotent-Replayed"] = "true"
            return response
        if claim == IdemState.BUSY:
            raise HTTPException(409, "a request with this Idempotency-Key is in progress")
        if claim == IdemState.MISMATCH:
            raise HTTPException(422, "this Idempotency-Key was used with a different request")
        try:
            stored = await handle()
        except BaseException:
            await g.store.release(key.tenant, idem)
            raise
        if stored.status_code < 500:
            await g.store.remember(key.tenant, idem, fingerprint, stored, ttl)
        else:
            await g.store.release(key.tenant, idem)
        return stored_response(stored)

    async def record(tenant: str, task_id: str) -> AgentResult | None:
        raw = await gw().store.result_json(tenant, task_id)
        return AgentResult.model_validate_json(raw) if raw else None

    # --- runs --------------------------------------------------------------------------

    def run_body(raw: bytes, key: ApiKey, session_id: str | None) -> AgentTask:
        body = task_from(parse_json(raw), key.tenant)
        if session_id is not None:
            if body.get("session_id") not in (None, session_id):
                raise HTTPException(422, "the session comes from the URL; the body names another")
            body["session_id"] = session_id
        return validate_tasks([body], tools=gw().tools)[0]

    async def start_run(request: Request, key: ApiKey, session_id: str | None = None) -> Response:
        raw = await read_body(request, gw().http.max_run_bytes)

        async def handle() -> StoredResponse:
            task = run_body(raw, key, session_id)
            (reply,) = await gw().scheduler.enqueue.remote([task], [traceparent(new_trace_id())])
            ended = await record(key.tenant, task.task_id) if reply["status"] == TaskStatus.REJECTED else None
            return run_reply(task.task_id, reply["status"], ended)

        return await idempotent(request, key, raw, handle)

    async def run_and_wait(request: Request, key: ApiKey, wait_s: float, session_id: str | None = None) -> Response:
        g = gw()
        raw = await read_body(request, g.http.max_run_bytes)
        wait_s = min(wait_s, g.http.max_wait_s)

        async def handle() -> StoredResponse:
            task = run_body(raw, key, session_id)
            ref = g.scheduler.run.remote(pack(task), traceparent(new_trace_id()))
            waiting = asyncio.ensure_future(asyncio.wrap_future(ref.future()))
            done, _ = await asyncio.wait({waiting}, timeout=wait_s)
            location = f"/v1/runs/{task.task_id}"
            if not done:  # the call goes on at the scheduler; the run is polled from here
                body = {"task_id": task.task_id, "status": "in_progress", "url": location}
                return StoredResponse(202, body, location)
            ended: AgentResult = waiting.result()
            if ended.status == TaskStatus.REJECTED:
                return run_reply(task.task_id, ended.status, ended)
            return StoredResponse(200, ended.model_dump(mode="json"), location)

        return await idempotent(request, key, raw, handle)

    @app.post("/v1/runs", status_code=202, tags=["runs"])
    async def create_run(request: Request, key: Tenant) -> Response:
        """Starts a run (the body is an `AgentTask` without `tenant`): 202 with its id and
        `Location`; 429 with `Retry-After` if the pool shed it."""
        return await start_run(request, key)

    @app.post("/v1/runs/wait", tags=["runs"])
    async def create_run_and_wait(
        request: Request, key: Tenant, wait_s: Annotated[float, Query(gt=0, le=3600)] = 60.0
    ) -> Response:
        """Starts a run and answers with its final record (200) when it ends within
        `wait_s`; else 202 with the URL to poll."""
        return await run_and_wait(request, key, wait_s)

    @app.get("/v1/runs", tags=["runs"])
    async def list_runs(key: Tenant, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> Any:
        """The tenant's runs in progress (`active`) and its latest finished ones (`recent`,
        newest first)."""
        g = gw()
        active: list[TaskState] = await g.scheduler.active.remote(key.tenant, limit)
        recent = await g.store.recent_results(key.tenant, limit)
        return {"active": [s.model_dump(mode="json", exclude_none=True) for s in active], "recent": recent}

    @app.get("/v1/runs/{task_id}", tags=["runs"])
    async def get_run(task_id: str, key: Tenant) -> Any:
        """Where the run stands: `queued` (place, predicted start), `running` (iteration,
        usage so far), `awaiting_approval`, or `finished` with its record."""
        return (await owned(task_id, key, progress=True)).model_dump(mode="json")

    @app.post("/v1/runs/{task_id}/cancel", tags=["runs"])
    async def cancel_run(task_id: str, key: Tenant) -> Any:
        """Stops the run (queued, running or paused): its record says `cancelled`, with the
        work done so far; a run that had ended keeps its record."""
        state = await owned(task_id, key)
        if state.phase == TaskPhase.FINISHED:
            return state.result.model_dump(mode="json") if state.result else None
        cancelled: AgentResult | None = await gw().scheduler.cancel.remote(task_id, "cancelled over HTTP")
        if cancelled is None:  # ended between the two calls
            cancelled = await record(key.tenant, task_id)
        return cancelled.model_dump(mode="json") if cancelled else None

    @app.get("/v1/runs/{task_id}/events", tags=["runs"])
    async def run_events(request: Request, task_id: str, key: Tenant, after: str | None = None) -> EventSourceResponse:
        """The run's events as Server-Sent Events: `id:` is the stream entry id (reconnect
        with `Last-Event-ID` to resume with nothing lost or repeated), a comment line as a
        heartbeat while idle, and a final `end` event with the run's status."""
        g = gw()
        start = request.headers.get("last-event-id") or after or "0-0"
        if not _ENTRY_ID.match(start):
            raise HTTPException(422, "Last-Event-ID (or after) must be an event id such as 1700000000000-0")
        await owned(task_id, key)
        # Lines end in LF alone (sse-starlette's default is CRLF; the spec allows both): an id
        # cut from the stream by a line-based tool (`grep '^id:'`) then carries no CR into a
        # `Last-Event-ID` header, which HAProxy rightly refuses (400).
        return EventSourceResponse(
            _sse(g, key.tenant, task_id, start),
            ping=g.http.sse_heartbeat_s,
            headers={"Cache-Control": "no-store"},
            sep="\n",
        )

    # --- batches -----------------------------------------------------------------------

    @app.post("/v1/batches", status_code=202, tags=["batches"])
    async def create_batch(request: Request, key: Tenant) -> Response:
        """Submits up to `max_batch_tasks` tasks at once: a JSON body `{"tasks": [...]}` or
        JSONL (one task per line). Every task is checked first; one bad task refuses the
        batch (422, listing the problems by index) and nothing is enqueued."""
        g = gw()
        raw = await read_body(request, g.http.max_batch_bytes)

        async def handle() -> StoredResponse:
            bodies = batch_bodies(raw, request.headers.get("content-type", ""), g.http.max_batch_tasks)
            tasks = validate_tasks([task_from(b, key.tenant, i) for i, b in enumerate(bodies)], tools=g.tools)
            batch_id = f"batch_{uuid.uuid4().hex}"
            await g.store.create_batch(key.tenant, batch_id, [t.task_id for t in tasks], g.http.batch_ttl_s)
            calls = [
                g.scheduler.enqueue.remote(part, [traceparent(new_trace_id()) for _ in part])
                for part in (tasks[i : i + _CHUNK] for i in range(0, len(tasks), _CHUNK))
            ]
            replies = [r for chunk in await asyncio.gather(*calls) for r in chunk]
            counts: dict[str, int] = {}
            for reply in replies:
                counts[reply["status"]] = counts.get(reply["status"], 0) + 1
            location = f"/v1/batches/{batch_id}"
            body = {"batch_id": batch_id, "tasks": len(tasks), "by_status": counts, "url": location}
            return StoredResponse(202, body, location)

        return await idempotent(request, key, raw, handle)

    @app.get("/v1/batches/{batch_id}", tags=["batches"])
    async def get_batch(batch_id: str, key: Tenant) -> Any:
        """The batch's tasks counted by status (`in_progress` until a task has its record)."""
        members, records = await _batch(batch_id, key)
        counts: dict[str, int] = {}
        for raw in records:
            status = "in_progress" if raw is None else json.loads(raw)["status"]
            counts[status] = counts.get(status, 0) + 1
        ended = len(members) - counts.get("in_progress", 0)
        return {"batch_id": batch_id, "tasks": len(members), "ended": ended, "done": ended == len(members), **counts}

    @app.get("/v1/batches/{batch_id}/results", tags=["batches"])
    async def batch_results(batch_id: str, key: Tenant) -> StreamingResponse:
        """The final records of the batch's tasks that have ended, as JSONL, in input order."""
        members, _ = await _batch(batch_id, key, fetch=False)

        async def lines() -> AsyncIterator[bytes]:
            for i in range(0, len(members), _CHUNK):
                for raw in await gw().store.results_json(key.tenant, members[i : i + _CHUNK]):
                    if raw is not None:
                        yield raw.encode() + b"\n"

        return StreamingResponse(lines(), media_type="application/jsonl")

    async def _batch(batch_id: str, key: ApiKey, *, fetch: bool = True) -> tuple[list[str], list[str | None]]:
        if not _TASK_ID.match(batch_id):
            raise HTTPException(404, "no such batch")
        members = await gw().store.batch_members(key.tenant, batch_id)
        if members is None:
            raise HTTPException(404, "no such batch")
        return members, (await gw().store.results_json(key.tenant, members) if fetch else [])

    app.include_router(session_routes(gw, Tenant, start_run, run_and_wait))

    # --- approvals ---------------------------------------------------------------------

    @app.get("/v1/approvals", tags=["approvals"])
    async def approvals(key: Tenant) -> Any:
        """The tenant's runs paused for a human: task id, tools, arguments, deadline."""
        return await gw().scheduler.pending_approvals.remote(key.tenant)

    @app.post("/v1/approvals/{task_id}", tags=["approvals"])
    async def decide(request: Request, task_id: str, key: Tenant) -> Any:
        """Approves or denies a paused run's tool calls (`{"approved": true, "note": ...}`;
        the note reaches the model with a denial); 409 if it is not waiting for approval."""
        decision = body_as(ApprovalBody, await read_body(request, 64 * 1024))
        await owned(task_id, key)
        reply: dict[str, Any] = await gw().scheduler.approve.remote(task_id, decision.approved, decision.note)
        if reply["status"] != "decided":
            raise HTTPException(409, "the run is not waiting for approval")
        return reply

    # --- webhooks ----------------------------------------------------------------------

    @app.post("/v1/webhooks", status_code=201, tags=["webhooks"])
    async def add_webhook(request: Request, key: Tenant) -> Any:
        """Registers an endpoint (`{"url", "events", "description"}`): the tenant's runs that
        end from now on are POSTed to it, signed per Standard Webhooks. The answer holds
        its `secret`, shown only now."""
        g = gw()
        body = body_as(WebhookBody, await read_body(request, 64 * 1024))
        events = check_endpoint(g.config, key.tenant, body.url, body.events)
        if len(await g.webhooks.endpoints(key.tenant)) >= g.config.webhooks.max_endpoints:
            raise HTTPException(422, f"at most {g.config.webhooks.max_endpoints} webhook endpoints per tenant")
        return await g.webhooks.add(key.tenant, body.url, events, body.description, new_secret())

    @app.get("/v1/webhooks", tags=["webhooks"])
    async def list_webhooks(key: Tenant) -> Any:
        """The tenant's endpoints (never their secrets)."""
        return [{k: v for k, v in e.items() if k != "secret"} for e in await gw().webhooks.endpoints(key.tenant)]

    @app.delete("/v1/webhooks/{endpoint_id}", status_code=204, tags=["webhooks"])
    async def remove_webhook(endpoint_id: str, key: Tenant) -> Response:
        if not await gw().webhooks.remove(key.tenant, endpoint_id):
            raise HTTPException(404, "no such webhook endpoint")
        return Response(status_code=204)

    @app.get("/v1/webhooks/dead", tags=["webhooks"])
    async def dead_webhooks(key: Tenant) -> Any:
        """Deliveries given up on, newest first, with their last error."""
        return await gw().webhooks.dead_letters(key.tenant)

    @app.get("/v1/runs/{task_id}/webhooks", tags=["webhooks"])
    async def run_webhooks(task_id: str, key: Tenant) -> Any:
        """Every delivery attempt of the run's webhooks (the delivery log)."""
        await owned(task_id, key)
        return await gw().webhooks.log(key.tenant, task_id)

    # --- operations --------------------------------------------------------------------

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> Any:
        """This replica's process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    async def readyz() -> Any:
        """The scheduler, Redis and at least one worker answer (503 if not)."""
        state = await gw().ready()
        return JSONResponse(state, status_code=200 if state["ready"] else 503)

    @app.get("/metrics", tags=["operations"])
    async def metrics() -> PlainTextResponse:
        """This replica's metrics (requests, latency, SSE streams) and the pool's queues, in
        Prometheus' text format."""
        g = gw()
        with_state = await g.ready()
        for what in ("workers", "capacity"):
            if what in with_state:
                g.metrics.pool.labels(what).set(with_state[what])
        return PlainTextResponse(generate_latest(g.metrics.registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def console() -> HTMLResponse:
        """The operator console (one page, no build step)."""
        return HTMLResponse(resources.files("agentpool.http").joinpath("console.html").read_text())

    @app.get("/v1/status", tags=["operations"])
    async def status(key: Tenant) -> Any:
        """The pool's queues, slots, breakers and workers (the tenant's own counts only)."""
        full: dict[str, Any] = await gw().scheduler.status.remote()
        mine = key.tenant
        return {
            "tenant": mine,
            "queued": full["queued_by_tenant"].get(mine, {}),
            "in_flight": full["in_flight_by_tenant"].get(mine, 0),
            "finished": full["finished_by_tenant"].get(mine, {}),
            "awaiting_approval": full["awaiting_approval"].get(mine, []),
            "pool": {
                "queued": full["queued"],
                "in_flight": full["in_flight"],
                "capacity": full["capacity"],
                "overload_level": full["overload_level"],
                "workers": {k: v for k, v in full["workers"].items() if k != "history"},
                "tools": full["tools"],
                "limits": full["limits"],
            },
        }

    return app


async def _sse(g: Gateway, tenant: str, task_id: str, after: str) -> AsyncIterator[dict[str, Any]]:
    """The run's events as SSE messages, then `end` with its status."""
    g.metrics.streams.inc()
    status: str | None = None
    try:
        async for batch in g.store.follow(tenant, task_id, after=after, block_ms=int(g.http.sse_heartbeat_s * 1000)):
            for entry in batch:
                data = {"task_id": entry.task_id, "ts": entry.ts, "trace_id": entry.trace_id, **entry.data}
                yield {"id": entry.id, "event": entry.event.value, "data": json.dumps(data, default=str)}
                if entry.event == EventType.TASK_END:
                    status = str(entry.data.get("status") or "") or None
                elif entry.event in (EventType.SHED, EventType.TASK_REJECTED):
                    status = TaskStatus.REJECTED.value
        if status is None:  # the run had ended before this stream's position: its record says how
            raw = await g.store.result_json(tenant, task_id)
            status = json.loads(raw)["status"] if raw else None
        yield {"event": "end", "data": json.dumps({"task_id": task_id, "status": status})}
    finally:
        g.metrics.streams.dec()
