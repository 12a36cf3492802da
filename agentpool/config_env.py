"""How `PoolConfig` reads the environment: which `AGENTPOOL_*` variables it knows (so that a
typo is reported, not ignored), its errors told in the variables' names and formats, and
the secrets files it reads keys from."""

from __future__ import annotations

import difflib
import os
import re
import stat
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, BaseModel, SecretStr, ValidationError

from agentpool.errors import ConfigError, InvalidConfig

PREFIX = "AGENTPOOL_"
NESTED = "__"
#: Variables of the `agentpool` command, not of `PoolConfig`.
CLI_VARIABLES = frozenset({"AGENTPOOL_DEBUG"})
#: Fields whose values can hold a credential: their values are never echoed in an error.
_SECRET_HINTS = ("key", "token", "password", "secret", "url")
#: A secrets file larger than this is not a key.
_MAX_SECRET_FILE_BYTES = 16_384


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold directly (`X`, `X | None`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


def _is_mapping(annotation: Any) -> bool:
    origins = {typing.get_origin(a) for a in (annotation, *typing.get_args(annotation))}
    return dict in origins or annotation is dict


def _names(model: type[BaseModel], stem: str, exact: set[str], open_ended: set[str]) -> None:
    for name, field in model.model_fields.items():
        variable = f"{stem}{name.upper()}"
        exact.add(variable)
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            exact.update(str(c).upper() for c in alias.choices if str(c).upper().startswith(PREFIX))
        if _is_mapping(field.annotation):
            open_ended.add(variable + NESTED)  # any key: AGENTPOOL_TENANTS__ACME__WEIGHT
        for nested in _models_in(field.annotation):
            _names(nested, variable + NESTED, exact, open_ended)


def known_variables(model: type[BaseModel]) -> tuple[set[str], set[str]]:
    """The variables `model` reads (upper case), and the prefixes under which any name is read."""
    exact: set[str] = set()
    open_ended: set[str] = set()
    _names(model, PREFIX, exact, open_ended)
    return exact, open_ended


def unknown_variables(model: type[BaseModel], environ: Mapping[str, str]) -> list[str]:
    """Each `AGENTPOOL_*` variable set that `model` does not read, with a suggestion if one is close."""
    exact, open_ended = known_variables(model)
    problems = []
    for name in sorted(environ):
        upper = name.upper()
        if (
            not upper.startswith(PREFIX)
            or upper in exact | CLI_VARIABLES
            or any(upper.startswith(p) for p in open_ended)
        ):
            continue
        close = difflib.get_close_matches(upper, sorted(exact), n=1, cutoff=0.75)
        problems.append(f"{name} is not a setting" + (f" (did you mean {close[0]}?)" if close else ""))
    return problems


def _variable_for(loc: tuple[Any, ...], environ: Mapping[str, str]) -> str | None:
    """The variable that set the value at `loc`: the longest path of it that is set."""
    upper = {k.upper(): k for k in environ}
    parts = [str(p).upper() for p in loc if not isinstance(p, int)]
    for end in range(len(parts), 0, -1):
        candidate = PREFIX + NESTED.join(parts[:end])
        if candidate in upper:
            return upper[candidate]
    return None


def _shown(variable: str, value: str) -> str:
    if any(hint in variable.lower() for hint in _SECRET_HINTS):
        return variable
    value = value if len(value) <= 60 else value[:57] + "..."
    return f"{variable}={value!r}"


def explain(exc: Exception, given: Mapping[str, Any], environ: Mapping[str, str]) -> InvalidConfig | None:
    """`exc` (pydantic's or pydantic-settings' error) told in the names of the environment
    variables that caused it, or None when every problem came from the arguments given."""
    if isinstance(exc, ValidationError):
        lines = []
        for err in exc.errors(include_url=False):
            loc = tuple(err["loc"])
            if loc and str(loc[0]) in given:
                continue
            variable = _variable_for(loc, environ)
            if variable is None:
                continue
            where = ".".join(str(p) for p in loc)
            message = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"{_shown(variable, environ[variable])}: {message} ({where})")
        if not lines:
            return None
        return InvalidConfig("invalid configuration from the environment: " + "; ".join(lines), problems=lines)
    # pydantic-settings could not decode a structured value (dicts, models): it must be JSON.
    match = re.search(r'field "(\w+)"', str(exc))
    field = match.group(1).upper() if match else None
    variable = _variable_for((field,), environ) if field else None
    if variable is None and field:
        variable = next((k for k in environ if k.upper().endswith(NESTED + field)), None)
    if variable is None:
        return InvalidConfig(f"invalid configuration from the environment: {exc}", problems=[str(exc)])
    line = f'{_shown(variable, environ[variable])}: not valid; expected JSON, e.g. {{"acme": {{"weight": 2}}}}'
    return InvalidConfig(f"invalid configuration from the environment: {line}", problems=[line])


def read_secret_file(path: str | os.PathLike[str]) -> SecretStr:
    """The secret held in a file (Docker and Kubernetes secrets, a root-owned key file).

    Surrounding whitespace is dropped. Errors name the file, never its content.

    Raises:
        ConfigError: If the file is missing, unreadable, empty, too large, or readable by
            every user on the machine.
    """
    file = Path(path)
    try:
        info = file.stat()
        if info.st_size > _MAX_SECRET_FILE_BYTES:
            raise ConfigError(f"secrets file {file} is {info.st_size} bytes; a key is at most {_MAX_SECRET_FILE_BYTES}")
        if info.st_mode & stat.S_IROTH:
            raise ConfigError(f"secrets file {file} is readable by every user: chmod o-r (600 or 640) first")
        value = file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read secrets file {file}: {exc.strerror or type(exc).__name__}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"secrets file {file} is not UTF-8 text") from None
    if not value:
        raise ConfigError(f"secrets file {file} is empty")
    return SecretStr(value)
