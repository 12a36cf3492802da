"""What every `agentpool` command shares: its consoles, its one-line errors, the common
options and the connection to a running pool."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, cast

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from agentpool.cluster.acl import display_url
from agentpool.errors import AgentPoolError

if TYPE_CHECKING:  # imported late at run time: `agentpool --help` starts without Ray
    from agentpool.pool import AgentPool

# Wide enough for the summary table even when output is piped (CI logs, files).
console = Console(width=None if sys.stdout.isatty() else 110)
#: Errors and notices go to stderr, so that stdout holds only what a command prints as data.
# Soft wrap: an error is one line however long, for a log or a script reading it.
stderr = Console(stderr=True, soft_wrap=True)
_debug = {"on": False}
F = TypeVar("F", bound=Callable[..., Any])


def _one_line(exc: BaseException) -> str:
    """What went wrong, in one line: our own errors as they say it, anyone else's by type."""
    if isinstance(exc, AgentPoolError):
        text = exc.message
    elif isinstance(exc, ValidationError):
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        text = f"{exc.error_count()} invalid value(s); first: {where}: {first['msg']}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return _masked(lines[0] if lines else type(exc).__name__)


def _masked(text: str) -> str:
    """`text` with any Redis URL's password masked."""
    words = [display_url(word) if "://" in word and "@" in word else word for word in text.split(" ")]
    return " ".join(words)


def friendly(command: F) -> F:
    """A command's failures as one line on stderr and exit code 1 (a traceback with --debug)."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            if _debug["on"]:
                raise
            stderr.print(f"[red]error:[/] {escape(_one_line(exc))}  [dim](--debug for the traceback)[/]")
            raise typer.Exit(1) from None

    return cast(F, run)


NameOption = Annotated[str, typer.Option(envvar="AGENTPOOL_NAME", help="The pool's PoolConfig.name.")]
AddressOption = Annotated[str | None, typer.Option(envvar="RAY_ADDRESS", help="Ray cluster address.")]
RedisUrlOption = Annotated[
    str | None, typer.Option(envvar="AGENTPOOL_REDIS_URL", help="Redis URL (else the pool's, by --name).")
]
PrefixOption = Annotated[str | None, typer.Option(envvar="AGENTPOOL_KEY_PREFIX", help="Key prefix.")]


def _connect(name: str, address: str | None) -> AgentPool:
    from agentpool import AgentPool
    from agentpool.errors import PoolNotRunning

    try:
        return AgentPool.connect(name, address=address)
    except PoolNotRunning as exc:
        stderr.print(f"[red]error:[/] {escape(exc.message)} (start one with `agentpool start --detach`)")
        raise typer.Exit(1) from None
    except ConnectionError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        stderr.print(
            f"[red]error:[/] no Ray cluster to connect to ({escape(first)}): run `ray start --head` or set RAY_ADDRESS"
        )
        raise typer.Exit(1) from None
