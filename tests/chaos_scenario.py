"""Kills that need a Ray cluster of their own (`ray.cluster_utils.Cluster` on this machine):
run as a subprocess by `test_chaos_cluster.py`, one scenario per run; prints a JSON report
on its last line.

- `driver`: a driver process starts a detached pool (embedded Redis in a detached actor),
  submits a batch, and is SIGKILLed mid-batch; another process connects and finds every
  accepted task with exactly one final record.
- `cli`: the same through the command line: `agentpool start --detach`, `agentpool submit
  --detach` (returns before the tasks end), results in Redis, `agentpool stop`.
- `node`: agent workers on two worker nodes; one node is removed without grace mid-batch;
  every ref resolves and every task has exactly one final record.
- `supervise`: `agentpool start --supervise` gets SIGTERM mid-batch: it drains (tasks still
  running at the end of the grace period keep their checkpoints, queued ones stay in the
  Redis backlog), stops the pool and exits 0; a new pool of that name on the same Redis
  finishes every task, each with one final record.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

import ray
from ray.cluster_utils import Cluster

from agentpool import AgentPool, PlacementConfig, PoolConfig, SimulatorConfig
from agentpool.pool import NAMESPACE
from tests.scenarios import record_counts
from tests.toolkit import nap_tasks

_DRIVER = """
import sys, time
import ray
from agentpool import AgentPool, PoolConfig, SimulatorConfig
from tests.toolkit import nap_tasks
ray.init(address=sys.argv[1], namespace="agentpool", log_to_driver=False, configure_logging=False)
config = PoolConfig(name=sys.argv[2], key_prefix=sys.argv[2], tool_modules=["tests.toolkit"],
                    simulator=SimulatorConfig(latency_ms=5, latency_sigma=0), num_workers=2, worker_concurrency=8)
pool = AgentPool.start(config, detached=True)
tasks = nap_tasks(60, 0.4)
accepted = pool.enqueue(tasks[:30])                 # detached submission
refs = pool.submit(tasks[30:])                       # and attached refs, owned by this process
print("READY", pool.redis_url, ",".join(t.task_id for t in tasks), flush=True)
time.sleep(600)
"""


def driver(cluster: Cluster) -> dict[str, Any]:
    name = f"dt{uuid.uuid4().hex[:6]}"
    proc = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, cluster.address, name],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert line and line[0] == "READY", line
    url, task_ids = line[1], line[2].split(",")
    deadline = time.monotonic() + 60
    while len(record_counts(url, name, "acme")) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    done_before = len(record_counts(url, name, "acme"))
    os.kill(proc.pid, signal.SIGKILL)  # mid-batch
    proc.wait()
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
    pool = AgentPool.connect(name)
    deadline = time.monotonic() + 120
    while len(record_counts(url, name, "acme")) < len(task_ids) and time.monotonic() < deadline:
        time.sleep(0.2)
    counts = record_counts(url, name, "acme")
    statuses = sorted({r.status for r in pool.results("acme").read()})
    pool.terminate()
    return {
        "submitted": len(task_ids),
        "done_before_kill": done_before,
        "lost": sum(1 for t in task_ids if t not in counts),
        "duplicates": sum(n - 1 for n in counts.values()),
        "statuses": statuses,
    }


def cli(cluster: Cluster) -> dict[str, Any]:
    """`agentpool start --detach`, `submit --detach` (returns at once), results in Redis, `stop`.

    No RAY_ADDRESS: every command finds the cluster running on this machine by itself, as
    after `ray start --head` (the newest cluster's address file; the suite's own Ray is older).
    """
    name = f"cl{uuid.uuid4().hex[:6]}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"AGENTPOOL_NAME": name, "AGENTPOOL_KEY_PREFIX": name, "AGENTPOOL_TOOL_MODULES": "tests.toolkit"})
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-m", "agentpool.cli"]
    up = subprocess.run([*command, "start", "--detach"], env=env, cwd=root, capture_output=True, text=True, check=False)
    assert up.returncode == 0, up.stderr[-2000:]
    # The CLI masks the Redis password; a consumer reads with the tenant's own credentials.
    creds = subprocess.run(
        [*command, "tenant-credentials", "acme", "--name", name], env=env, cwd=root, capture_output=True, text=True
    )
    assert creds.returncode == 0, creds.stderr[-2000:]
    url = creds.stdout.strip()
    tasks = nap_tasks(20, 3.0)
    path = os.path.join(root, f".{name}.jsonl")
    with open(path, "w") as f:
        f.writelines(t.model_dump_json() + "\n" for t in tasks)
    try:
        started = time.monotonic()
        sent = subprocess.run([*command, "submit", path, "--detach"], env=env, cwd=root, capture_output=True, text=True)
        returned_s = time.monotonic() - started
    finally:
        os.unlink(path)
    assert sent.returncode == 0, (sent.stdout[-3000:], sent.stderr[-2000:])
    assert "results land in Redis at " in sent.stdout
    finished_at_return = len(record_counts(url, name, "acme"))
    shown = subprocess.run([*command, "status"], env=env, cwd=root, capture_output=True, text=True)
    # A pool by the same name, not detached, while this one runs: one line saying so.
    clash = subprocess.run(
        [*command, "submit", "-"],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        input=(tasks[0].model_copy(update={"task_id": "clash"}).model_dump_json() + "\n"),
    )
    deadline = time.monotonic() + 60
    while len(record_counts(url, name, "acme")) < len(tasks) and time.monotonic() < deadline:
        time.sleep(0.2)
    counts = record_counts(url, name, "acme")
    listed = subprocess.run([*command, "results", "acme"], env=env, cwd=root, capture_output=True, text=True)
    down = subprocess.run([*command, "stop"], env=env, cwd=root, capture_output=True, text=True, check=False)
    return {
        "submitted": len(tasks),
        "started": up.returncode == 0,
        "start_output": up.stdout + up.stderr,
        "status_output": shown.stdout + shown.stderr,
        "status_code": shown.returncode,
        "clash_output": clash.stdout + clash.stderr,
        "clash_code": clash.returncode,
        "results_listed": len(listed.stdout.splitlines()),
        "results_code": listed.returncode,
        "submit_output": sent.stdout + sent.stderr,
        "finished_when_submit_returned": finished_at_return,
        "submit_s": round(returned_s, 2),
        "lost": sum(1 for t in tasks if t.task_id not in counts),
        "duplicates": sum(n - 1 for n in counts.values()),
        "stopped": down.returncode == 0,
    }


def node(cluster: Cluster, redis_url: str) -> dict[str, Any]:
    nodes = [cluster.add_node(num_cpus=1, resources={"agent_worker": 8}) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
    name = f"nk{uuid.uuid4().hex[:6]}"
    config = PoolConfig(
        name=name,
        key_prefix=name,
        redis_url=redis_url,
        tool_modules=["tests.toolkit"],
        simulator=SimulatorConfig(latency_ms=5, latency_sigma=0),
        num_workers=2,
        worker_concurrency=8,
        placement=PlacementConfig(
            control_resources={"agentpool_head": 0.01},
            executor_resources={"agentpool_head": 0.01},
            worker_resources={"agent_worker": 1},
            spread_workers=True,
        ),
    )
    with AgentPool.start(config) as pool:
        placed = {ray.get(ray.get_actor(config.worker_name(i), namespace=NAMESPACE).node.remote()) for i in range(2)}
        tasks = nap_tasks(60, 0.5)
        refs = pool.submit(tasks)
        ready, _ = ray.wait(refs, num_returns=8, timeout=60)
        victim = nodes[0]
        cluster.remove_node(victim, allow_graceful=False)  # the whole node, mid-batch
        results = ray.get(refs, timeout=180)
        counts = record_counts(redis_url, name, "acme")
        status = pool.status()
    return {
        "submitted": len(tasks),
        "workers_on_both_nodes": placed == {n.node_id for n in nodes},
        "done_before_kill": len(ready),
        "statuses": sorted({r.status for r in results}),
        "in_order": [r.task_id for r in results] == [t.task_id for t in tasks],
        "lost": sum(1 for t in tasks if t.task_id not in counts),
        "duplicates": sum(n - 1 for n in counts.values()),
        "redispatched": status["durability"].get("redispatched", 0),
        "errors": sorted({f"{r.error.type}: {r.error.message[:200]}" for r in results if r.error is not None}),
    }


def _past_first_turn(pool: AgentPool, task_id: str) -> bool:
    state = pool.get(task_id, tenant="acme")
    return state is not None and state.iteration >= 1


def supervise(cluster: Cluster, redis_url: str) -> dict[str, Any]:
    name = f"sv{uuid.uuid4().hex[:6]}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    settings = {"NAME": name, "KEY_PREFIX": name, "TOOL_MODULES": "tests.toolkit", "REDIS_URL": redis_url}
    env.update({f"AGENTPOOL_{k}": v for k, v in {**settings, "NUM_WORKERS": "1", "WORKER_CONCURRENCY": "4"}.items()})
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-m", "agentpool.cli", "start", "--supervise", "--grace", "3"]
    proc = subprocess.Popen(command, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert "supervised" in first, (first, proc.stderr.read() if proc.poll() is not None else "")
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
    pool = AgentPool.connect(name)
    long, short = nap_tasks(4, 12.0), nap_tasks(8, 0.2)  # far past the 3 s grace, however slow the set-up
    pool.enqueue(long)
    deadline = time.monotonic() + 60
    while pool.status()["in_flight"] < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    deadline = time.monotonic() + 60  # each long one past its first turn: its checkpoint is in Redis
    while not all(_past_first_turn(pool, t.task_id) for t in long):
        assert time.monotonic() < deadline, "the long tasks did not start"
        time.sleep(0.1)
    pool.enqueue(short)
    pool.shutdown()  # lets go of the handle; the supervised pool runs on
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    try:
        AgentPool.connect(name)
        gone = False
    except Exception:
        gone = True
    config = PoolConfig(
        name=name,
        key_prefix=name,
        redis_url=redis_url,
        tool_modules=["tests.toolkit"],
        num_workers=1,
        worker_concurrency=4,
    )
    tasks = long + short
    with AgentPool.start(config) as again:
        deadline = time.monotonic() + 120
        while len(record_counts(redis_url, name, "acme")) < len(tasks) and time.monotonic() < deadline:
            time.sleep(0.2)
        counts = record_counts(redis_url, name, "acme")
        records = {r.task_id: r for r in again.results("acme").read()}
    return {
        "exit_code": proc.returncode,
        "output": first + out,
        "errors": err[-2000:],
        "pool_gone": gone,
        "submitted": len(tasks),
        "lost": sum(1 for t in tasks if t.task_id not in counts),
        "duplicates": sum(n - 1 for n in counts.values()),
        "statuses": sorted({r.status for r in records.values()}),
        "long_resumed": sorted(records[t.task_id].resumes for t in long if t.task_id in records),
    }


def main(scenario: str, redis_url: str) -> dict[str, Any]:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"agentpool_head": 1}})
    try:
        if scenario == "cli":
            return cli(cluster)
        if scenario == "supervise":
            return supervise(cluster, redis_url)
        return driver(cluster) if scenario == "driver" else node(cluster, redis_url)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
