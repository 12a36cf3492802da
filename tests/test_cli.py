"""The `agentpool` command: submit a JSONL batch, then read the results back from Redis."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agentpool.cli import app

pytestmark = pytest.mark.usefixtures("ray_session")


def test_submit_then_results(tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = f"cli{uuid.uuid4().hex[:8]}"
    for key, value in {
        "AGENTPOOL_REDIS_URL": redis_url,
        "AGENTPOOL_KEY_PREFIX": prefix,
        "AGENTPOOL_NAME": f"cli{uuid.uuid4().hex[:6]}",
        "AGENTPOOL_NUM_WORKERS": "1",
    }.items():
        monkeypatch.setenv(key, value)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(
        json.dumps({"task_id": "calc-1", "tenant": "acme", "prompt": "What is 6*7?", "tools": ["calculator"]})
        + "\n\n"
        + json.dumps({"task_id": "hi-1", "tenant": "acme", "prompt": "sim: answer hello"})
        + "\n"
    )
    out = tmp_path / "results.jsonl"
    runner = CliRunner()
    submitted = runner.invoke(app, ["submit", str(tasks), "--output", str(out)])
    assert submitted.exit_code == 0, submitted.output
    assert "Results by tenant" in submitted.output and "XREAD" in submitted.output
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["task_id"] for r in written] == ["calc-1", "hi-1"] and "42" in written[0]["answer"]
    listed = runner.invoke(app, ["results", "acme"])
    assert listed.exit_code == 0, listed.output
    # the stream is in completion order
    assert sorted(json.loads(line)["task_id"] for line in listed.output.splitlines()) == ["calc-1", "hi-1"]


def test_submit_reports_the_bad_line(tmp_path: Path) -> None:
    tasks = tmp_path / "bad.jsonl"
    tasks.write_text('{"tenant": "acme", "prompt": "ok"}\n{"tenant": "no spaces allowed", "prompt": "x"}\n')
    result = CliRunner().invoke(app, ["submit", str(tasks)])
    assert result.exit_code == 2 and "line 2" in result.output and "tenant" in result.output
