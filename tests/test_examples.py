"""The files under examples/ (agent specs, a judge, an eval suite, live traffic) load as
the README's shell cycle uses them."""

from __future__ import annotations

from pathlib import Path

from agentpool.evals import EvalSuite
from agentpool.models import AgentTask
from agentpool.pool_agents import read_spec_file

ROOT = Path(__file__).resolve().parent.parent / "examples"


def test_the_examples_load() -> None:
    specs = {path.stem: read_spec_file(path) for path in sorted((ROOT / "agents").glob("*.yaml"))}
    assert {name for name, _, _ in specs.values()} == {"support", "judge"}
    assert [label for _, label, _ in specs.values()] == ["v1", "v1", "v2", "v3"]
    suite = EvalSuite.load(ROOT / "evals" / "support.jsonl")
    assert suite.name == "support" and len(suite.cases) == 4
    traffic = [AgentTask.model_validate_json(line) for line in (ROOT / "traffic.jsonl").read_text().splitlines()]
    assert len(traffic) == 100 and {t.agent for t in traffic} == {"support"}
