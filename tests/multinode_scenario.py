"""A pool on a real multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`:
a head and two worker nodes, each its own raylet). Run as a subprocess by
`test_multinode.py`, since one process holds one Ray; prints a JSON report on its last line.

The nodes carry the custom resources of `ray-cluster.yaml`: the control plane goes to the
head (`agentpool_head`), agent workers and tool executors to the worker nodes."""

from __future__ import annotations

import json
import sys
import time
import uuid
from typing import Any

import ray
from ray.cluster_utils import Cluster

from agentpool import AgentPool, AgentTask, AutoscaleConfig, PlacementConfig, PoolConfig, SimulatorConfig
from agentpool.pool import NAMESPACE


def _nodes(pool: AgentPool) -> dict[str, str]:
    names = pool.status()["workers"]["names"]
    return {n: ray.get(ray.get_actor(n, namespace=NAMESPACE).node.remote()) for n in names}


def main(redis_url: str) -> dict[str, Any]:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"agentpool_head": 1}})
    worker_nodes = [cluster.add_node(num_cpus=1, resources={"agent_worker": 8}) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
    report: dict[str, Any] = {
        "head": cluster.head_node.node_id,
        "worker_nodes": sorted(n.node_id for n in worker_nodes),
    }
    config = PoolConfig(
        name=f"mn{uuid.uuid4().hex[:6]}",
        key_prefix=f"mn{uuid.uuid4().hex[:6]}",
        redis_url=redis_url,
        simulator=SimulatorConfig(latency_ms=300, latency_sigma=0),
        num_workers=2,
        worker_concurrency=4,
        placement=PlacementConfig(
            control_resources={"agentpool_head": 0.01},
            worker_resources={"agent_worker": 1},
            executor_resources={"agent_worker": 0.1},
        ),
        autoscale=AutoscaleConfig(
            min_workers=2,
            max_workers=4,
            target_loops_per_worker=3,
            upscale_delay_s=0.5,
            downscale_delay_s=2,
            interval_s=0.25,
        ),
    )
    try:
        with AgentPool.start(config) as pool:
            report["initial_nodes"] = _nodes(pool)
            tasks = [
                AgentTask(
                    tenant="acme",
                    prompt=f'sim: tool calculator {{"expression": "{i}*3"}}\nsim: answer {i * 3}',
                    tools=["calculator"],
                )
                for i in range(80)
            ]
            refs = pool.submit(tasks)
            deadline = time.monotonic() + 60
            peak: dict[str, str] = {}
            while time.monotonic() < deadline and len(peak) < 4:
                peak = _nodes(pool)
                time.sleep(0.2)
            report["peak_nodes"] = peak
            results = ray.get(refs)
            report["statuses"] = sorted({r.status for r in results})
            report["answers_ok"] = all(r.answer == str(i * 3) for i, r in enumerate(results))
            report["tool_ok"] = all(r.tool_calls and r.tool_calls[0].ok for r in results)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and pool.status()["workers"]["count"] > 2:
                time.sleep(0.2)
            workers = pool.status()["workers"]
            report["final_count"] = workers["count"]
            report["history"] = workers["history"]
    finally:
        ray.shutdown()
        cluster.shutdown()
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
