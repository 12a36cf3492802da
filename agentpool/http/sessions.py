"""The HTTP API's session routes: runs that continue a session, its export and its deletion
(an `APIRouter` the app includes; kept apart for size).

No `from __future__ import annotations`: FastAPI reads the routes' annotations at run time,
and `tenant` (the app's API-key dependency) is a local name."""

import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response

from agentpool.http.gateway import Gateway

_SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")

StartRun = Callable[..., Awaitable[Response]]


def _session(session_id: str) -> str:
    if not _SESSION_ID.match(session_id):
        raise HTTPException(404, "no such session")
    return session_id


def session_routes(gw: Callable[[], Gateway], tenant: Any, start_run: StartRun, run_and_wait: StartRun) -> APIRouter:
    """`/v1/sessions` routes; `tenant` is the app's API-key dependency, `start_run` and
    `run_and_wait` its handlers of `POST /v1/runs` and `POST /v1/runs/wait`."""
    router = APIRouter(tags=["sessions"])

    @router.post("/v1/sessions/{session_id}/runs")
    async def create_session_run(
        request: Request,
        session_id: str,
        key: tenant,
        wait_s: Annotated[float | None, Query(gt=0, le=3600)] = None,
    ) -> Response:
        """Starts a run that continues the session (the body is a run's; `session_id` comes
        from the URL; `on_busy` says what happens if the session is running another task:
        `enqueue`, `reject` (409 with `Retry-After`), `interrupt` or `rollback`). Answers as
        `POST /v1/runs`, or with `wait_s` as `POST /v1/runs/wait`."""
        sid = _session(session_id)
        if wait_s is None:
            return await start_run(request, key, sid)
        return await run_and_wait(request, key, wait_s, sid)

    @router.get("/v1/sessions")
    async def list_sessions(key: tenant, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> Any:
        """The tenant's sessions, the most recently used first."""
        return {"sessions": await gw().sessions.recent(key.tenant, limit)}

    @router.get("/v1/sessions/{session_id}")
    async def export_session(session_id: str, key: tenant) -> Any:
        """The session's history (Messages API messages), version, turns, compactions and
        its tasks' ids."""
        record = await gw().sessions.export(key.tenant, _session(session_id))
        if record is None:
            raise HTTPException(404, "no such session")
        return record.model_dump(mode="json")

    @router.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str, key: tenant) -> Any:
        """Deletes the session and everything of its tasks (their runs still going are
        cancelled first); answers with what went, or 404 if there was nothing."""
        report: dict[str, Any] = await gw().scheduler.delete_session.remote(key.tenant, _session(session_id))
        if not (report["tasks"] or report["keys_deleted"]):
            raise HTTPException(404, "no such session")
        return report

    return router
