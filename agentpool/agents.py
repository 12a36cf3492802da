"""Versioned agent specs: what an agent is (`AgentSpec`), how a version is named, and how a
task that names an agent takes its fields.

A version is immutable and identified by the SHA-256 of its spec's canonical JSON; a label
(`v3`) may name it too, for ever. A reference reads `support` (the agent's current version,
or the one its rollout assigns), `support@v3` (a label) or `support@sha:1f2e3d` (a prefix
of the hash, at least 6 digits). Pure: no Ray, no Redis.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from agentpool.errors import InvalidTaskInput, UnknownAgent
from agentpool.models import (
    AGENT_REF_PATTERN,
    MAX_SYSTEM_CHARS,
    SPEC_FIELDS,
    SPEC_LIMITS,
    AgentTask,
    MetaValue,
    ModelName,
    ToolName,
)

AgentName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
#: A label has no colon: `sha:` starts a hash reference.
AgentLabel = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")]
#: `name`, `name@label` or `name@sha:<hex>`.
AGENT_REF = re.compile(AGENT_REF_PATTERN)
#: Digits of the hash a version is shown with (`support@sha:1f2e3d4c5b6a`).
SHORT_SHA = 12


class AgentSpec(BaseModel):
    """What an agent is: its instructions, models, tools, limits and output schema. Every
    field is checked with `AgentTask`'s own bounds."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    system: str | None = Field(default=None, max_length=MAX_SYSTEM_CHARS)
    model: ModelName | None = None
    fallback_models: list[ModelName] | None = Field(default=None, max_length=4)
    tier: int | None = Field(default=None, ge=1, le=10)
    tools: list[ToolName] = Field(default_factory=list, max_length=64)
    max_tokens: int = Field(default=1024, ge=1, le=64_000)
    max_iterations: int = Field(default=10, ge=1, le=100)
    token_budget: int | None = Field(default=None, ge=1, le=10_000_000)
    timeout_s: float = Field(default=120.0, gt=0, le=86_400)
    #: A cap for each task of this agent; a task's own `max_cost_usd` may lower it.
    max_cost_usd: float | None = Field(default=None, gt=0, le=100_000)
    output_schema: dict[str, Any] | None = None
    #: Free-form notes (owner, ticket, changelog); part of the version like everything else.
    metadata: dict[Annotated[str, StringConstraints(max_length=64)], MetaValue] = Field(default_factory=dict)

    def __init__(self, **data: Any) -> None:
        """Raises:
        InvalidTaskInput: If a field is malformed or over its bound (as for a task).
        """
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise InvalidTaskInput.from_validation(exc) from None

    @classmethod
    def model_validate(cls, obj: Any, **options: Any) -> AgentSpec:
        try:
            return super().model_validate(obj, **options)
        except ValidationError as exc:
            raise InvalidTaskInput.from_validation(exc) from None

    @model_validator(mode="after")
    def _fits_a_task(self) -> AgentSpec:
        # The same bounds as a task's (schema validity, metadata size): InvalidTaskInput if not.
        AgentTask(tenant="check", prompt="check", **self.model_dump(exclude={"metadata"}), metadata=self.metadata)
        return self

    def canonical(self) -> str:
        """The spec as canonical JSON (sorted keys, no spaces): what its version hashes."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    def digest(self) -> str:
        """The version's full identity: SHA-256 of `canonical()`, in hex."""
        return hashlib.sha256(self.canonical().encode()).hexdigest()


class AgentVersion(BaseModel):
    """One registered version of an agent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: AgentName
    sha: str = Field(pattern=r"^[0-9a-f]{64}$")
    label: AgentLabel | None = None
    created_unix: float = 0.0
    spec: AgentSpec

    @property
    def short(self) -> str:
        return self.sha[:SHORT_SHA]

    @property
    def ref(self) -> str:
        """How the version is named: by its label when it has one, else by its hash."""
        return f"{self.name}@{self.label}" if self.label else f"{self.name}@sha:{self.short}"

    @property
    def tag(self) -> str:
        """What results, events, spans and metrics carry as `agent.version`: the label and
        the short hash (`v3+1f2e3d4c5b6a`), or the short hash alone."""
        return f"{self.label}+{self.short}" if self.label else self.short


@dataclass(frozen=True)
class AgentRef:
    """A parsed reference: the name, and the label or hash prefix if it names a version."""

    name: str
    label: str | None = None
    sha: str | None = None

    @classmethod
    def parse(cls, text: str) -> AgentRef:
        """Raises:
        UnknownAgent: If `text` is not `name`, `name@label` or `name@sha:<6 to 64 hex>`.
        """
        match = AGENT_REF.match(text.strip())
        if match is None:
            raise UnknownAgent(
                f"{text!r} is not an agent reference: name, name@label or name@sha:<hex>", agent=text[:140]
            )
        return cls(match["name"], match["label"], match["sha"])

    @property
    def pinned(self) -> bool:
        """It names one version (a label or a hash), not whatever the agent runs now."""
        return self.label is not None or self.sha is not None

    def __str__(self) -> str:
        if self.sha:
            return f"{self.name}@sha:{self.sha}"
        return f"{self.name}@{self.label}" if self.label else self.name


@dataclass
class AgentCatalog:
    """The registered versions of every agent and which one each runs now: the registry's
    contents as one process holds them (read from Redis by `cluster.agents`)."""

    #: name -> sha -> version.
    versions: dict[str, dict[str, AgentVersion]]
    #: name -> label -> sha.
    labels: dict[str, dict[str, str]]
    #: name -> the sha a task naming just the agent runs (without a rollout).
    current: dict[str, str]

    @classmethod
    def empty(cls) -> AgentCatalog:
        return cls({}, {}, {})

    def add(self, version: AgentVersion, *, current: bool = False) -> None:
        self.versions.setdefault(version.name, {})[version.sha] = version
        if version.label:
            self.labels.setdefault(version.name, {})[version.label] = version.sha
        if current or version.name not in self.current:
            self.current[version.name] = version.sha

    def find(self, ref: AgentRef | str) -> AgentVersion:
        """The version a reference names (a bare name: the current one).

        Raises:
            UnknownAgent: If there is no such agent, label or hash, or a hash prefix is
                ambiguous.
        """
        ref = AgentRef.parse(ref) if isinstance(ref, str) else ref
        versions = self.versions.get(ref.name)
        if not versions:
            known = ", ".join(sorted(self.versions)[:20]) or "none"
            raise UnknownAgent(f"no agent {ref.name!r} is registered (registered: {known})", agent=str(ref))
        if ref.label is not None:
            sha = self.labels.get(ref.name, {}).get(ref.label)
            if sha is None:
                labels = ", ".join(sorted(self.labels.get(ref.name, {}))[:20]) or "none"
                raise UnknownAgent(f"agent {ref.name!r} has no label {ref.label!r} (labels: {labels})", agent=str(ref))
            return versions[sha]
        if ref.sha is not None:
            hits = [v for sha, v in versions.items() if sha.startswith(ref.sha)]
            if len(hits) != 1:
                what = "no version" if not hits else f"{len(hits)} versions"
                raise UnknownAgent(f"agent {ref.name!r} has {what} whose hash starts {ref.sha!r}", agent=str(ref))
            return hits[0]
        return versions[self.current[ref.name]]

    def history(self, name: str) -> list[AgentVersion]:
        """The agent's versions, oldest first."""
        return sorted(self.versions.get(name, {}).values(), key=lambda v: (v.created_unix, v.sha))


def apply_spec(task: AgentTask, version: AgentVersion, **changes: Any) -> AgentTask:
    """The task with its agent's fields filled in from `version` and the version recorded
    (`agent`, `agent_version`); `changes` set other fields too (a shadow copy's). The task's
    own `max_cost_usd` may lower the spec's."""
    spec = version.spec
    cap = spec.max_cost_usd
    if task.max_cost_usd is not None:
        cap = task.max_cost_usd if cap is None else min(cap, task.max_cost_usd)
    filled: dict[str, Any] = {f: getattr(spec, f) for f in (*SPEC_FIELDS, *SPEC_LIMITS)}
    filled["tools"] = list(spec.tools)
    filled["fallback_models"] = list(spec.fallback_models) if spec.fallback_models is not None else None
    return task.model_copy(
        update={**filled, "max_cost_usd": cap, "agent": version.name, "agent_version": version.tag, **changes}
    )


def spec_diff(old: AgentVersion, new: AgentVersion) -> str:
    """A unified diff of two versions' specs (indented JSON, sorted keys)."""

    def lines(version: AgentVersion) -> list[str]:
        return json.dumps(version.spec.model_dump(mode="json"), indent=2, sort_keys=True).splitlines(keepends=True)

    return "".join(difflib.unified_diff(lines(old), lines(new), fromfile=old.ref, tofile=new.ref))
