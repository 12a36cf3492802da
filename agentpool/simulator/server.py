"""The simulated Anthropic Messages API over HTTP.

It speaks the wire format the official SDK parses (message objects, content blocks, usage
with cache fields, error JSON, `request-id`, `retry-after`, `anthropic-ratelimit-*`), so
every test that uses it exercises the real client stack. Behaviour comes from
`script.py`; latency, faults and limits from `SimulatorConfig`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import threading
import time
import uuid
from collections import Counter
from typing import Any

from aiohttp import web

from agentpool.conversation import blocks, pairing_problem
from agentpool.simulator.batches import BatchDesk, add_batch_routes
from agentpool.simulator.config import SimulatorConfig
from agentpool.simulator.limits import ModelLimits
from agentpool.simulator.script import (
    DirectiveError,
    Directives,
    Reply,
    conversation_state,
    estimate_tokens,
    fail_key,
    first_prompt,
    in_share,
    merged_directives,
    plan_reply,
    system_text,
)
from agentpool.simulator.streaming import stream

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "api_error",
    529: "overloaded_error",
}


class _ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class Simulator:
    """The provider's state: config, per-model limits, prompt cache, fault counters, stats."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.configure(config or SimulatorConfig())
        self.batches = BatchDesk(
            lambda body: _batch_answer(self, body),
            delay_s=lambda: self.config.batch_delay_ms / 1000,
            expiry_s=lambda: self.config.batch_expiry_s,
        )

    def configure(self, config: SimulatorConfig) -> None:
        self.config = config
        self._rng = random.Random(config.seed)
        self._limits: dict[str, ModelLimits] = {}
        self._cache: set[str] = set()
        self._fails: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        #: Per model: what passed the limits (admitted requests, counted input, output tokens).
        self.admitted: dict[str, Counter[str]] = {}
        self.in_flight = 0
        self.max_in_flight = 0

    def stats_json(self) -> dict[str, Any]:
        responses = {k.removeprefix("status_"): v for k, v in self.stats.items() if "status_" in k}
        return {
            "requests": self.stats["requests"],
            "responses": responses,
            "rate_limited": self.stats["status_429"],
            "input_tokens": self.stats["input_tokens"],
            "output_tokens": self.stats["output_tokens"],
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "admitted_by_model": {model: dict(counts) for model, counts in self.admitted.items()},
            "rate_limited_by": {
                k.removeprefix("limited:"): v for k, v in self.stats.items() if k.startswith("limited:")
            },
            **self.batches.stats,
        }

    def limits_for(self, model: str) -> ModelLimits:
        if model not in self._limits:
            c = self.config.model_limits.get(model) or self.config
            self._limits[model] = ModelLimits(c.rpm, c.itpm, c.otpm, time.monotonic)
        return self._limits[model]

    # --- request handling ------------------------------------------------------------

    def validate(self, body: Any) -> None:
        if not isinstance(body, dict):
            raise _ApiError(400, "request body must be a JSON object")
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise _ApiError(400, "model: field required")
        max_tokens = body.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise _ApiError(400, "max_tokens: must be a positive integer")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _ApiError(400, "messages: at least one message is required")
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or msg.get("role") not in ("user", "assistant"):
                raise _ApiError(400, f"messages.{i}.role: must be 'user' or 'assistant'")
            if not isinstance(msg.get("content"), str | list):
                raise _ApiError(400, f"messages.{i}.content: must be a string or a list")
        if messages[0]["role"] != "user":
            raise _ApiError(400, "messages: the first message must use the user role")
        problem = pairing_problem(messages)
        if problem is not None:  # as the real API: an orphaned tool_result is refused
            raise _ApiError(400, problem)
        tools = body.get("tools", [])
        if not isinstance(tools, list) or any(not isinstance(t, dict) or "name" not in t for t in tools):
            raise _ApiError(400, "tools: each tool needs a name")

    def count_input(self, body: dict[str, Any]) -> tuple[int, int]:
        """Returns (tools and system tokens, message tokens)."""
        prefix = estimate_tokens(body.get("tools")) if body.get("tools") else 0
        prefix += estimate_tokens(system_text(body)) if body.get("system") else 0
        rest = sum(estimate_tokens(_unmarked(m.get("content"))) for m in body["messages"])
        return prefix, rest

    def usage_for(self, body: dict[str, Any]) -> dict[str, int]:
        """Input tokens split as the prompt cache serves them: each cache mark (on the tools,
        the system prompt, or a message's block) ends a prefix; the longest prefix cached
        before (at a mark, or at a message boundary up to 20 messages before one) is read
        from the cache, the rest up to the last mark is written to it, and what follows the
        last mark is plain input."""
        head, rest = self.count_input(body)
        usage = {"input_tokens": head + rest, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        messages = body["messages"]
        ends = [0] if head and _wants_cache(body) else []
        ends += [i + 1 for i, m in enumerate(messages) if _marked(m)]
        if not ends:
            return usage

        # One pass over the messages up to the last mark: each boundary's prefix digest (a
        # running hash) and token count, so a long conversation costs O(its length).
        running = hashlib.sha256(json.dumps(_unmarked([body["model"], body.get("tools"), body.get("system")])).encode())
        keys, counts = [running.hexdigest()], [head]
        for message in messages[: ends[-1]]:
            # A string content is one text block, as the API reads it.
            shown = _unmarked({**message, "content": blocks(message)})
            running.update(b"\x1e" + json.dumps(shown, default=str).encode())
            keys.append(running.copy().hexdigest())
            counts.append(counts[-1] + estimate_tokens(_unmarked(message.get("content"))))
        # As the real API: a mark also finds what was cached at an earlier boundary, up to
        # 20 blocks back (here, messages), so a longer conversation reads the shorter one's.
        looked = {j for end in ends for j in range(max(0, end - 20), end + 1)}
        read = max((j for j in looked if keys[j] in self._cache), default=None)
        cached = counts[ends[-1]]
        read_tokens = counts[read] if read is not None else 0
        for end in ends:
            self._cache.add(keys[end])
        usage["cache_read_input_tokens"] = read_tokens
        usage["cache_creation_input_tokens"] = cached - read_tokens
        usage["input_tokens"] = head + rest - cached
        return usage

    def maybe_fail(self, body: dict[str, Any], directives: Any, *, api_key: str = "") -> None:
        for spec in directives.fails:
            if spec.model is not None and spec.model != body["model"]:
                continue
            key = f"{spec.status}:{spec.model}:{fail_key(body)}"
            if spec.times is None or self._fails[key] < spec.times:
                self._fails[key] += 1
                message = f"simulated failure ({spec.status})"
                if spec.status == 401:  # echoes the key, as careless gateways do: the pool must scrub it
                    message = f"invalid x-api-key: {api_key}"
                raise _ApiError(spec.status, message, _retry_hdr(1))
        if directives.fail_share is not None:
            share, status = directives.fail_share
            if in_share(first_prompt(body), share):
                raise _ApiError(status, f"simulated failure of this task ({status})")
        for status, rate in sorted(self.config.fault_rates.items()):
            if self._rng.random() < rate:
                raise _ApiError(status, f"injected fault ({status})", _retry_hdr(1))

    def latency_s(self, output_tokens: int, extra_ms: float) -> float:
        c = self.config
        base = c.latency_ms * (self._rng.lognormvariate(0, c.latency_sigma) if c.latency_sigma else 1)
        return (base + c.per_output_token_ms * output_tokens + extra_ms) / 1000.0


def _wants_cache(body: dict[str, Any]) -> bool:
    tools = body.get("tools") or []
    system = body.get("system")
    marked = any(isinstance(t, dict) and "cache_control" in t for t in tools)
    if isinstance(system, list):
        marked = marked or any(isinstance(b, dict) and "cache_control" in b for b in system)
    return marked


def _marked(message: dict[str, Any]) -> bool:
    content = message.get("content")
    return isinstance(content, list) and any(isinstance(b, dict) and "cache_control" in b for b in content)


def _unmarked(value: Any) -> Any:
    """`value` without its cache marks (a mark does not change what is cached)."""
    if isinstance(value, dict):
        return {k: _unmarked(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [_unmarked(v) for v in value]
    return value


def _retry_hdr(seconds: float) -> dict[str, str]:
    return {"retry-after": str(max(1, math.ceil(seconds)))}


def _error_response(err: _ApiError, request_id: str) -> web.Response:
    payload = {
        "type": "error",
        "error": {"type": ERROR_TYPES.get(err.status, "api_error"), "message": err.message},
        "request_id": request_id,
    }
    headers = {"request-id": request_id, **err.headers}
    if err.status in (400, 401, 403, 404, 413):
        headers["x-should-retry"] = "false"
    return web.json_response(payload, status=err.status, headers=headers)


def build_app(sim: Simulator) -> web.Application:
    app = web.Application(client_max_size=sim.config.max_body_bytes)

    async def messages(request: web.Request) -> web.StreamResponse:
        request_id = f"req_sim_{uuid.uuid4().hex[:24]}"
        sim.stats["requests"] += 1
        sim.in_flight += 1
        sim.max_in_flight = max(sim.max_in_flight, sim.in_flight)
        try:
            response = await _messages(request, request_id)
        except _ApiError as err:
            response = _error_response(err, request_id)
        finally:
            sim.in_flight -= 1
        sim.stats[f"status_{response.status}"] += 1
        return response

    async def _read_json(request: web.Request) -> dict[str, Any]:
        if not request.headers.get("x-api-key") and not request.headers.get("authorization"):
            raise _ApiError(401, "x-api-key header is required")
        try:
            body = await request.json()
        except web.HTTPRequestEntityTooLarge as exc:
            raise _ApiError(413, "request exceeds the maximum allowed size") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _ApiError(400, f"request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise _ApiError(400, "request body must be a JSON object")
        return body

    async def _read_body(request: web.Request) -> dict[str, Any]:
        body = await _read_json(request)
        sim.validate(body)
        return body

    async def _messages(request: web.Request, request_id: str) -> web.StreamResponse:
        body = await _read_body(request)
        try:
            directives = _directives(body)
        except (DirectiveError, ValueError) as exc:
            raise _ApiError(400, str(exc)) from exc
        presented = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
        sim.maybe_fail(body, directives, api_key=presented)
        if directives.raw is not None:
            return web.Response(
                body=directives.raw, content_type="application/json", headers={"request-id": request_id}
            )
        usage = sim.usage_for(body)
        limits = sim.limits_for(body["model"])
        billable_input = usage["input_tokens"] + usage["cache_creation_input_tokens"]
        verdict = limits.admit(billable_input, body["max_tokens"])
        if not verdict.allowed:
            sim.stats[f"limited:{body['model']}:{verdict.dimension}"] += 1
            headers = {**_retry_hdr(verdict.retry_after_s), **limits.headers(time.time())}
            raise _ApiError(429, f"rate limit exceeded: {verdict.dimension} per minute", headers)
        reply = plan_reply(body, directives, uuid.uuid4().hex[:24])
        if directives.bloat:
            reply = Reply([{"type": "text", "text": "x" * directives.bloat}], "end_turn", reply.output_tokens)
        limits.settle(body["max_tokens"], reply.output_tokens)
        usage["output_tokens"] = reply.output_tokens
        sim.stats["input_tokens"] += billable_input
        sim.stats["output_tokens"] += reply.output_tokens
        admitted = sim.admitted.setdefault(body["model"], Counter())
        admitted.update(requests=1, input_tokens=billable_input, output_tokens=reply.output_tokens)
        await asyncio.sleep(sim.latency_s(reply.output_tokens, directives.delay_ms))
        message = _message(body, reply, usage)
        headers = {"request-id": request_id, **limits.headers(time.time())}
        if body.get("stream"):
            return await stream(request, message, reply, headers)
        return web.json_response(message, headers=headers)

    async def count_tokens(request: web.Request) -> web.Response:
        request_id = f"req_sim_{uuid.uuid4().hex[:24]}"
        try:
            body = await _read_body_for_count(request)
        except _ApiError as err:
            return _error_response(err, request_id)
        prefix, rest = sim.count_input(body)
        return web.json_response({"input_tokens": prefix + rest}, headers={"request-id": request_id})

    async def _read_body_for_count(request: web.Request) -> dict[str, Any]:
        body = await _read_json(request)
        body.setdefault("max_tokens", 1)
        sim.validate(body)
        return body

    async def stats(_: web.Request) -> web.Response:
        return web.json_response(sim.stats_json())

    async def reset(_: web.Request) -> web.Response:
        sim.configure(sim.config)
        return web.json_response({"ok": True})

    async def configure(request: web.Request) -> web.Response:
        try:
            sim.configure(SimulatorConfig.model_validate(await request.json()))
        except Exception as exc:  # any bad config is the caller's error, reported as 400
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(sim.config.model_dump(mode="json"))

    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    app.router.add_get("/sim/stats", stats)
    app.router.add_post("/sim/reset", reset)
    app.router.add_put("/sim/config", configure)
    add_batch_routes(app, sim.batches, read_json=_read_json, delay_of=_delay_of)
    return app


def _batch_answer(sim: Simulator, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """One request of a batch: the message `/v1/messages` would answer (no rate limits, no
    latency: a batch has its own), or the error it would have returned."""
    try:
        sim.validate(body)
        directives = _directives(body)
        sim.maybe_fail(body, directives)
    except _ApiError as err:
        return "errored", {"type": ERROR_TYPES.get(err.status, "api_error"), "message": err.message}
    except (DirectiveError, ValueError) as exc:
        return "errored", {"type": "invalid_request_error", "message": str(exc)}
    usage = sim.usage_for(body)
    reply = plan_reply(body, directives, uuid.uuid4().hex[:24])
    usage["output_tokens"] = reply.output_tokens
    sim.stats["batch_input_tokens"] += usage["input_tokens"] + usage["cache_creation_input_tokens"]
    sim.stats["batch_output_tokens"] += reply.output_tokens
    return "succeeded", _message(body, reply, usage)


def _message(body: dict[str, Any], reply: Reply, usage: dict[str, int]) -> dict[str, Any]:
    """The assistant message a request is answered with, as the Messages API returns it."""
    return {
        "id": f"msg_sim_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": reply.content,
        "stop_reason": reply.stop_reason,
        "stop_sequence": None,
        "usage": usage,
    }


def _delay_of(body: dict[str, Any]) -> float:
    """A batch request's own `sim: delay`, in seconds (0 when it has none or is malformed)."""
    try:
        return _directives(body).delay_ms / 1000
    except (DirectiveError, ValueError, KeyError, TypeError):
        return 0.0


def _directives(body: dict[str, Any]) -> Directives:
    """The request's directives: its system prompt's and its latest prompt's."""
    return merged_directives(system_text(body), conversation_state(body["messages"])[0])


class SimulatorServer:
    """Runs the simulator on a loopback port, in this process.

    `start()` serves from a background thread with its own event loop (for drivers, tests
    and the CLI); `await start_async()` serves on the running loop (inside an async actor).
    """

    def __init__(self, config: SimulatorConfig | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sim = Simulator(config)
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start_async(self) -> str:
        self._runner = web.AppRunner(build_app(self.sim), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        # aiohttp keeps the listening server private (asyncio's, or uvloop's where Ray runs
        # actors on uvloop); its port is chosen by the OS.
        server = site._server
        sockets = list(getattr(server, "sockets", None) or [])
        self.port = sockets[0].getsockname()[1]
        return self.url

    async def stop_async(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def start(self) -> str:
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.start_async())
            except BaseException as exc:  # reported to the starting thread below
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.stop_async())
            loop.close()

        self._thread = threading.Thread(target=serve, name="agentpool-simulator", daemon=True)
        self._thread.start()
        ready.wait(timeout=30)
        if failure:
            raise failure[0]
        return self.url

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._thread = None
            self._loop = None

    def __enter__(self) -> SimulatorServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
