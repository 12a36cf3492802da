"""What a new user meets first, each fixed once (issue 19): configuration told in the names
of the variables, input refused at the edge with one typed error, the CLI's one-line errors
and masked secrets, and the small things (a refusal retried, a p95 below the p50)."""

from __future__ import annotations

import asyncio
import json
import math
import pickle
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx2
import pytest
import ray
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from typer.testing import CliRunner

import agentpool
from agentpool import AgentPool, AgentResult, AgentTask, PoolConfig, Timings
from agentpool.actors.backoff import classify
from agentpool.actors.tool_runtime import ToolRunner
from agentpool.batch_view import redis_cli_command, summary_table
from agentpool.cli import app
from agentpool.errors import ConfigError, InvalidConfig, InvalidTaskInput
from agentpool.protocol import ToolCall
from agentpool.tools import load_tools
from tests.pools import small_config
from tests.scenarios import ROOT, token_auth_env

pytestmark = pytest.mark.usefixtures("ray_session")

#: A Redis password as the embedded server makes them, inside a URL.
PASSWORD_IN_URL = re.compile(r"://[^/\s@]*:[A-Za-z0-9_-]{16,}@")


# --- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("AGENTPOOL_NUM_WORKERS", "abc", "AGENTPOOL_NUM_WORKERS='abc': Input should be a valid integer"),
        ("AGENTPOOL_NUM_WORKERS", "0", "AGENTPOOL_NUM_WORKERS='0': Input should be greater than or equal to 1"),
        ("AGENTPOOL_TENANTS", "acme", "AGENTPOOL_TENANTS='acme': not valid; expected JSON, e.g. {\"acme\""),
        ("AGENTPOOL_SIMULATOR__LATENCY_MS", "fast", "AGENTPOOL_SIMULATOR__LATENCY_MS='fast'"),
        ("AGENTPOOL_NUM_WORKER", "2", "AGENTPOOL_NUM_WORKER is not a setting (did you mean AGENTPOOL_NUM_WORKERS?)"),
        ("AGENTPOOL_SIMULATOR__LATENCY", "2", "AGENTPOOL_SIMULATOR__LATENCY is not a setting"),
    ],
)
def test_configuration_errors_name_the_variable(
    variable: str, value: str, said: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(InvalidConfig) as info:
        PoolConfig()
    assert said in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)


def test_known_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTPOOL_TOOL_MODULES", "tests.toolkit, agentpool.chaos_tools")  # commas, or JSON
    monkeypatch.setenv("AGENTPOOL_FALLBACK_MODELS", '["claude-haiku-4-5"]')
    monkeypatch.setenv("AGENTPOOL_TENANTS__ACME__WEIGHT", "3")  # any key under a mapping
    monkeypatch.setenv("AGENTPOOL_RAY_ADDRESS", "auto")  # every field under AGENTPOOL_, aliases too
    monkeypatch.setenv("AGENTPOOL_DEBUG", "1")  # the command line's own
    config = PoolConfig()
    assert config.tool_modules == ["tests.toolkit", "agentpool.chaos_tools"]
    assert config.fallback_models == ["claude-haiku-4-5"]
    assert config.tenants["acme"].weight == 3 and config.ray_address == "auto"


def test_a_bad_tool_module_is_refused_before_anything_starts() -> None:
    started = time.monotonic()
    before = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    with pytest.raises(ConfigError) as info:
        AgentPool.start(PoolConfig(name=f"m{uuid.uuid4().hex[:6]}", tool_modules=["no_such_pkg.tools"]))
    assert str(info.value) == (
        "cannot import tool module 'no_such_pkg.tools' (PoolConfig.tool_modules, AGENTPOOL_TOOL_MODULES): "
        "ModuleNotFoundError: No module named 'no_such_pkg'"
    )
    assert time.monotonic() - started < 5
    assert {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)} == before
    with pytest.raises(ConfigError, match="defines no tools"):
        load_tools(["tests.scenarios"])


# --- input -------------------------------------------------------------------------------


def test_the_public_errors_and_models_import_from_agentpool() -> None:
    for name in ("InvalidTaskInput", "InvalidConfig", "Guardrails", "StoreError", "StoreUnavailable", "AgentPool"):
        assert hasattr(agentpool, name) and name in agentpool.__all__, name


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"prompt": "  \n\t "}, "prompt: Value error, the prompt is blank"),
        ({"prompt": "hi", "timeout_s": math.nan}, "timeout_s: Input should be a finite number"),
        ({"prompt": "hi", "deadline_s": math.inf}, "deadline_s: Input should be a finite number"),
        ({"prompt": "hi", "tenant": "a b"}, "tenant: String should match pattern"),
    ],
)
def test_a_bad_task_raises_invalid_task_input_which_is_also_pydantics(fields: dict[str, object], said: str) -> None:
    with pytest.raises(InvalidTaskInput) as info:
        AgentTask(**{"tenant": "acme", **fields})  # type: ignore[arg-type]
    error = info.value
    assert said in str(error) and isinstance(error, ValidationError) and isinstance(error, ValueError)
    assert error.errors[0]["index"] is None and error.errors[0]["loc"]  # ours: a list of problems
    assert error.errors(include_url=False)[0]["loc"] == tuple(error.errors[0]["loc"])  # pydantic's, when called
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is InvalidTaskInput and str(back) == str(error) and back.errors == error.errors
    with pytest.raises(InvalidTaskInput):
        AgentTask.model_validate_json(json.dumps({"tenant": "acme", **fields}, allow_nan=True))


@pytest.fixture(scope="module")
def pool(redis_url: str) -> Iterator[AgentPool]:
    p = AgentPool.start(small_config(redis_url, tag="r"))
    yield p
    p.shutdown()


def test_unknown_tools_are_refused_at_submit(pool: AgentPool) -> None:
    tasks = [
        AgentTask(tenant="acme", prompt="ok", tools=["calculator"]),
        AgentTask(tenant="acme", prompt="no", tools=["calculator", "teleport"]),
    ]
    with pytest.raises(InvalidTaskInput, match=r"task 1, tools\.1: unknown tool 'teleport'") as info:
        pool.submit(tasks)
    assert info.value.errors == [
        {"index": 1, "loc": ["tools", 1], "msg": info.value.errors[0]["msg"], "type": "unknown_tool"}
    ]
    with pytest.raises(InvalidTaskInput):
        pool.enqueue(tasks)
    assert pool.status()["durability"]["jobs"] == 0  # nothing of the batch was sent


def test_a_deterministic_tool_refusal_runs_once() -> None:
    runner = ToolRunner(load_tools(["agentpool.builtin_tools"]))
    expression = "__import__('os').system('true')"
    call = ToolCall(
        task_id="t", tenant="acme", tool_use_id="u1", name="calculator", arguments={"expression": expression}
    )

    outcome = asyncio.run(runner.execute(call))
    assert outcome.is_error and outcome.error_kind == "invalid_arguments" and outcome.attempts == 1


def test_a_connection_error_says_which_provider_url_failed() -> None:
    exc = anthropic.APIConnectionError(request=httpx2.Request("POST", "http://127.0.0.1:9/v1/messages?beta=true"))
    decision = classify(exc)
    assert decision.action == "retry" and "calling http://127.0.0.1:9/v1/messages" in decision.message
    assert "beta" not in decision.message


# --- the CLI -----------------------------------------------------------------------------


@pytest.fixture
def cli_env(pool: AgentPool, monkeypatch: pytest.MonkeyPatch) -> AgentPool:
    monkeypatch.setenv("AGENTPOOL_NAME", pool.config.name)
    monkeypatch.delenv("AGENTPOOL_REDIS_URL", raising=False)
    monkeypatch.delenv("AGENTPOOL_KEY_PREFIX", raising=False)
    return pool


def test_every_bad_line_of_a_file_is_reported_in_one_pass(tmp_path: Path) -> None:
    path = tmp_path / "tasks.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"tenant": "acme", "prompt": "fine"}),
                json.dumps({"tenant": "bad tenant", "prompt": "x"}),
                "not json at all",
                json.dumps({"tenant": "acme", "prompt": "   "}),
                json.dumps({"tenant": "acme", "prompt": "x", "timeout_s": "NaN"}),
            ]
        )
    )
    result = CliRunner().invoke(app, ["submit", str(path)])
    assert result.exit_code == 2
    for fragment in ("4 problem(s)", "line 2: tenant", "line 3:", "line 4: prompt", "line 5: timeout_s"):
        assert fragment in result.output, result.output
    assert "Traceback" not in result.output


def test_errors_are_one_line_and_tracebacks_need_debug(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps({"tenant": "acme", "prompt": "hi"}) + "\n")
    monkeypatch.setenv("AGENTPOOL_NUM_WORKERS", "abc")
    plain = CliRunner().invoke(app, ["submit", str(path)])
    assert plain.exit_code == 1 and "Traceback" not in plain.output
    lines = plain.output.strip().splitlines()
    assert len(lines) == 1 and "AGENTPOOL_NUM_WORKERS='abc'" in lines[0], plain.output
    debug = CliRunner().invoke(app, ["--debug", "submit", str(path)])
    assert isinstance(debug.exception, InvalidConfig)  # raised, for the traceback


def test_readers_find_the_pool_s_redis_by_name(cli_env: AgentPool) -> None:
    done = cli_env.run([AgentTask(tenant="acme", prompt="sim: answer by name")])[0]
    runner = CliRunner()
    listed = runner.invoke(app, ["results", "acme"])
    assert listed.exit_code == 0, listed.output
    assert done.task_id in [json.loads(line)["task_id"] for line in listed.output.splitlines()]
    traced = runner.invoke(app, ["trace", done.task_id, "--json"])
    assert traced.exit_code == 0 and "task_end" in traced.output
    ended = runner.invoke(app, ["cancel", done.task_id])  # ended already: its record, not "no task"
    assert ended.exit_code == 0 and "had already ended: succeeded" in ended.output
    assert AgentResult.model_validate_json(ended.output.strip().splitlines()[-1]) == done
    assert cli_env.cancel(done.task_id) == done
    assert runner.invoke(app, ["cancel", "no-such-task"]).exit_code == 1


def test_no_command_prints_a_redis_password(cli_env: AgentPool, tmp_path: Path, redis_url: str) -> None:
    secret = re.search(r"://[^/@]*:([^@/]+)@", redis_url)
    assert secret is not None, "the test Redis must have a password for this test to mean anything"
    password = secret.group(1)
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps({"tenant": "acme", "prompt": "sim: answer masked"}) + "\n")
    runner = CliRunner()
    outputs = {
        "submit --detach": runner.invoke(app, ["submit", str(path), "--detach"]),
        "status": runner.invoke(app, ["status"]),
        "status --json": runner.invoke(app, ["status", "--json"]),
        "results, unreachable": runner.invoke(
            app, ["results", "acme", "--redis-url", "redis://:hunter2@127.0.0.1:1/0"]
        ),
    }
    for command, result in outputs.items():
        assert password not in result.output and "hunter2" not in result.output, command
        assert not PASSWORD_IN_URL.search(result.output), (command, result.output)
    assert outputs["submit --detach"].exit_code == 0 and ":***@" in outputs["submit --detach"].output
    unreachable = outputs["results, unreachable"]
    assert unreachable.exit_code == 1 and "cannot reach Redis at redis://:***@127.0.0.1:1/0" in unreachable.output
    assert len(unreachable.output.strip().splitlines()) == 1


def test_the_demo_shows_no_password_and_a_working_redis_cli_command(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("AGENTPOOL_REDIS_URL", "AGENTPOOL_NAME", "AGENTPOOL_KEY_PREFIX"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AGENTPOOL_NAME", f"d{uuid.uuid4().hex[:6]}")
    monkeypatch.setenv("AGENTPOOL_NUM_WORKERS", "1")
    result = CliRunner().invoke(app, ["demo", "--tasks", "7", "--latency-ms", "1"])
    assert result.exit_code == 0, result.output
    assert "Results by tenant" in result.output and "redis://default:***@127.0.0.1" in result.output
    assert not PASSWORD_IN_URL.search(result.output) and "-h :" not in result.output
    assert redis_cli_command("redis://:pw@10.0.0.5:6380/2") == "redis-cli -h 10.0.0.5 -p 6380 -n 2 --askpass"
    assert redis_cli_command("rediss://app:pw@host/0") == "redis-cli -h host -p 6379 --tls --user app --askpass"
    assert redis_cli_command("redis://localhost:6379/0") == "redis-cli -h localhost -p 6379"


@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=30))
def test_the_summary_p95_is_never_below_the_p50(latencies: list[float]) -> None:
    results = [
        AgentResult(task_id=f"t{i}", tenant="acme", status="succeeded", timings=Timings(total_ms=ms))
        for i, ms in enumerate(latencies)
    ]
    row = summary_table(results).columns
    p50, p95 = float(row[7]._cells[0]), float(row[8]._cells[0])
    assert p95 >= p50


@pytest.mark.parametrize("ray_of_the_user", [False, True], ids=["pool-started-ray", "user-started-ray"])
def test_a_shutdown_with_work_in_flight_prints_nothing_of_ray(ray_of_the_user: bool) -> None:
    """It used to print a "(raylet) Task Scheduler.run failed ... will be retried" line per
    unanswered call: the pool now withdraws its calls, then stops callers before callees.
    With a Ray the user started (its defaults send the actors' output to the driver), the
    pool's actors print nothing either: the limiter's start used to print Ray's deprecation
    warning about `actor_id`, three lines, at every pool start."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.shutdown_scenario", *(["own-ray"] if ray_of_the_user else [])],
        env={**token_auth_env(), "RAY_ADDRESS": "local"},  # a Ray of its own, not the suite's
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"shut_down": True, "refs": 20}
    noise = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if "raylet" in line or "retries" in line or "pid=" in line  # `(Actor pid=N)`: an actor's output
    ]
    assert not noise, noise[:5]
