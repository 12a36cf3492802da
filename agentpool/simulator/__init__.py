"""The bundled simulated Anthropic provider (see `server.py` and `script.py`)."""

from typing import TYPE_CHECKING, Any

from agentpool.simulator.config import SimulatorConfig

if TYPE_CHECKING:
    from agentpool.simulator.server import Simulator, SimulatorServer


def __getattr__(name: str) -> Any:
    """The server (aiohttp) is imported on first use: the config alone is light."""
    if name in ("Simulator", "SimulatorServer"):
        from agentpool.simulator import server

        return getattr(server, name)
    raise AttributeError(f"module 'agentpool.simulator' has no attribute {name!r}")


__all__ = ["Simulator", "SimulatorConfig", "SimulatorServer"]
