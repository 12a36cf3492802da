"""Telemetry end to end: a pool configured only by the standard OTEL_* variables exports to
an in-process OTLP/HTTP receiver; its spans, metrics, events, audit trail and costs are
checked against what the simulated provider did."""

from __future__ import annotations

import glob
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import ray
import redis

from agentpool import AgentPool, AgentResult, AgentTask, PoolConfig, SimulatorConfig
from agentpool.cluster.keys import Keys
from agentpool.config import AlertConfig, RetryPolicy
from agentpool.pricing import PriceTable
from agentpool.telemetry import DURATION_BUCKETS, TOKEN_BUCKETS
from tests.otlp_receiver import OTLPReceiver

pytestmark = pytest.mark.usefixtures("ray_session")

CONTENT_KEYS = {
    "gen_ai.input.messages",
    "gen_ai.output.messages",
    "gen_ai.system_instructions",
    "gen_ai.tool.call.arguments",
    "gen_ai.tool.call.result",
}
SECRETISH = "sk-ant-api03-AUDITME1234567890"


@contextmanager
def otel_env(endpoint: str, **extra: str) -> Iterator[None]:
    """Only the standard variables: the pool copies them to its actors when it starts."""
    wanted = {
        "OTEL_SERVICE_NAME": "agentpool-test",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_METRIC_EXPORT_INTERVAL": "60000",
        **extra,
    }
    before = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start(redis_url: str, receiver: OTLPReceiver, **extra: str) -> AgentPool:
    with otel_env(receiver.endpoint, **extra):
        return AgentPool.start(
            PoolConfig(
                name=f"otel{uuid.uuid4().hex[:6]}",
                key_prefix=f"t{uuid.uuid4().hex[:8]}",
                redis_url=redis_url,
                tool_modules=["tests.toolkit"],
                simulator=SimulatorConfig(latency_ms=2, latency_sigma=0),
                num_workers=1,
                worker_concurrency=8,
                retry=RetryPolicy(max_attempts_per_model=2, base_delay_s=0.01, max_delay_s=0.02),
                fallback_models=[],
                event_log=True,
                alerts=AlertConfig(run_cost_usd=1e-9),
            )
        )


@pytest.fixture(scope="module")
def traced(redis_url: str) -> Iterator[tuple[AgentPool, OTLPReceiver, list[AgentResult]]]:
    with OTLPReceiver() as receiver:
        pool = start(redis_url, receiver)
        tasks = [
            AgentTask(
                tenant="acme",
                system="You are terse.",
                prompt='sim: tool calculator {"expression": "6*7"}\nsim: answer 42',
                tools=["calculator"],
            ),
            AgentTask(
                tenant="acme",
                prompt=f'sim: tool shout {{"text": "mail bob@example.com, key {SECRETISH}"}}\nsim: answer ok',
                tools=["shout"],
            ),
            AgentTask(tenant="acme", prompt="sim: fail 500 always"),
        ]
        results = pool.run(tasks)
        pool.flush_telemetry()
        yield pool, receiver, results
        pool.shutdown()


def by_name(spans: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        out.setdefault(span["name"], []).append(span)
    return out


def test_one_task_is_one_trace_across_scheduler_worker_and_executor(traced: Any) -> None:
    pool, receiver, results = traced
    result = results[0]
    assert result.status == "succeeded" and len(result.trace_id) == 32
    spans = receiver.spans(result.trace_id)
    named = by_name(spans)
    model = pool.config.default_model
    assert sorted(named) == sorted(
        [
            f"invoke_agent {pool.config.name}",
            "queue_wait",
            "agent_run",
            f"chat {model}",
            "execute_tool calculator",
            "run_tool calculator",
        ]
    )
    (root,) = named[f"invoke_agent {pool.config.name}"]
    (run,) = named["agent_run"]
    (tool,) = named["execute_tool calculator"]
    (remote,) = named["run_tool calculator"]
    chats = named[f"chat {model}"]
    # Parentage across three processes: scheduler -> worker -> tool executor.
    assert named["queue_wait"][0]["parent_span_id"] == root["span_id"]
    assert run["parent_span_id"] == root["span_id"]
    assert all(c["parent_span_id"] == run["span_id"] for c in chats)
    assert tool["parent_span_id"] == run["span_id"] and remote["parent_span_id"] == tool["span_id"]
    roles = {s["resource"]["agentpool.role"]: s["resource"]["process.pid"] for s in spans}
    assert set(roles) == {"scheduler", "worker", "tool_executor"} and len(set(roles.values())) == 3
    assert {s["resource"]["service.name"] for s in spans} == {"agentpool-test"}
    # GenAI attributes.
    assert root["attributes"]["gen_ai.operation.name"] == "invoke_agent"
    assert root["attributes"]["agentpool.status"] == "succeeded"
    assert root["attributes"]["agentpool.cost_usd"] == pytest.approx(result.usage.cost_usd)
    assert [c["attributes"]["gen_ai.response.finish_reasons"] for c in chats] == [["tool_use"], ["end_turn"]]
    for chat in chats:
        a = chat["attributes"]
        assert chat["kind"] == 3  # SPAN_KIND_CLIENT
        assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "anthropic"
        assert a["gen_ai.request.model"] == model and a["gen_ai.response.model"] == model
        assert a["gen_ai.response.id"].startswith("msg_")
    # Anthropic's convention: input tokens include cache reads and writes.
    u = result.usage
    assert u.cache_read_input_tokens + u.cache_creation_input_tokens > 0  # the system prompt was cached
    total_in = u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens
    assert sum(c["attributes"]["gen_ai.usage.input_tokens"] for c in chats) == total_in
    assert sum(c["attributes"]["gen_ai.usage.output_tokens"] for c in chats) == u.output_tokens
    assert sum(c["attributes"]["gen_ai.usage.cache_read.input_tokens"] for c in chats) == u.cache_read_input_tokens
    assert (
        sum(c["attributes"]["gen_ai.usage.cache_creation.input_tokens"] for c in chats) == u.cache_creation_input_tokens
    )
    assert tool["attributes"]["gen_ai.tool.name"] == "calculator"
    assert tool["attributes"]["gen_ai.tool.call.id"] == result.tool_calls[0].tool_use_id
    # No content unless enabled.
    assert not any(CONTENT_KEYS & set(s["attributes"]) for s in receiver.spans())


def test_failed_attempts_are_error_spans(traced: Any) -> None:
    _pool, receiver, results = traced
    failed = results[2]
    assert failed.status == "failed"
    spans = receiver.spans(failed.trace_id)
    chats = [s for s in spans if s["name"].startswith("chat ")]
    assert len(chats) == 2  # max_attempts_per_model=2, no fallback
    assert all(c["attributes"]["error.type"] == "api_error" and c["status_code"] == 2 for c in chats)
    root = next(s for s in spans if s["name"].startswith("invoke_agent"))
    assert root["attributes"]["error.type"] == "ProviderError" and root["status_code"] == 2


def test_metrics_follow_the_conventions_and_add_up(traced: Any) -> None:
    _pool, receiver, results = traced
    usage = receiver.points("gen_ai.client.token.usage")
    assert usage and all(p["kind"] == "histogram" and p["bounds"] == TOKEN_BUCKETS for p in usage)
    assert {p["attributes"]["gen_ai.token.type"] for p in usage} == {"input", "output"}
    durations = receiver.points("gen_ai.client.operation.duration")
    assert durations and all(p["bounds"] == DURATION_BUCKETS and p["unit"] == "s" for p in durations)
    assert any(p["attributes"].get("error.type") == "api_error" for p in durations)
    # 2 successful + 2 successful + 2 failed attempts.
    assert sum(p["count"] for p in durations) == 6
    tasks = {
        (p["attributes"]["agentpool.tenant"], p["attributes"]["agentpool.status"]): p["value"]
        for p in receiver.points("agentpool.tasks")
    }
    assert tasks == {("acme", "succeeded"): 2, ("acme", "failed"): 1}
    cost = sum(p["value"] for p in receiver.points("agentpool.cost"))
    assert cost == pytest.approx(sum(r.usage.cost_usd for r in results))
    calls = {p["attributes"]["gen_ai.tool.name"]: p["value"] for p in receiver.points("agentpool.tool.calls")}
    assert calls == {"calculator": 1, "shout": 1}
    assert receiver.points("agentpool.queue.wait") and receiver.points("agentpool.task.duration")
    assert {p["attributes"]["agentpool.breaker.state"] for p in receiver.points("agentpool.breaker.state")} >= {
        "closed"
    }


def events_of(pool: AgentPool, tenant: str, task_id: str) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(pool.redis_url, decode_responses=True)
    entries = client.xrange(Keys(pool.config.key_prefix).events(tenant))
    client.close()
    return [{**e, "data": json.loads(e["data"])} for _, e in entries if e["task_id"] == task_id]


def test_events_and_costs_match_the_provider_usage(traced: Any) -> None:
    pool, _receiver, results = traced
    result = results[0]
    events = events_of(pool, "acme", result.task_id)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "task_admitted" and "task_end" in kinds
    assert kinds.count("llm_call") == 2 and kinds.count("tool_call") == 1 and kinds.count("tool_result") == 1
    assert {e["trace_id"] for e in events} == {result.trace_id}
    calls = [e["data"] for e in events if e["event"] == "llm_call"]
    assert [c["iteration"] for c in calls] == [1, 2] and [c["stop_reason"] for c in calls] == ["tool_use", "end_turn"]
    for field in ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"):
        assert sum(c[field] for c in calls) == getattr(result.usage, field)
    # The cost, priced again here from the token counts the provider reported.
    prices = PriceTable(pool.config.prices)
    model = pool.config.default_model
    from agentpool.models import Usage

    priced = sum(
        prices.priced(
            model,
            Usage.from_api(
                {
                    k: c[k]
                    for k in ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
                }
            ),
        ).cost_usd
        for c in calls
    )
    assert priced > 0 and result.usage.cost_usd == pytest.approx(priced)
    end = next(e["data"] for e in events if e["event"] == "task_end")
    assert end["cost_usd"] == pytest.approx(result.usage.cost_usd) and end["status"] == "succeeded"
    # The run-cost alert (threshold 1e-9 USD) fired for it.
    alerts = [e["data"] for e in events_of(pool, "acme", result.task_id) if e["event"] == "alert"]
    assert alerts and alerts[0]["kind"] == "run_cost" and alerts[0]["state"] == "firing"
    # Spend per tenant per day, in status.
    spent = pool.status()["budgets_today"]["acme"]
    assert spent["cost_usd"] == pytest.approx(sum(r.usage.cost_usd for r in results))


def test_the_audit_trail_is_redacted(traced: Any) -> None:
    pool, _receiver, results = traced
    client = redis.Redis.from_url(pool.redis_url, decode_responses=True)
    entries = [e for _, e in client.xrange(Keys(pool.config.key_prefix).audit("acme"))]
    client.close()
    assert sorted((e["tool"], e["outcome"]) for e in entries) == [("calculator", "ok"), ("shout", "ok")]
    shout = next(e for e in entries if e["tool"] == "shout")
    assert shout["task_id"] == results[1].task_id and shout["trace_id"] == results[1].trace_id
    assert "[EMAIL]" in shout["arguments"] and "[SECRET]" in shout["arguments"]
    assert "bob@example.com" not in shout["arguments"] and SECRETISH not in shout["arguments"]
    assert float(shout["duration_ms"]) >= 0


def test_events_are_json_log_lines_in_the_actor_logs(traced: Any) -> None:
    _pool, _receiver, results = traced
    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    found = []
    for path in glob.glob(os.path.join(logs, "worker-*.err")):
        with open(path, errors="replace") as f:
            found += [json.loads(line) for line in f if results[0].task_id in line and line.startswith("{")]
    assert {line["event"] for line in found} >= {"task_admitted", "llm_call", "tool_call", "task_end"}
    assert all(line["tenant"] == "acme" and line["trace_id"] == results[0].trace_id for line in found)


def test_content_only_when_enabled(redis_url: str) -> None:
    with OTLPReceiver() as receiver:
        pool = start(redis_url, receiver, OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT="true")
        try:
            (result,) = pool.run(
                [
                    AgentTask(
                        tenant="acme",
                        prompt='sim: tool calculator {"expression": "2+2"}\nsim: answer 4',
                        tools=["calculator"],
                    )
                ]
            )
            pool.flush_telemetry()
        finally:
            pool.shutdown()
        spans = by_name(receiver.spans(result.trace_id))
        chat = spans[f"chat {pool.config.default_model}"][0]["attributes"]
        assert "2+2" in chat["gen_ai.input.messages"] and "tool_use" in chat["gen_ai.output.messages"]
        tool = spans["execute_tool calculator"][0]["attributes"]
        assert json.loads(tool["gen_ai.tool.call.arguments"]) == {"expression": "2+2"}
        assert tool["gen_ai.tool.call.result"] == "4"


def test_trace_view_shows_the_timeline(traced: Any) -> None:
    from typer.testing import CliRunner

    from agentpool.cli import app

    pool, _receiver, results = traced
    result = results[0]
    args = ["trace", result.task_id, "--redis-url", pool.redis_url, "--prefix", pool.config.key_prefix]
    shown = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    out = shown.output
    for expected in ("task_admitted", "llm_call", "tool_use", "calculator: ok", "task_end", "succeeded"):
        assert expected in out, (expected, out)
    assert f"${result.usage.cost_usd:.6f}" in out and result.trace_id in out
    unknown = CliRunner().invoke(app, ["trace", "nope", "--redis-url", pool.redis_url, "--prefix", "x"])
    assert unknown.exit_code == 1 and "no task nope" in unknown.output


def test_status_view_shows_tenants_spend_and_breakers(traced: Any) -> None:
    from rich.console import Console

    from agentpool.views import status_view

    pool, _receiver, results = traced
    status = pool.status()
    assert status["finished_by_tenant"]["acme"] == {"succeeded": 2, "failed": 1}
    assert status["errors_by_tenant"] == {"acme": 1}
    console = Console(record=True, width=200)
    console.print(status_view(status))
    text = console.export_text()
    spend = sum(r.usage.cost_usd for r in results)
    assert "tenants" in text and "acme" in text and f"{spend:.4f}" in text
    assert "calculator" in text and "closed" in text  # the breakers


def test_prometheus_scrapes_every_process(redis_url: str) -> None:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with OTLPReceiver() as receiver:
        pool = start(
            redis_url,
            receiver,
            OTEL_TRACES_EXPORTER="none",
            OTEL_METRICS_EXPORTER="prometheus",
            OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1",
            OTEL_EXPORTER_PROMETHEUS_PORT=str(port),
        )
        try:
            (result,) = pool.run([AgentTask(tenant="acme", prompt="sim: answer hi")])
            groups = {g["labels"]["agentpool_role"]: g["targets"] for g in pool.metrics_targets()}
            scraped = {
                role: "".join(
                    urllib.request.urlopen(f"http://{t}/metrics", timeout=10).read().decode() for t in targets
                )
                for role, targets in groups.items()
            }
        finally:
            pool.shutdown()
    assert result.status == "succeeded" and not receiver.spans()  # traces off: nothing sent over OTLP
    assert {"scheduler", "worker", "tool_executor", "tool_board", "limiter"} <= set(groups)
    assert f"127.0.0.1:{port}" in [t for targets in groups.values() for t in targets]  # one got the configured port
    assert "gen_ai_client_token_usage_bucket{" in scraped["worker"] and 'le="16384"' in scraped["worker"]
    assert 'agentpool_tasks_total{agentpool_status="succeeded",agentpool_tenant="acme"' in scraped["scheduler"]
