"""The pool handle's agents and rollouts: `pool.agents` registers, lists, shows and diffs
versioned agent specs (kept in Redis), `pool.rollouts` starts, steers and reports this
pool's rollouts (run by its scheduler)."""

from __future__ import annotations

import builtins
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import yaml

from agentpool.agents import AgentCatalog, AgentRef, AgentSpec, AgentVersion, spec_diff
from agentpool.cluster.agents import AgentRegistry
from agentpool.cluster.keys import Keys
from agentpool.config import PoolConfig
from agentpool.errors import InvalidTask, UnknownTool
from agentpool.eval_run import EVAL_TENANT, EvalOutcome, evaluate
from agentpool.evals import EvalSuite, Gate, Scorer
from agentpool.pool_front import _blocking
from agentpool.rollouts import Rollout


def read_spec_file(path: str | Path) -> tuple[str, str | None, AgentSpec]:
    """An agent spec file (YAML or JSON): `name`, an optional `label`, and the spec's fields
    (at the top level, or under `spec`). Returns (name, label, spec).

    Raises:
        InvalidTask: If the file cannot be read, or the spec is invalid (`InvalidTaskInput`).
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidTask(f"cannot read the agent spec {str(path)!r}: {exc}") from None
    if not isinstance(raw, dict) or "name" not in raw:
        raise InvalidTask(f"the agent spec {path.name} needs a mapping with `name` and the spec's fields")
    name, label = str(raw.pop("name")), raw.pop("label", None)
    fields = raw.pop("spec", None) or raw
    return name, (str(label) if label is not None else None), AgentSpec.model_validate(fields)


class Agents:
    """The registry of versioned agent specs (`pool.agents`)."""

    def __init__(
        self, config: PoolConfig, redis_url: str, scheduler: Any, tools: Collection[str], check: Callable[[], None]
    ) -> None:
        self._config = config
        self._redis_url = redis_url
        self._scheduler = scheduler
        self._tools = tools
        self._check = check

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        keys = Keys(self._config.key_prefix)
        return _blocking(self._redis_url, lambda r: getattr(AgentRegistry(r, keys), method)(*args, **kwargs))

    def register(
        self, name: str, spec: AgentSpec | dict[str, Any], *, label: str | None = None, current: bool = False
    ) -> AgentVersion:
        """Registers a version of the agent `name` (the same spec again is the same version).
        A new version is labelled `v<n>` unless `label` says otherwise; the agent's first
        version is its current one (what `AgentTask(agent=name)` runs when no rollout says
        otherwise), a later one only with `current=True` (or `use`, or a rollout's promotion).

        Raises:
            InvalidTaskInput: If the spec is invalid.
            UnknownTool: If it names a tool this pool does not have.
            AgentConflict: If the label names another version, or this one has another.
        """
        self._check()
        AgentRef.parse(name if label is None else f"{name}@{label}")
        spec = spec if isinstance(spec, AgentSpec) else AgentSpec.model_validate(spec)
        unknown = [t for t in spec.tools if t not in self._tools]
        if unknown:
            raise UnknownTool(f"unknown tools {unknown}; this pool has {sorted(self._tools)}", tools=unknown)
        version, _ = self._call("register", name, spec, label=label, current=current)
        ray.get(self._scheduler.reload_agents.remote())
        return version

    def catalog(self) -> AgentCatalog:
        self._check()
        return self._call("catalog")

    def get(self, ref: str) -> AgentVersion:
        """The version `ref` names (`support`: the current one; `support@v3`;
        `support@sha:1f2e3d`).

        Raises:
            UnknownAgent: If there is no such agent or version.
        """
        return self.catalog().find(ref)

    def list(self) -> builtins.list[dict[str, Any]]:
        """Each agent: its name, current version, and every version (oldest first)."""
        catalog = self.catalog()
        return [
            {
                "name": name,
                "current": catalog.find(name).ref,
                "versions": [
                    {"ref": v.ref, "sha": v.short, "created_unix": v.created_unix} for v in catalog.history(name)
                ],
            }
            for name in sorted(catalog.versions)
        ]

    def diff(self, old: str, new: str) -> str:
        """A unified diff of two versions' specs."""
        catalog = self.catalog()
        return spec_diff(catalog.find(old), catalog.find(new))

    def use(self, ref: str) -> AgentVersion:
        """Makes a version the agent's current one, at once, for all its traffic (a rollout
        does it in steps)."""
        version = self.get(ref)
        self._call("set_current", version.name, version.sha)
        ray.get(self._scheduler.reload_agents.remote())
        return version


class Rollouts:
    """This pool's rollouts of agents' versions (`pool.rollouts`)."""

    def __init__(self, config: PoolConfig, redis_url: str, scheduler: Any, check: Callable[[], None]) -> None:
        self._config = config
        self._redis_url = redis_url
        self._scheduler = scheduler
        self._check = check

    def start(self, rollout: Rollout) -> dict[str, Any]:
        """Starts a shadow or a canary (ending the agent's live rollout, if any, as
        replaced). Returns its status.

        Raises:
            UnknownAgent: If the agent or a version is not registered.
            AgentConflict: If stable and candidate are one version.
        """
        self._check()
        return ray.get(self._scheduler.start_rollout.remote(rollout))

    def status(self, agent: str | None = None) -> dict[str, Any]:
        """Every rollout of the pool (or the agent's): phase, canary share, each side's
        failure rate, p95 run time, mean cost and score, the rule's latest look at each
        measure, the shadow's comparison and spend, and the transitions."""
        self._check()
        every: dict[str, Any] = ray.get(self._scheduler.rollout_status.remote())
        return every if agent is None else {agent: every[agent]} if agent in every else {}

    def promote(self, agent: str, *, reason: str = "") -> dict[str, Any]:
        """One step up by hand (a shadow becomes a canary at its first step)."""
        self._check()
        return ray.get(self._scheduler.steer_rollout.remote(agent, True, reason))

    def rollback(self, agent: str, *, reason: str = "") -> dict[str, Any]:
        """Withdraws the candidate: stable takes all traffic again."""
        self._check()
        return ray.get(self._scheduler.steer_rollout.remote(agent, False, reason))

    def transitions(self, *, count: int = 100) -> builtins.list[dict[str, str]]:
        """The latest transitions of this pool's rollouts, oldest first (a Redis stream)."""
        self._check()
        keys, pool = Keys(self._config.key_prefix), self._config.name
        found: builtins.list[dict[str, str]] = _blocking(
            self._redis_url, lambda r: AgentRegistry(r, keys).transitions(pool, count=count)
        )
        return found


class PoolAgents:
    """`pool.agents`, `pool.rollouts` and `pool.evaluate` (a mixin of `AgentPool`)."""

    config: PoolConfig
    _redis_url: str
    _scheduler: Any
    tools: frozenset[str] | None

    if TYPE_CHECKING:  # AgentPool's; declared here for the type checker only

        def _check_running(self) -> None: ...

    @property
    def agents(self) -> Agents:
        """The registry of versioned agent specs: `register`, `get`, `list`, `diff`, `use`."""
        return Agents(self.config, self._redis_url, self._scheduler, self.tools or (), self._check_running)

    @property
    def rollouts(self) -> Rollouts:
        """This pool's rollouts: `start`, `status`, `promote`, `rollback`, `transitions`."""
        return Rollouts(self.config, self._redis_url, self._scheduler, self._check_running)

    def evaluate(
        self,
        suite: EvalSuite | str | Path,
        agent: str,
        *,
        baseline: str | None = None,
        gate: Gate | None = None,
        tenant: str = EVAL_TENANT,
        scorers: dict[str, Scorer] | None = None,
        reps: int | None = None,
        rerun_baseline: bool = False,
    ) -> EvalOutcome:
        """Runs an eval suite (an `EvalSuite`, or its file) through this pool on the version
        `agent` names, as tasks of `tenant`; with a `baseline` version, diffs the two and
        applies `gate` (`EvalOutcome.passed`). Reports are kept in Redis by suite and
        version; a baseline's stored report is reused unless `rerun_baseline`.

        Raises:
            InvalidTask: If the suite file cannot be read or is invalid.
            UnknownAgent: If a version is not registered.
        """
        self._check_running()
        if not isinstance(suite, EvalSuite):
            suite = EvalSuite.load(suite, reps=reps)
        elif reps is not None:
            suite = suite.model_copy(update={"reps": reps})
        return evaluate(
            self,
            suite,
            agent,
            baseline=baseline,
            gate=gate,
            tenant=tenant,
            scorers=scorers,
            rerun_baseline=rerun_baseline,
        )
