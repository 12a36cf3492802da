"""What `AgentPool.start` and `connect` check before a single actor starts: Redis answers,
the tool modules import, the pool's name is free; and how a remote error is told in one line."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from typing import Any

import ray

from agentpool.cluster.acl import display_url
from agentpool.cluster.reader import ping
from agentpool.errors import ConfigError, StoreError
from agentpool.launch import NAMESPACE
from agentpool.tools import load_tools


def check_redis(url: str, *, source: str) -> None:
    """PINGs the pool's Redis before anything is accepted.

    Raises:
        ConfigError: One line naming where the URL came from, the server (masked) and why.
    """
    try:
        ping(url)
    except StoreError as exc:
        raise ConfigError(f"{source}: {exc.message}", url=display_url(url)) from None


def name_taken(name: str) -> str:
    return (
        f"a pool named {name!r} is already running on this Ray cluster: submit to it with "
        f"`agentpool submit FILE --detach` (AgentPool.connect({name!r})), stop it with `agentpool stop`, "
        "or start this one under another name (AGENTPOOL_NAME, PoolConfig.name)"
    )


def check_name_free(name: str) -> None:
    """Raises ConfigError if a pool of this name runs on the cluster (its actors' names are taken)."""
    with contextlib.suppress(ValueError):
        ray.get_actor(f"{name}-scheduler", namespace=NAMESPACE)
        raise ConfigError(name_taken(name))


def tools_as_actors_see_them(modules: list[str]) -> dict[str, Any]:
    """The tools of `modules`, imported here as the pool's actors will import them: Ray puts
    this process's working directory on its workers' path, so it is on the path here too."""
    here = os.getcwd()
    added = here not in sys.path
    if added:
        sys.path.append(here)
    try:
        return load_tools(modules)
    finally:
        if added:
            sys.path.remove(here)


def first_line(exc: BaseException) -> str:
    """An error's first meaningful line, without a remote traceback or terminal colours."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
    return (errors[-1] if errors else lines[0] if lines else type(exc).__name__)[:500]
