"""A pool on a cluster whose nodes Ray's own autoscaler adds and removes (`fake_cluster.py`):
a load ramp to 4x what one agent-worker node holds, and back. Run as a subprocess (one
process holds one Ray) by `test_node_autoscaling.py` and by `python -m bench nodes`;
prints a JSON report on its last line: the samples, the autoscaler's events and the counts.

One `agent_worker` node (`ray-cluster.yaml`: 8 `agent_worker` slots) holds two of this
pool's workers (4 slots each); the pool starts with them, on the node the autoscaler keeps
(`min_workers: 1`). The load is a number of tasks kept in flight (each one LLM call of 1 s
on the simulated provider), in steps: one node's worth, then up to four, then back to one
while the batch goes on, so nodes are removed mid-batch, then none.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import threading
import time
import uuid
from typing import Any

import ray

from agentpool import AgentPool, AgentTask, AutoscaleConfig, PlacementConfig, PoolConfig, SimulatorConfig
from agentpool.cluster.redis_server import EmbeddedRedis
from agentpool.pool import NAMESPACE
from tests.fake_cluster import FakeAutoscalingCluster
from tests.scenarios import record_counts

WORKERS_PER_NODE = 2
CONCURRENCY = 4
TARGET = 3.0
#: Tasks in flight that one node's workers hold at their target load.
ONE_NODE = int(WORKERS_PER_NODE * TARGET)
TASK_S = 1.0
#: How much longer a step up holds, at most, until the pool has spread onto the nodes added
#: for it: new nodes and the workers on them start slower on a machine that is busy with
#: other work (the suite runs this beside its other tests), and the step is there to see it.
SPREAD_WAIT_S = 60
PROFILES = {
    # (seconds, tasks in flight as a multiple of one node's load)
    # A cycle: one node's load, four nodes' load, one node's again (the idle nodes removed
    # while it runs). The full run repeats it; each step up is measured on its own, and
    # holds longer, up to `SPREAD_WAIT_S`, until the pool has spread onto the new nodes.
    "quick": [(6, 1), (24, 4), (18, 1), (2, 0)],
    "full": [(10, 1), (30, 4), (25, 1)] * 3 + [(2, 0)],
}


class _Load:
    """Keeps `level` tasks in flight, one `submit` each, until told to stop."""

    def __init__(self, pool: AgentPool) -> None:
        self.pool = pool
        self.level = 0
        self.submitted = 0
        self.results: list[Any] = []
        self.stop = False
        self._refs: list[Any] = []

    def run(self) -> None:
        while not self.stop or self._refs:
            while not self.stop and len(self._refs) < self.level:
                task = AgentTask(tenant="acme", prompt=f"sim: answer ok {self.submitted}")
                self._refs += self.pool.submit([task])
                self.submitted += 1
            if not self._refs:
                time.sleep(0.05)
                continue
            done, self._refs = ray.wait(self._refs, num_returns=len(self._refs), timeout=0.05, fetch_local=True)
            self.results += ray.get(done)

    @property
    def in_flight(self) -> int:
        return len(self._refs)


def _spread(sample: dict[str, Any]) -> bool:
    """Whether the pool has the workers it wants, each up and located on its node."""
    return sample["starting"] == 0 and sample["workers"] >= sample["desired"] and sample["located"] >= sample["workers"]


def _sample(pool: AgentPool, load: _Load, where: dict[str, str]) -> dict[str, Any]:
    workers = pool.status()["workers"]
    for name in workers["names"]:
        if name not in where:
            try:
                where[name] = ray.get(ray.get_actor(name, namespace=NAMESPACE).node.remote(), timeout=5)
            except (ray.exceptions.RayError, ValueError):
                continue
    alive = [n for n in ray.nodes() if n["Alive"] and "agent_worker" in n["Resources"]]
    free = ray._private.state.available_resources_per_node()
    return {
        "t": time.time(),
        "level": load.level,
        "in_flight": load.in_flight,
        "done": len(load.results),
        "workers": workers["count"],
        "desired": workers["desired"],
        "starting": workers["starting"],
        "nodes": sorted(n["NodeID"] for n in alive),
        "busy": sorted(
            n["NodeID"]
            for n in alive
            if free.get(n["NodeID"], {}).get("agent_worker", 0) < n["Resources"]["agent_worker"]
        ),
        "taking": sorted({where[n] for n in workers["names"] if n in where}),
        "located": sum(1 for n in workers["names"] if n in where),
    }


def main(redis_url: str, profile: str) -> dict[str, Any]:
    steps = PROFILES[profile]
    cluster = FakeAutoscalingCluster(max_nodes={"agent_worker": 4}, idle_timeout_s=6)
    address = cluster.start()
    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
    prefix = f"nodes{uuid.uuid4().hex[:6]}"
    config = PoolConfig(
        name=prefix,
        key_prefix=prefix,
        redis_url=redis_url,
        simulator=SimulatorConfig(latency_ms=int(TASK_S * 1000), latency_sigma=0),
        num_workers=WORKERS_PER_NODE,
        worker_concurrency=CONCURRENCY,
        placement=PlacementConfig(
            control_resources={"agentpool_head": 0.01},
            executor_resources={"agentpool_head": 0.01},
            worker_resources={"agent_worker": 8 / WORKERS_PER_NODE},
        ),
        autoscale=AutoscaleConfig(
            min_workers=WORKERS_PER_NODE,
            max_workers=4 * WORKERS_PER_NODE,
            target_loops_per_worker=TARGET,
            upscale_delay_s=1,
            downscale_delay_s=3,
            interval_s=0.25,
        ),
    )
    report: dict[str, Any] = {"profile": profile, "steps": steps, "one_node": ONE_NODE, "autoscaler": cluster.config}
    samples: list[dict[str, Any]] = []
    try:
        with AgentPool.start(config) as pool:
            load = _Load(pool)
            where: dict[str, str] = {}
            samples.append(_sample(pool, load, where))
            report["start"] = time.time()
            runner = threading.Thread(target=load.run, daemon=True)
            runner.start()
            report["step_starts"] = []
            for i, (seconds, multiple) in enumerate(steps):
                load.level = multiple * ONE_NODE
                report["step_starts"].append(time.time())
                rising = i > 0 and multiple > steps[i - 1][1]
                end = time.monotonic() + seconds
                latest = end + (SPREAD_WAIT_S if rising else 0)
                while time.monotonic() < end or (time.monotonic() < latest and not _spread(samples[-1])):
                    samples.append(_sample(pool, load, where))
                    time.sleep(0.25)
            load.stop = True
            runner.join(timeout=60)
            report["batch_end"] = time.time()
            # The idle nodes' removal, once the batch is over (the autoscaler keeps one): the
            # pool's own downscale, then the node's idle timeout, then the autoscaler's next
            # pass. It took longer than 30 s once with the whole suite running on 2 cores.
            end = time.monotonic() + 60
            while time.monotonic() < end and len(samples[-1]["nodes"]) > 1:
                samples.append(_sample(pool, load, where))
                time.sleep(0.25)
            samples.append(_sample(pool, load, where))
            records = record_counts(redis_url, prefix, "acme")
            results = load.results
            report["submitted"] = load.submitted
            report["finished"] = len(results)
            report["statuses"] = sorted({r.status.value for r in results})
            # Lost: submitted, and no result came back or no record of it is in Redis.
            report["lost"] = load.submitted - sum(1 for r in results if r.task_id in records)
            report["duplicates"] = sum(1 for n in records.values() if n > 1)
            report["answers_ok"] = all((r.answer or "").startswith("ok ") for r in results)
    finally:
        report["events"] = [
            {"at": e.at, "added": e.added, "count": e.count, "type": e.node_type, "text": e.text}
            for e in cluster.events()
        ]
        ray.shutdown()
        cluster.shutdown()
    report["samples"] = samples
    return report


if __name__ == "__main__":
    profile = sys.argv[2] if len(sys.argv) > 2 else "quick"
    if sys.argv[1] == "-":  # a Redis of its own
        with EmbeddedRedis() as server:
            print(json.dumps(main(server.url, profile)))
    else:
        print(json.dumps(main(sys.argv[1], profile)))


def summarize(report: dict[str, Any]) -> dict[str, float]:
    """The figures of a run (`bench nodes` reports them, the test checks them). Each step up
    in load is measured on its own, and a figure is the median over them."""
    samples = report["samples"]
    to_taking, to_add = [], []
    ramps = 0
    for i, (_, multiple) in enumerate(report["steps"]):
        if i == 0 or multiple <= report["steps"][i - 1][1]:
            continue
        ramps += 1
        began = report["step_starts"][i]
        before = [s for s in samples if s["t"] < began][-1]
        after = [s for s in samples if s["t"] >= began]
        demand_at = next((s["t"] for s in after if s["desired"] > before["workers"]), math.nan)
        to_taking.append(next((s["t"] for s in after if set(s["taking"]) - set(before["nodes"])), math.nan) - demand_at)
        added = [e["at"] for e in report["events"] if e["added"] and e["at"] >= began]
        to_add.append(added[0] - demand_at if added else math.nan)
    idle_waits, mid_batch = [], 0
    seen = set(samples[0]["nodes"])
    every = set(seen)
    for i, s in enumerate(samples):
        every |= set(s["nodes"])
        for node in seen - set(s["nodes"]):
            busy = [j for j in range(i) if node in samples[j]["busy"]]
            idle_since = samples[busy[-1] + 1]["t"] if busy else samples[0]["t"]
            idle_waits.append(s["t"] - idle_since)
            mid_batch += s["t"] < report["batch_end"]
        seen = set(s["nodes"])
    return {
        "demand_to_node_taking_tasks_s": _median(to_taking),
        "demand_to_autoscaler_add_s": _median(to_add),
        "nodes_at_peak": max(len(s["nodes"]) for s in samples),
        "workers_at_peak": max(s["workers"] for s in samples),
        "nodes_added_per_ramp": round((len(every) - len(samples[0]["nodes"])) / max(1, ramps), 2),
        "nodes_removed_mid_batch_per_ramp": round(mid_batch / max(1, ramps), 2),
        "idle_to_node_removal_s": _median(idle_waits),
        "nodes_at_end": len(samples[-1]["nodes"]),
        "tasks": report["submitted"],
        "tasks_lost": report["lost"],
        "tasks_duplicated": report["duplicates"],
    }


def _median(values: list[float]) -> float:
    known = [v for v in values if not math.isnan(v)]
    return round(statistics.median(known), 2) if known else math.nan
