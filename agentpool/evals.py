"""Eval suites and their scorers: what a case expects of an agent's answer, how a run of it
is scored, a suite's summary, its diff against a baseline, and the gate a CI job checks.
Pure: the runs come in as `AgentResult`s (`agentpool.eval_run` makes them through a pool).

A suite is JSONL (one case a line) or YAML (a list of cases, or `{name, reps, cases}`). A
case is `{id, prompt, metadata, expect}`; `expect` holds any of the scorers of `Expect`.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from agentpool.errors import InvalidTask
from agentpool.models import MAX_PROMPT_CHARS, AgentResult, MetaValue, TaskStatus

#: A custom scorer: (the case, the run's result) -> passed (or a score in [0, 1]).
Scorer = Callable[["EvalCase", AgentResult], "bool | float"]
MAX_CASES = 10_000
#: What a judge answers (its spec's `output_schema`).
VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"pass": {"type": "boolean"}, "score": {"type": "number"}, "reason": {"type": "string"}},
    "required": ["pass", "score"],
}


class ToolExpect(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    #: Arguments the call must have (a subset: other arguments may be there too).
    args: dict[str, Any] | None = None


class JudgeExpect(BaseModel):
    """A model-graded check: a judge agent (a registered, versioned spec whose output is
    `VERDICT_SCHEMA`) reads the rubric, the prompt and the answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    agent: str = Field(min_length=1, max_length=140)
    rubric: str = Field(min_length=1, max_length=20_000)
    min_score: float = Field(default=0.5, ge=0, le=1)


class Expect(BaseModel):
    """What a run must show to pass; every scorer given must pass."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    status: TaskStatus = TaskStatus.SUCCEEDED
    exact: str | None = None
    contains: list[str] | None = None
    regex: str | None = None
    json_schema: dict[str, Any] | None = None
    tool_called: list[ToolExpect] | None = None
    tool_sequence: list[str] | None = None
    max_cost_usd: float | None = Field(default=None, ge=0)
    max_latency_s: float | None = Field(default=None, gt=0)
    max_iterations: int | None = Field(default=None, ge=1)
    judge: JudgeExpect | None = None
    #: Python scorers, as `module:function` (see `Scorer`).
    custom: list[str] | None = None

    @field_validator("contains", "custom", mode="before")
    @classmethod
    def _listed(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("tool_called", mode="before")
    @classmethod
    def _tools(cls, value: Any) -> Any:
        items = value if isinstance(value, list) else [value] if value is not None else None
        return [{"name": v} if isinstance(v, str) else v for v in items] if items is not None else None

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return value


class EvalCase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, alias="input")
    metadata: dict[str, MetaValue] = Field(default_factory=dict)
    expect: Expect = Field(default_factory=Expect)


class EvalSuite(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
    cases: list[EvalCase] = Field(min_length=1, max_length=MAX_CASES)
    #: Runs per case: model outputs vary, so a case's pass rate and its spread are measured.
    reps: int = Field(default=1, ge=1, le=100)

    @classmethod
    def load(cls, path: str | Path, *, reps: int | None = None) -> EvalSuite:
        """Reads a suite file (`.jsonl`, `.json`, `.yaml`, `.yml`); its name is the file's
        stem unless it says otherwise.

        Raises:
            InvalidTask: If the file cannot be read or a case is malformed (with where).
        """
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise InvalidTask(f"cannot read the suite {str(path)!r}: {exc.strerror}") from None
        raw: Any
        try:
            if path.suffix == ".jsonl":
                raw = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                raw = yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise InvalidTask(f"the suite {path.name} is not valid {path.suffix[1:].upper()}: {exc}") from None
        body = raw if isinstance(raw, dict) else {"cases": raw}
        body = {"name": path.stem, **body}
        if reps is not None:
            body["reps"] = reps
        try:
            suite = cls.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise InvalidTask(f"the suite {path.name} is invalid at {where}: {first['msg']}") from None
        ids = [c.id for c in suite.cases]
        if len(set(ids)) != len(ids):
            raise InvalidTask(f"the suite {path.name} has two cases with one id")
        return suite


def load_scorer(ref: str) -> Scorer:
    """The function `module:function` names.

    Raises:
        InvalidTask: If it cannot be imported or is not callable.
    """
    module_name, _, attr = ref.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise InvalidTask(f"cannot load the scorer {ref!r}: {exc}") from None
    if not callable(found):
        raise InvalidTask(f"the scorer {ref!r} is not a function")
    return found  # type: ignore[no-any-return]  # a user's function: checked callable above


def _answer_text(result: AgentResult) -> str:
    answer = result.answer
    if answer is None:
        return ""
    return answer if isinstance(answer, str) else json.dumps(answer, sort_keys=True)


def _called(want: ToolExpect, calls: Sequence[tuple[str, dict[str, Any] | None]]) -> bool:
    return any(name == want.name and _subset(want.args or {}, args or {}) for name, args in calls)


def _subset(expected: dict[str, Any], actual: dict[str, Any]) -> bool:
    return all(k in actual and actual[k] == v for k, v in expected.items())


def score_run(
    case: EvalCase,
    result: AgentResult,
    *,
    tool_calls: Sequence[tuple[str, dict[str, Any] | None]] = (),
    verdict: dict[str, Any] | None = None,
    scorers: dict[str, Scorer] | None = None,
) -> dict[str, float]:
    """Each check of the case on one run, scored in [0, 1] (1: passed). `tool_calls` are the
    run's tool calls in order with their arguments; `verdict`, its judge's answer."""
    expect, text = case.expect, _answer_text(result)
    checks: dict[str, float] = {"status": float(result.status == expect.status)}
    if expect.exact is not None:
        checks["exact"] = float(text.strip() == expect.exact.strip())
    if expect.contains:
        checks["contains"] = float(all(part.lower() in text.lower() for part in expect.contains))
    if expect.regex is not None:
        checks["regex"] = float(re.search(expect.regex, text) is not None)
    if expect.json_schema is not None:
        checks["json_schema"] = float(_fits(result.answer, expect.json_schema))
    if expect.tool_called:
        checks["tool_called"] = float(all(_called(want, tool_calls) for want in expect.tool_called))
    if expect.tool_sequence is not None:
        checks["tool_sequence"] = float([n for n, _ in tool_calls] == expect.tool_sequence)
    if expect.max_cost_usd is not None:
        checks["max_cost"] = float(result.usage.cost_usd <= expect.max_cost_usd)
    if expect.max_latency_s is not None:
        checks["max_latency"] = float(result.timings.run_ms <= expect.max_latency_s * 1000)
    if expect.max_iterations is not None:
        checks["max_iterations"] = float(result.iterations <= expect.max_iterations)
    if expect.judge is not None:
        score = float((verdict or {}).get("score") or 0.0) if verdict is not None else 0.0
        checks["judge"] = float(bool((verdict or {}).get("pass")) and score >= expect.judge.min_score)
    for name, scorer in (scorers or {}).items():
        try:
            value = scorer(case, result)
        except Exception:  # a user's scorer that raises fails its check, not the suite
            value = False
        checks[name] = min(1.0, max(0.0, float(value)))
    return checks


def _fits(answer: Any, schema: dict[str, Any]) -> bool:
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(schema)
    if isinstance(answer, str):  # a JSON text is checked as its value, any other text as a string
        try:
            return validator.is_valid(json.loads(answer))
        except json.JSONDecodeError:
            pass
    return validator.is_valid(answer)


class CaseReport(BaseModel):
    """A case over its runs: its pass rate, mean score and spread, cost and time."""

    model_config = ConfigDict(extra="forbid")

    id: str
    runs: int
    pass_rate: float
    mean_score: float
    score_std: float
    cost_usd: float
    mean_run_ms: float
    #: The checks that failed in some run, with how many runs failed each.
    failed_checks: dict[str, int] = Field(default_factory=dict)


def case_report(case_id: str, runs: Sequence[tuple[dict[str, float], AgentResult]]) -> CaseReport:
    scores = [sum(c.values()) / len(c) for c, _ in runs]
    failed: dict[str, int] = {}
    for checks, _ in runs:
        for name, value in checks.items():
            if value < 1:
                failed[name] = failed.get(name, 0) + 1
    return CaseReport(
        id=case_id,
        runs=len(runs),
        pass_rate=round(sum(all(v >= 1 for v in c.values()) for c, _ in runs) / len(runs), 4),
        mean_score=round(statistics.fmean(scores), 4),
        score_std=round(statistics.pstdev(scores), 4) if len(scores) > 1 else 0.0,
        cost_usd=round(sum(r.usage.cost_usd for _, r in runs), 6),
        mean_run_ms=round(statistics.fmean(r.timings.run_ms for _, r in runs), 1),
        failed_checks=failed,
    )


class EvalReport(BaseModel):
    """One run of a suite on one version of an agent."""

    model_config = ConfigDict(extra="forbid")

    suite: str
    agent: str
    version: str
    reps: int
    started_unix: float
    cases: list[CaseReport]
    pass_rate: float
    mean_score: float
    cost_usd: float
    #: What the judge's calls cost (not in `cost_usd`).
    judge_cost_usd: float = 0.0
    p50_run_ms: float
    p95_run_ms: float

    @classmethod
    def of(cls, suite: str, agent: str, version: str, reps: int, started: float, cases: list[CaseReport],
           judge_cost_usd: float = 0.0) -> EvalReport:  # fmt: skip
        runs = sum(c.runs for c in cases)
        times = sorted(c.mean_run_ms for c in cases)
        return cls(
            suite=suite,
            agent=agent,
            version=version,
            reps=reps,
            started_unix=round(started, 3),
            cases=cases,
            pass_rate=round(sum(c.pass_rate * c.runs for c in cases) / runs, 4),
            mean_score=round(sum(c.mean_score * c.runs for c in cases) / runs, 4),
            cost_usd=round(sum(c.cost_usd for c in cases), 6),
            judge_cost_usd=round(judge_cost_usd, 6),
            p50_run_ms=times[max(0, math.ceil(0.5 * len(times)) - 1)],
            p95_run_ms=times[max(0, math.ceil(0.95 * len(times)) - 1)],
        )


class CaseDiff(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    change: str  # improved | regressed | unchanged | new
    baseline: float | None
    candidate: float


def diff(baseline: EvalReport, candidate: EvalReport) -> list[CaseDiff]:
    """Each case of the candidate against the baseline's pass rate."""
    before = {c.id: c.pass_rate for c in baseline.cases}
    out = []
    for case in candidate.cases:
        old = before.get(case.id)
        change = (
            "new" if old is None
            else "improved" if case.pass_rate > old
            else "regressed" if case.pass_rate < old
            else "unchanged"
        )  # fmt: skip
        out.append(CaseDiff(id=case.id, change=change, baseline=old, candidate=case.pass_rate))
    return out


class Gate(BaseModel):
    """When an eval fails a CI job."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The least pass rate.
    min_pass_rate: float = Field(default=0.0, ge=0, le=1)
    #: The most the pass rate may drop below the baseline's.
    max_drop: float = Field(default=0.05, ge=0, le=1)

    def failures(self, report: EvalReport, baseline: EvalReport | None) -> list[str]:
        """Why the gate fails (empty: it passes)."""
        out = []
        if report.pass_rate < self.min_pass_rate:
            out.append(f"pass rate {report.pass_rate:.1%} is under {self.min_pass_rate:.1%}")
        if baseline is not None and baseline.pass_rate - report.pass_rate > self.max_drop + 1e-9:
            out.append(
                f"pass rate {report.pass_rate:.1%} dropped {baseline.pass_rate - report.pass_rate:.1%} below "
                f"{baseline.version}'s {baseline.pass_rate:.1%} (at most {self.max_drop:.1%})"
            )
        return out
