"""A pool shut down with work in flight, in a process of its own: what it prints is what a
user would see on their terminal (`tests/test_rough_edges.py` reads it). With `own-ray`,
the user started Ray first, with its defaults: the actors' output comes to this terminal."""

from __future__ import annotations

import json
import sys
import time

import ray

from agentpool import AgentPool, AgentTask, PoolConfig, SimulatorConfig


def main() -> dict[str, object]:
    if "own-ray" in sys.argv[1:]:
        ray.init(namespace="agentpool")
    pool = AgentPool.start(
        PoolConfig(tool_modules=["tests.toolkit"], num_workers=1, simulator=SimulatorConfig(latency_ms=1))
    )
    napping = AgentTask(tenant="acme", prompt='sim: tool nap {"seconds": 5}\nsim: answer late', tools=["nap"])
    refs = pool.submit([napping.model_copy(update={"task_id": f"nap-{i}"}) for i in range(20)])
    ray.wait(refs, num_returns=1, timeout=1.5)
    time.sleep(1.0)  # the naps are under way
    pool.shutdown()
    return {"shut_down": True, "refs": len(refs)}


if __name__ == "__main__":
    print(json.dumps(main()))
