"""The bundled simulated Anthropic provider (see `server.py` and `script.py`)."""

from agentpool.simulator.config import SimulatorConfig
from agentpool.simulator.server import Simulator, SimulatorServer

__all__ = ["Simulator", "SimulatorConfig", "SimulatorServer"]
