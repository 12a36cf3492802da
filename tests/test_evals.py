"""Eval suites and scorers, pure: each rule-based scorer, custom scorers, a suite's files,
a case's pass rate and spread over its runs, the diff against a baseline and the gate."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentpool.errors import InvalidTask
from agentpool.evals import EvalCase, EvalReport, EvalSuite, Expect, Gate, case_report, diff, score_run
from agentpool.models import AgentResult, Timings, ToolCallSummary, Usage
from agentpool.vocabulary import TaskStatus


def run(answer: object = "The answer is 42.", **kw: object) -> AgentResult:
    base: dict[str, object] = {"task_id": "t", "tenant": "eval", "status": TaskStatus.SUCCEEDED, "answer": answer}
    return AgentResult(**{**base, **kw})  # type: ignore[arg-type]


def case(**expect: object) -> EvalCase:
    return EvalCase(id="c1", input="What is 6*7?", expect=Expect.model_validate(expect))


def passed(checks: dict[str, float]) -> bool:
    return all(v >= 1 for v in checks.values())


@pytest.mark.parametrize(
    ("expect", "good"),
    [
        ({"exact": "The answer is 42."}, True),
        ({"exact": "42"}, False),
        ({"contains": "42"}, True),
        ({"contains": ["answer", "43"]}, False),
        ({"regex": r"\b42\b"}, True),
        ({"regex": r"^42$"}, False),
        ({"max_cost_usd": 0.01}, True),
        ({"max_cost_usd": 0.0001}, False),
        ({"max_latency_s": 1}, True),
        ({"max_latency_s": 0.1}, False),
        ({"max_iterations": 2}, True),
        ({"max_iterations": 1}, False),
        ({"status": "failed"}, False),
    ],
)
def test_rule_scorers(expect: dict[str, object], good: bool) -> None:
    result = run(usage=Usage(cost_usd=0.001), timings=Timings(run_ms=500), iterations=2)
    assert passed(score_run(case(**expect), result)) is good


def test_json_schema_accepts_a_structured_answer_or_its_text() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert passed(score_run(case(json_schema=schema), run({"n": 42})))
    assert passed(score_run(case(json_schema=schema), run('{"n": 42}')))
    assert not passed(score_run(case(json_schema=schema), run("n is 42")))
    assert passed(score_run(case(json_schema={"type": "string"}), run("n is 42")))


def test_tool_scorers_check_names_arguments_and_order() -> None:
    calls = [("calculator", {"expression": "6*7"}), ("web_search", {"query": "42"})]
    assert passed(score_run(case(tool_called="calculator"), run(), tool_calls=calls))
    assert passed(
        score_run(case(tool_called=[{"name": "calculator", "args": {"expression": "6*7"}}]), run(), tool_calls=calls)
    )
    assert not passed(
        score_run(case(tool_called=[{"name": "calculator", "args": {"expression": "7*6"}}]), run(), tool_calls=calls)
    )
    assert passed(score_run(case(tool_sequence=["calculator", "web_search"]), run(), tool_calls=calls))
    assert not passed(score_run(case(tool_sequence=["web_search", "calculator"]), run(), tool_calls=calls))


def test_a_judges_verdict_and_custom_scorers() -> None:
    judged = case(judge={"agent": "judge@v1", "rubric": "Is it 42?", "min_score": 0.5})
    assert passed(score_run(judged, run(), verdict={"pass": True, "score": 0.9}))
    assert not passed(score_run(judged, run(), verdict={"pass": True, "score": 0.2}))
    assert not passed(score_run(judged, run(), verdict=None))  # the judge failed: not a pass

    def boom(c: EvalCase, r: AgentResult) -> bool:
        raise RuntimeError("a scorer's bug")

    checks = score_run(case(), run(), scorers={"short": lambda c, r: len(str(r.answer)) < 50, "boom": boom})
    assert checks == {"status": 1.0, "short": 1.0, "boom": 0.0}


def test_a_case_over_its_runs() -> None:
    runs = [
        ({"status": 1.0, "contains": 1.0}, run(usage=Usage(cost_usd=0.002))),
        ({"status": 1.0, "contains": 0.0}, run()),
    ]
    report = case_report("c1", runs)
    assert (report.runs, report.pass_rate, report.mean_score, report.score_std) == (2, 0.5, 0.75, 0.25)
    assert report.failed_checks == {"contains": 1} and report.cost_usd == 0.002


def report_of(version: str, rates: dict[str, float]) -> EvalReport:
    cases = [
        case_report(cid, [({"status": 1.0 if i < rate * 4 else 0.0}, run()) for i in range(4)])
        for cid, rate in rates.items()
    ]
    return EvalReport.of("suite", "support", version, 4, 0.0, cases)


def test_the_diff_and_the_gate() -> None:
    base = report_of("v1", {"a": 1.0, "b": 0.5, "c": 0.5})
    new = report_of("v2", {"a": 0.5, "b": 1.0, "c": 0.5, "d": 1.0})
    changes = {d.id: d.change for d in diff(base, new)}
    assert changes == {"a": "regressed", "b": "improved", "c": "unchanged", "d": "new"}
    assert Gate(max_drop=0.05).failures(new, base) == []  # 0.667 -> 0.75: up
    worse = report_of("v3", {"a": 0.25, "b": 0.25, "c": 0.25})
    failures = Gate(max_drop=0.05, min_pass_rate=0.5).failures(worse, base)
    assert len(failures) == 2 and "dropped" in failures[1] and "under" in failures[0]


def test_suites_load_from_jsonl_and_yaml(tmp_path: Path) -> None:
    jsonl = tmp_path / "basics.jsonl"
    jsonl.write_text('{"id": "one", "input": "hi", "expect": {"contains": "hi"}}\n\n{"id": "two", "prompt": "yo"}\n')
    suite = EvalSuite.load(jsonl, reps=3)
    assert (suite.name, [c.id for c in suite.cases], suite.reps) == ("basics", ["one", "two"], 3)
    yaml_file = tmp_path / "s.yaml"
    yaml_file.write_text(
        "name: support-basics\nreps: 2\ncases:\n  - id: a\n    prompt: hi\n    expect: {regex: 'h.'}\n"
    )
    assert EvalSuite.load(yaml_file).name == "support-basics"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"id": "a", "input": "x"}\n{"id": "a", "input": "y"}\n', "two cases with one id"),
        ('{"id": "a"}\n', "cases.0.input"),
        ('{"id": "a", "input": "x", "expect": {"regex": "("}}\n', "cases.0.expect.regex"),
        ("not json\n", "not valid JSONL"),
    ],
)
def test_a_bad_suite_says_where(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(InvalidTask, match=message.replace(".", r"\.")):
        EvalSuite.load(path)


def test_tool_summaries_stand_in_for_calls_without_arguments() -> None:
    result = run(tool_calls=[ToolCallSummary(tool_use_id="x", name="calculator", ok=True)])
    calls = [(c.name, None) for c in result.tool_calls]
    assert passed(score_run(case(tool_called="calculator"), result, tool_calls=calls))


def test_a_report_is_exact() -> None:
    times = [100.0, 300.0, 200.0, 400.0]
    cases = [
        case_report(
            f"c{i}",
            [({"status": 1.0, "x": float(i % 2)}, run(usage=Usage(cost_usd=0.001234567), timings=Timings(run_ms=t)))],
        )
        for i, t in enumerate(times)
    ]
    report = EvalReport.of("s", "support", "v1+abc", 1, 12.34567, cases, judge_cost_usd=0.00123456789)
    assert report.model_dump() == {
        "suite": "s",
        "agent": "support",
        "version": "v1+abc",
        "reps": 1,
        "started_unix": 12.346,
        "cases": [c.model_dump() for c in cases],
        "pass_rate": 0.5,
        "mean_score": 0.75,
        "cost_usd": 0.00494,  # each case rounded to 0.001235 first
        "judge_cost_usd": 0.001235,
        "p50_run_ms": 200.0,
        "p95_run_ms": 400.0,
    }
    assert [c.failed_checks for c in cases] == [{"x": 1}, {}, {"x": 1}, {}]


def test_every_check_has_its_name() -> None:
    full = case(
        exact="The answer is 42.",
        contains="42",
        regex="42",
        json_schema={"type": "string"},
        tool_called="calculator",
        tool_sequence=["calculator"],
        max_cost_usd=1,
        max_latency_s=1,
        max_iterations=3,
        judge={"agent": "j@v1", "rubric": "r"},
    )
    checks = score_run(full, run(), tool_calls=[("calculator", {})], verdict={"pass": True, "score": 1})
    assert checks == dict.fromkeys(
        ["status", "exact", "contains", "regex", "json_schema", "tool_called", "tool_sequence", "max_cost",
         "max_latency", "max_iterations", "judge"], 1.0,
    )  # fmt: skip
    assert score_run(case(), run(None))["status"] == 1.0 and score_run(case(contains="x"), run(None))["contains"] == 0.0
    assert score_run(case(exact='{"a": 1}'), run({"a": 1}))["exact"] == 1.0  # a structured answer as sorted JSON
