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

from agentpool.errors import ConfigError, ToolError

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

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
    metadata: dict[str, Any] = field(default_factory=dict)

    def definition(self) -> dict[str, Any]:
        """The tool as the Messages API expects it in `tools`."""
        return {
            "name": self.name,
            "description": self.description,
            "input_schema": self.args_model.model_json_schema(),
        }

    def validate_args(self, args: Any) -> dict[str, Any]:
        """Returns the validated arguments, or raises `ToolError(kind="invalid_arguments")`
        with a message the model can act on."""
        if not isinstance(args, dict):
            raise ToolError("arguments must be a JSON object", tool=self.name, kind="invalid_arguments")
        try:
            parsed = self.args_model.model_validate(args)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors())
            raise ToolError(
                f"invalid arguments for {self.name}: {problems}", tool=self.name, kind="invalid_arguments"
            ) from None
        return {name: getattr(parsed, name) for name in type(parsed).model_fields}


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout_s: float = 30.0,
) -> Any:
    """Registers a function (sync or async) as a tool agents may call.

    Usable bare (`@tool`) or with options (`@tool(timeout_s=5)`).

    Args:
        fn: The function; its type-hinted parameters become the tool's input schema.
        name: Tool name as the model sees it; defaults to the function's name.
        description: Defaults to the docstring's first paragraph.
        timeout_s: Longest a call may run before it is abandoned with an error result.

    Raises:
        ConfigError: If the name is invalid, already taken by another function, or a
            parameter lacks a type hint.
    """

    def register(func: Callable[..., Any]) -> Callable[..., Any]:
        spec = build_spec(func, name=name, description=description, timeout_s=timeout_s)
        existing = _REGISTRY.get(spec.name)
        if existing is not None and existing.module != spec.module:
            raise ConfigError(
                f"tool {spec.name!r} is defined twice: in {existing.module} and {spec.module}",
                tool=spec.name,
            )
        _REGISTRY[spec.name] = spec
        func.__agentpool_tool__ = spec  # type: ignore[attr-defined]
        return func

    return register(fn) if fn is not None else register


def build_spec(func: Callable[..., Any], *, name: str | None, description: str | None, timeout_s: float) -> ToolSpec:
    tool_name = name or func.__name__
    if not _NAME.match(tool_name):
        raise ConfigError(f"tool name {tool_name!r} must match {_NAME.pattern}", tool=tool_name)
    if not 0 < timeout_s <= 3600:
        raise ConfigError(f"tool {tool_name}: timeout_s must be in (0, 3600]", tool=tool_name)
    summary, arg_docs = _parse_docstring(inspect.getdoc(func) or "")
    hints = get_type_hints(func)
    fields: dict[str, Any] = {}
    for param in inspect.signature(func).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ConfigError(f"tool {tool_name}: *args/**kwargs are not supported", tool=tool_name)
        if param.name not in hints:
            raise ConfigError(f"tool {tool_name}: parameter {param.name!r} needs a type hint", tool=tool_name)
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (hints[param.name], Field(default, description=arg_docs.get(param.name)))
    model = create_model(  # type: ignore[call-overload]
        f"{tool_name}_arguments", __config__=ConfigDict(extra="forbid"), **fields
    )
    return ToolSpec(
        name=tool_name,
        description=(description or summary or tool_name)[:1024],
        fn=func,
        args_model=model,
        timeout_s=timeout_s,
        is_async=inspect.iscoroutinefunction(func),
        module=func.__module__,
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
            raise ConfigError(f"cannot import tool module {module!r}: {exc!r}", module=module) from exc
        wanted.add(imported.__name__)
    return {name: spec for name, spec in _REGISTRY.items() if spec.module in wanted}
