"""Tools: the `@tool` decorator, their specs and the registry the executors load.

The input schema comes from the function's type hints (through a pydantic model, which also
validates the model's arguments before the function ever runs); the description from the
docstring's first paragraph, and parameter descriptions from its `Args:` section.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from agentpool.config import BreakerConfig, Isolation
from agentpool.errors import ConfigError, ToolError
from agentpool.vocabulary import ToolErrorKind

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: A tool parameter of this name is not shown to the model: it receives `task_id:tool_use_id`.
IDEMPOTENCY_KEY = "idempotency_key"

#: Every tool decorated in this process, by name (a module import registers its tools).
_REGISTRY: dict[str, ToolSpec] = {}


@dataclass(frozen=True)
class ToolSpec:
    """A registered tool: the callable, its argument model and how to run it."""

    name: str
    description: str
    fn: Callable[..., Any]
    args_model: type[BaseModel]
    timeout_s: float
    is_async: bool
    module: str
    group: str = "default"
    max_concurrency: int | None = None
    idempotent: bool = False
    keyed: bool = False
    retries: int = 2
    cache_ttl_s: float | None = None
    breaker: BreakerConfig | None = None
    #: "thread" or "process"; None: the executor group's `isolation`.
    isolation: Isolation | None = None
    requires_approval: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def retryable(self) -> bool:
        """A failed attempt may run again: the tool is idempotent, or dedupes by its key."""
        return self.idempotent or self.keyed

    def info(self) -> dict[str, Any]:
        """What a worker needs to route and guard calls to this tool (plain data)."""
        return {
            "group": self.group,
            "timeout_s": self.timeout_s,
            "idempotent": self.idempotent,
            "keyed": self.keyed,
            "retries": self.retries,
            "cache_ttl_s": self.cache_ttl_s,
            "breaker": self.breaker.model_dump() if self.breaker is not None else None,
            "isolation": self.isolation,
            "requires_approval": self.requires_approval,
        }

    def definition(self) -> dict[str, Any]:
        """The tool as the Messages API expects it in `tools`."""
        return {
            "name": self.name,
            "description": self.description,
            "input_schema": self.args_model.model_json_schema(),
        }

    def validate_args(self, args: Any) -> dict[str, Any]:
        """Returns the validated arguments, or raises `ToolError(kind=ToolErrorKind.INVALID_ARGUMENTS)`
        with a message the model can act on."""
        if not isinstance(args, dict):
            raise ToolError("arguments must be a JSON object", tool=self.name, kind=ToolErrorKind.INVALID_ARGUMENTS)
        try:
            parsed = self.args_model.model_validate(args)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors())
            raise ToolError(
                f"invalid arguments for {self.name}: {problems}", tool=self.name, kind=ToolErrorKind.INVALID_ARGUMENTS
            ) from None
        return {name: getattr(parsed, name) for name in type(parsed).model_fields}

    def kwargs(self, args: dict[str, Any], key: str) -> dict[str, Any]:
        """The call's keyword arguments, with the idempotency key for a tool that takes one."""
        return {**args, IDEMPOTENCY_KEY: key} if self.keyed else args


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout_s: float = 30.0,
    group: str = "default",
    max_concurrency: int | None = None,
    idempotent: bool = False,
    retries: int = 2,
    cache_ttl_s: float | None = None,
    breaker: BreakerConfig | None = None,
    isolation: Isolation | None = None,
    requires_approval: bool = False,
) -> Any:
    """Registers a function (sync or async) as a tool agents may call.

    Usable bare (`@tool`) or with options (`@tool(timeout_s=5, group="slow-io")`).

    Args:
        fn: The function; its type-hinted parameters become the tool's input schema. A
            parameter named `idempotency_key` is hidden from the model and receives
            `task_id:tool_use_id`: the tool promises to apply a side effect once per key.
        name: Tool name as the model sees it; defaults to the function's name.
        description: Defaults to the docstring's first paragraph.
        timeout_s: Longest a call may run, retries included, before it ends with an error result.
        group: The executor group (a separate set of actors) that runs this tool.
        max_concurrency: Calls of this tool running at once in one executor; more wait up
            to `PoolConfig.bulkhead_wait_s`, then are refused.
        idempotent: Safe to run twice: transient failures are retried (`retries` times,
            with backoff, inside `timeout_s`). Otherwise a call runs at most once per
            `task_id:tool_use_id`, recorded in Redis, unless the tool takes an idempotency key.
        retries: Retries after the first attempt, for idempotent or keyed tools.
        cache_ttl_s: Cache successful results in Redis (per tenant, by arguments) this long.
            Only for idempotent tools.
        breaker: This tool's circuit breaker; `PoolConfig.breaker` when None.
        isolation: "process" runs each call in a child process of its own, killed at the
            timeout, whose crash costs only that call (for tools that may hang in C code,
            spin, leak or segfault; arguments and results cross by pickle). "thread" runs
            it in the executor. None: the executor group's `isolation`.
        requires_approval: A human must approve each call (`AgentPool.approve`) before it
            runs; meanwhile the task is paused, its checkpoint saved and its worker slot
            free. No decision within `PoolConfig.approval_timeout_s` ends the task.

    Raises:
        ConfigError: If the name is invalid, already taken by another function, or a
            parameter lacks a type hint.
    """

    def register(func: Callable[..., Any]) -> Callable[..., Any]:
        spec = build_spec(
            func,
            name=name,
            description=description,
            timeout_s=timeout_s,
            group=group,
            max_concurrency=max_concurrency,
            idempotent=idempotent,
            retries=retries,
            cache_ttl_s=cache_ttl_s,
            breaker=breaker,
            isolation=isolation,
            requires_approval=requires_approval,
        )
        existing = _REGISTRY.get(spec.name)
        if existing is not None and existing.module != spec.module:
            raise ConfigError(
                f"tool {spec.name!r} is defined twice: in {existing.module} and {spec.module}",
                tool=spec.name,
            )
        _REGISTRY[spec.name] = spec
        # Marks the function as a tool for module scans; a function type declares no such attribute.
        func.__agentpool_tool__ = spec  # type: ignore[attr-defined]
        return func

    return register(fn) if fn is not None else register


def build_spec(
    func: Callable[..., Any],
    *,
    name: str | None,
    description: str | None,
    timeout_s: float,
    group: str = "default",
    max_concurrency: int | None = None,
    idempotent: bool = False,
    retries: int = 2,
    cache_ttl_s: float | None = None,
    breaker: BreakerConfig | None = None,
    isolation: Isolation | None = None,
    requires_approval: bool = False,
) -> ToolSpec:
    tool_name = name or func.__name__
    if not _NAME.match(tool_name):
        raise ConfigError(f"tool name {tool_name!r} must match {_NAME.pattern}", tool=tool_name)
    problems = [
        "timeout_s must be in (0, 3600]" if not 0 < timeout_s <= 3600 else None,
        f"group must match {_NAME.pattern}" if not _NAME.match(group) else None,
        "max_concurrency must be in [1, 100000]"
        if max_concurrency is not None and not 1 <= max_concurrency <= 100_000
        else None,
        "retries must be in [0, 10]" if not 0 <= retries <= 10 else None,
        "cache_ttl_s must be in (0, 30 days]"
        if cache_ttl_s is not None and not 0 < cache_ttl_s <= 30 * 86_400
        else None,
        "only idempotent tools can be cached" if cache_ttl_s is not None and not idempotent else None,
        "isolation must be 'thread', 'process' or None" if isolation not in (None, "thread", "process") else None,
    ]
    for problem in problems:
        if problem is not None:
            raise ConfigError(f"tool {tool_name}: {problem}", tool=tool_name)
    summary, arg_docs = _parse_docstring(inspect.getdoc(func) or "")
    hints = get_type_hints(func)
    fields: dict[str, Any] = {}
    keyed = False
    for param in inspect.signature(func).parameters.values():
        if param.name == IDEMPOTENCY_KEY:
            keyed = True
            continue
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ConfigError(f"tool {tool_name}: *args/**kwargs are not supported", tool=tool_name)
        if param.name not in hints:
            raise ConfigError(f"tool {tool_name}: parameter {param.name!r} needs a type hint", tool=tool_name)
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (hints[param.name], Field(default, description=arg_docs.get(param.name)))
    model = create_model(f"{tool_name}_arguments", __config__=ConfigDict(extra="forbid"), **fields)
    return ToolSpec(
        name=tool_name,
        description=(description or summary or tool_name)[:1024],
        fn=func,
        args_model=model,
        timeout_s=timeout_s,
        is_async=inspect.iscoroutinefunction(func),
        module=func.__module__,
        group=group,
        max_concurrency=max_concurrency,
        idempotent=idempotent,
        keyed=keyed,
        retries=retries,
        cache_ttl_s=cache_ttl_s,
        breaker=breaker,
        isolation=isolation,
        requires_approval=requires_approval,
    )


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """Returns the first paragraph and the Google-style `Args:` entries of a docstring."""
    summary = doc.split("\n\n", 1)[0].replace("\n", " ").strip()
    args: dict[str, str] = {}
    in_args = False
    for line in doc.splitlines():
        stripped = line.strip()
        if re.fullmatch(r"[A-Z][A-Za-z ]*:", stripped):  # a section header
            in_args = stripped in ("Args:", "Arguments:", "Parameters:")
            continue
        match = re.match(r"^(\w+)(?:\s*\(.*?\))?:\s*(.+)$", stripped)
        if in_args and match:
            args[match.group(1)] = match.group(2)
    return summary, args


def load_tools(modules: list[str]) -> dict[str, ToolSpec]:
    """Imports each module (registering its tools) and returns the tools they define.

    Raises:
        ConfigError: If a module cannot be imported.
    """
    wanted: set[str] = set()
    for module in modules:
        try:
            imported = importlib.import_module(module)
        except Exception as exc:
            raise ConfigError(
                f"cannot import tool module {module!r} (PoolConfig.tool_modules, AGENTPOOL_TOOL_MODULES): "
                f"{type(exc).__name__}: {exc}",
                module=module,
            ) from None
        if not any(spec.module == imported.__name__ for spec in _REGISTRY.values()):
            raise ConfigError(
                f"tool module {module!r} defines no tools: decorate its functions with @agentpool.tool",
                module=module,
            )
        wanted.add(imported.__name__)
    return {name: spec for name, spec in _REGISTRY.items() if spec.module in wanted}
