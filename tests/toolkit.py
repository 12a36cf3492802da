"""Tools the tests load into pools with `tool_modules=["tests.toolkit"]`."""

from __future__ import annotations

import asyncio
import time

from agentpool import tool


@tool
async def shout(text: str) -> str:
    """Upper-cases text.

    Args:
        text: What to shout.
    """
    return text.upper()


@tool(timeout_s=0.2)
async def stall_async(seconds: float = 30.0) -> str:
    """Sleeps far past its timeout."""
    await asyncio.sleep(seconds)
    return "woke up"


@tool(timeout_s=0.2)
def stall_sync(seconds: float = 1.0) -> str:
    """Blocks a thread past its timeout."""
    time.sleep(seconds)
    return "woke up"


@tool
def explode(message: str = "boom") -> str:
    """Always raises."""
    raise RuntimeError(message)


@tool
def huge(size: int = 100_000) -> str:
    """Returns a very long string."""
    return "x" * size
