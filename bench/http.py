"""`http`: what the HTTP API on Ray Serve costs and holds, against the Python API in the same run.

The simulator answers at once (zero latency), so what is measured is the front door.

- `wait_added_p50_ms`, `wait_added_p99_ms`: at low load (one request at a time, the two
  interleaved), `POST /v1/runs/wait` minus `pool.run` of the same one-call task (goal: p50
  at most 5 ms more).
- `serve_floor_p50_ms`, `serve_floor_per_s`: Serve's own cost on this machine, measured in
  the same run: `GET /healthz` (ingress, replica, an endpoint that does nothing) one at a time
  and from `concurrency` clients; `runs_over_serve_floor` is `runs_per_s` over the latter.
- `runs_per_s`: `POST /v1/runs` (202, the async path) sustained by `concurrency` clients;
  `runs_per_http_cpu_s`: the same per CPU second spent by the ingress (HAProxy, or Serve's
  Python proxy: the JSON's `config.ingress`) and the API's replica (the processes the front
  door adds), `runs_per_s_per_core` over the machine's cores.
- `sse_streams_held`: of `streams` SSE streams opened at once on one run (paused for an
  approval that does not come), those still
  open after `hold_s` with a heartbeat every `heartbeat_s`; `sse_heartbeats_min`: the
  fewest heartbeats one of them received (at least hold_s / heartbeat_s - 1 expected);
  `sse_end_p99_ms`: from the run's record to its `end` event at each stream;
  `sse_open_s`: time to open them all; `replica_kb_per_stream`: the replica's memory per
  stream held.
- `webhook_p50_ms`, `webhook_p99_ms`: from a run's record (its results-stream entry) to
  its webhook's arrival at a receiver on this machine.
- `batch_accept_s`, `batch_accept_tasks_per_s`: `POST /v1/batches` of `batch_tasks` tasks
  (JSONL; 100,000 in a full run) until its 202 (every task checked, then enqueued);
  `batch_status_ms`: `GET /v1/batches/{id}` counting them; `batch_replica_rss_mb`: the
  replica's memory after.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis

from agentpool import AgentPool, AgentTask, PoolConfig, SimulatorConfig
from agentpool.cluster.redis_server import free_port
from agentpool.config import AdmissionConfig, HttpConfig, WebhookConfig
from agentpool.http.serve import serve_http, stop_http
from bench.load import require_succeeded
from bench.report import cpu_seconds, latency_cdf, percentile, write


class _Backlogged(ThreadingHTTPServer):
    """A receiver whose listen backlog holds a burst (the standard library's is 5: the
    connections past it wait a second for TCP to try again)."""

    request_queue_size = 1024


def _serve_processes() -> list[psutil.Process]:
    """What takes requests in front of the app (HAProxy, or Serve's Python proxy) and the
    API's replicas (Ray names its worker processes after the actor)."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if "ProxyActor" in line or "ServeReplica" in line or proc.info["name"] == "haproxy":
            found.append(proc)
    return found


def _ingress() -> str:
    """Which ingress Serve runs: `haproxy` or `proxy` (`HttpConfig.ingress`)."""
    return "haproxy" if any(p.name() == "haproxy" for p in _serve_processes()) else "proxy"


def _latencies(pool: AgentPool, client: httpx.Client, key: str, n: int) -> tuple[list[float], list[float]]:
    """n one-call tasks through `pool.run` and n through `POST /v1/runs/wait`, interleaved."""
    direct, http = [], []
    headers = {"Authorization": f"Bearer {key}"}
    for i in range(n):
        started = time.perf_counter()
        require_succeeded(pool.run([AgentTask(tenant="bench", prompt=f"sim: answer p{i}")]), "pool.run")
        direct.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        answer = client.post("/v1/runs/wait", json={"prompt": f"sim: answer h{i}"}, headers=headers)
        http.append((time.perf_counter() - started) * 1000)
        assert answer.status_code == 200 and answer.json()["status"] == "succeeded", answer.text[:300]
    return direct, http


async def _sustained(
    url: str, key: str, concurrency: int, seconds: float, *, path: str = "/v1/runs"
) -> tuple[int, float]:
    """`POST /v1/runs` (or `GET path`) from `concurrency` clients for `seconds`: (answered,
    wall seconds)."""
    headers = {"Authorization": f"Bearer {key}"}
    accepted = 0
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one_client(c: int) -> None:
            nonlocal accepted
            i = 0
            while time.monotonic() < stop_at:
                if path == "/v1/runs":
                    reply = await client.post(path, json={"prompt": f"sim: answer r{c}-{i}"}, headers=headers)
                    assert reply.status_code == 202, reply.text[:300]
                else:
                    reply = await client.get(path)
                    assert reply.status_code == 200, reply.text[:300]
                accepted += 1
                i += 1

        started = time.monotonic()
        await asyncio.gather(*(one_client(c) for c in range(concurrency)))
        return accepted, time.monotonic() - started


async def _streams(
    url: str, key: str, task_id: str, streams: int, hold_s: float, redis_client: redis.Redis, prefix: str
) -> dict[str, Any]:
    """`streams` SSE streams on one run held `hold_s`: how many stayed open, their
    heartbeats, and when each saw the run's `end` after its record was written."""
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=streams + 10)
    opened = asyncio.Event()
    open_count = 0
    ends: list[float] = []
    beats: list[int] = []
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(120, connect=60), limits=limits) as client:
        failures: list[str] = []

        async def one() -> None:
            try:
                await _follow()
            except Exception as exc:  # counted, and said in the report
                failures.append(f"{type(exc).__name__}: {exc}"[:200])
                if open_count + len(failures) >= streams:
                    opened.set()

        async def _follow() -> None:
            nonlocal open_count
            heartbeats = 0
            async with client.stream("GET", f"/v1/runs/{task_id}/events", headers=headers) as response:
                if response.status_code != 200:
                    detail = (await response.aread()).decode(errors="replace")[:200]
                    raise RuntimeError(f"HTTP {response.status_code}: {detail}")
                open_count += 1
                if open_count + len(failures) >= streams:
                    opened.set()
                event = ""
                async for line in response.aiter_lines():
                    if line.startswith(":"):
                        heartbeats += 1
                    elif line.startswith("event:"):
                        event = line[6:].strip()
                    elif line == "" and event == "end":
                        ends.append(time.time())
                        break
            beats.append(heartbeats)

        started = time.monotonic()
        tasks = [asyncio.ensure_future(one()) for _ in range(streams)]
        while not opened.is_set() and time.monotonic() - started < 120:
            print(f"  streams open {open_count}, failed {len(failures)}", flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(opened.wait(), 2)
        open_s = time.monotonic() - started
        replica = [p for p in _serve_processes() if "ServeReplica" in " ".join(p.cmdline())]
        rss_open = sum(p.memory_info().rss for p in replica)
        await asyncio.sleep(hold_s)
        still_open = sum(1 for t in tasks if not t.done())
        await asyncio.gather(*tasks)
    entries = redis_client.xrange(f"{prefix}:{{bench}}:results")
    written_ms = next(int(entry_id.split("-")[0]) for entry_id, f in entries if f["task_id"] == task_id)
    return {
        "open_s": open_s,
        "failures": failures[:5],
        "failed": len(failures),
        "held": still_open,
        "min_heartbeats": min(beats) if beats else 0,
        "end_ms": [e * 1000 - written_ms for e in ends],
        "replica_rss": rss_open,
    }


def _batch(url: str, key: str, size: int) -> dict[str, Any]:
    """One batch of `size` tasks as JSONL: how long until it is accepted (202), how long its
    status takes to count, and the replica's memory after it."""
    lines = "\n".join(json.dumps({"prompt": f"sim: answer b{i}"}) for i in range(size))
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/jsonl"}
    with httpx.Client(base_url=url, timeout=600) as client:
        started = time.perf_counter()
        created = client.post("/v1/batches", content=lines, headers=headers)
        accept_s = time.perf_counter() - started
        assert created.status_code == 202 and created.json()["tasks"] == size, created.text[:300]
        started = time.perf_counter()
        counts = client.get(created.headers["location"], headers=headers).json()
        status_ms = (time.perf_counter() - started) * 1000
        assert counts["tasks"] == size
    replica = [p for p in _serve_processes() if "ServeReplica" in " ".join(p.cmdline())]
    return {"accept_s": accept_s, "status_ms": status_ms, "replica_rss": sum(p.memory_info().rss for p in replica)}


class _Receiver:
    """Records when each webhook arrives (task id -> unix time)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.arrived: dict[str, float] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.arrived.setdefault(json.loads(body)["data"]["task_id"], time.time())
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = _Backlogged(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def run(out: Path, quick: bool) -> dict[str, Any]:
    sequential = 150 if quick else 500
    concurrency, seconds = 32, (8.0 if quick else 20.0)
    streams, hold_s, heartbeat_s = 1000, (10.0 if quick else 30.0), 2.0
    hooks = 100 if quick else 400
    batch_size = 10_000 if quick else 100_000
    config = PoolConfig(
        name="bench-http",
        tool_modules=["tests.toolkit"],
        approval_timeout_s=3600,
        num_workers=2,
        worker_concurrency=128,
        simulator=SimulatorConfig(latency_ms=0, latency_sigma=0, seed=1),
        admission=AdmissionConfig(max_queue_wait_s=3600, target_wait_s=3600),
        # One replica, held there: what one replica holds and serves is the figure.
        http=HttpConfig(
            port=free_port(), sse_heartbeat_s=heartbeat_s, max_ongoing_requests=4000, min_replicas=1, max_replicas=1
        ),
        webhooks=WebhookConfig(allow_private_addresses=True),
    )
    with AgentPool.start(config) as pool:
        url = serve_http(pool.config.name)
        key = pool.create_api_key("bench")
        r = redis.Redis.from_url(pool.redis_url, decode_responses=True)
        try:
            with httpx.Client(base_url=url, timeout=60) as client:
                _latencies(pool, client, key, 50)  # warm up both paths
                direct, via_http = _latencies(pool, client, key, sequential)
                floor = []  # Serve's own round trip: proxy, replica, an endpoint doing nothing
                for _ in range(sequential):
                    started = time.perf_counter()
                    client.get("/healthz")
                    floor.append((time.perf_counter() - started) * 1000)
            floor_count, floor_wall = asyncio.run(_sustained(url, key, concurrency, seconds / 2, path="/healthz"))
            # A run paused for approval stays in progress as long as it is not decided.
            long_run = AgentTask(
                tenant="bench",
                prompt='sim: tool wire_money {"amount": 1, "to": "x"}\nsim: answer paid',
                tools=["wire_money"],
            )
            pool.enqueue([long_run])

            def finish_later() -> None:  # ends the run once the streams have been held
                time.sleep(hold_s + 20)
                pool.cancel(long_run.task_id)

            stopper = threading.Thread(target=finish_later, daemon=True)
            stopper.start()
            print("  streams", flush=True)
            held = asyncio.run(_streams(url, key, long_run.task_id, streams, hold_s, r, pool.config.key_prefix))
            stopper.join()
            print("  webhooks", flush=True)
            receiver = _Receiver()
            pool.add_webhook("bench", f"http://127.0.0.1:{receiver.port}/hooks")
            hooked = pool.run([AgentTask(tenant="bench", prompt=f"sim: answer w{i}") for i in range(hooks)])
            require_succeeded(hooked, "webhooked runs")
            deadline = time.monotonic() + 60
            while len(receiver.arrived) < hooks and time.monotonic() < deadline:
                time.sleep(0.1)
            receiver.server.shutdown()
            written = {
                f["task_id"]: int(entry_id.split("-")[0]) / 1000
                for entry_id, f in r.xrange(f"{pool.config.key_prefix}:{{bench}}:results")
            }
            webhook_ms = [
                (receiver.arrived[t.task_id] - written[t.task_id]) * 1000
                for t in hooked
                if t.task_id in receiver.arrived
            ]
            # Last: the sustained rate leaves thousands of runs behind it.
            print("  sustained rate", flush=True)
            http_procs = _serve_processes()
            cpu_before = cpu_seconds(http_procs)
            accepted, wall = asyncio.run(_sustained(url, key, concurrency, seconds))
            http_cpu = cpu_seconds(http_procs) - cpu_before
            ingress = _ingress()
            print("  batch", flush=True)
            batch = _batch(url, key, batch_size)
        finally:
            r.close()
            stop_http(pool.config.name)
    cores = os.cpu_count() or 1
    figures: dict[str, Any] = {
        "wait_added_p50_ms": round(percentile(via_http, 0.5) - percentile(direct, 0.5), 2),
        "wait_added_p99_ms": round(percentile(via_http, 0.99) - percentile(direct, 0.99), 2),
        "pool_run_p50_ms": round(percentile(direct, 0.5), 2),
        "http_wait_p50_ms": round(percentile(via_http, 0.5), 2),
        "serve_floor_p50_ms": round(percentile(floor, 0.5), 2),
        "runs_per_s": round(accepted / wall, 1),
        "serve_floor_per_s": round(floor_count / floor_wall, 1),
        "runs_over_serve_floor": round((accepted / wall) / (floor_count / floor_wall), 3),
        "runs_per_s_per_core": round(accepted / wall / cores, 1),
        "runs_per_http_cpu_s": round(accepted / http_cpu, 1) if http_cpu > 0 else None,
        "sse_streams": streams,
        "sse_failed": held["failed"],
        "sse_streams_held": held["held"],
        "sse_heartbeats_min": held["min_heartbeats"],
        "sse_open_s": round(held["open_s"], 2),
        "sse_end_p50_ms": round(percentile(held["end_ms"], 0.5), 1),
        "sse_end_p99_ms": round(percentile(held["end_ms"], 0.99), 1),
        "replica_rss_mb_with_streams": round(held["replica_rss"] / 2**20, 1),
        "batch_tasks": batch_size,
        "batch_accept_s": round(batch["accept_s"], 2),
        "batch_accept_tasks_per_s": round(batch_size / batch["accept_s"], 1),
        "batch_status_ms": round(batch["status_ms"], 1),
        "batch_replica_rss_mb": round(batch["replica_rss"] / 2**20, 1),
        "webhooks_delivered": len(webhook_ms),
        "webhook_p50_ms": round(percentile(webhook_ms, 0.5), 1),
        "webhook_p99_ms": round(percentile(webhook_ms, 0.99), 1),
    }
    plot = latency_cdf(out, "http", {"pool.run": direct, "POST /v1/runs/wait": via_http}, title="one task at a time")
    notes = (
        f"Zero-latency simulator, one LLM call per task, one API replica. Latency: {sequential} tasks one at a time "
        f"through pool.run and through POST /v1/runs/wait (interleaved, keep-alive client). Rate: {concurrency} "
        f"clients posting /v1/runs for {seconds:.0f} s; CPU of the ingress ({ingress}) and replica processes. "
        "Streams: "
        f"{streams} SSE streams on one run paused for approval held {hold_s:.0f} s with a heartbeat every "
        f"{heartbeat_s:.0f} s, "
        f"then the task is cancelled. Webhooks: {hooks} runs to a receiver on this machine. Batch: {batch_size} tasks "
        "as JSONL, last."
    )
    write(out, "http", figures=figures, notes=notes, config={"quick": quick, "ingress": ingress}, plots=[plot])
    return figures
