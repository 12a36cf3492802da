"""`nodes`: Ray's own autoscaler adding and removing agent-worker nodes for the pool.

A cluster on this machine on the autoscaler's `fake_multinode` provider, with
`ray-cluster.yaml`'s node types and resources (`tests/fake_cluster.py`; nodes are raylets
of their own, at most 4 agent-worker nodes, idle timeout 6 s, the autoscaler looking every
second). The load is tasks kept in flight (one 1 s LLM call each): one node's worth, then
four nodes' worth, then one again while the batch goes on (`tests/nodes_scenario.py`; the
quick run does this cycle once, the full run three times). Sampled every 0.25 s.

- `demand_to_autoscaler_add_s`: from the pool first wanting more workers than it has after
  a step up, to the autoscaler's "Adding N node(s)" event.
- `demand_to_node_taking_tasks_s`: from the same moment to the first worker on a new node
  taking tasks (the node started, the worker actor started on it, the scheduler found it).
- `nodes_at_peak`, `workers_at_peak`: agent-worker nodes alive (the one the autoscaler
  keeps, `min_workers: 1`, included) and the pool's workers; `nodes_added_per_ramp`: nodes
  Ray saw join, per step up.
- `idle_to_node_removal_s`: from a node's last worker leaving (its `agent_worker` slots all
  free) to the node gone; the autoscaler's idle timeout (6 s here) is most of it.
- `nodes_removed_mid_batch_per_ramp`: nodes removed while tasks still ran, per step up;
  `tasks_lost` (submitted, and no result or no record in Redis) and `tasks_duplicated` (two
  records) must be 0. `tasks` is the batch's size (the full run's is about 4x the quick's).

Each figure is the median over the steps (or nodes) it measures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report import _pyplot, write
from tests.fake_cluster import UPDATE_INTERVAL_S
from tests.nodes_scenario import ONE_NODE, summarize
from tests.scenarios import run_scenario


def _plot(report: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    start = report["start"]
    samples = report["samples"]
    t = [s["t"] - start for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    top.plot(t, [s["in_flight"] / ONE_NODE for s in samples], color="0.6", label="load (x one node's)")
    top.step(t, [s["desired"] for s in samples], where="post", linestyle="--", label="workers wanted")
    top.step(t, [s["workers"] for s in samples], where="post", label="workers taking tasks")
    top.set_ylabel("count")
    top.legend(loc="upper right", fontsize=8)
    bottom.step(t, [len(s["nodes"]) for s in samples], where="post", label="agent_worker nodes (Ray)")
    bottom.step(t, [len(s["taking"]) for s in samples], where="post", linestyle=":", label="nodes with pool workers")
    for e in report["events"]:
        if e["at"] >= start:
            colour = "tab:green" if e["added"] else "tab:red"
            for axis in (top, bottom):
                axis.axvline(e["at"] - start, color=colour, alpha=0.35, linewidth=1)
    bottom.yaxis.get_major_locator().set_params(integer=True)
    bottom.set_ylabel("nodes")
    bottom.set_xlabel("seconds (green: autoscaler adds nodes, red: removes idle ones)")
    bottom.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(out: Path, quick: bool) -> dict[str, Any]:
    profile = "quick" if quick else "full"
    report = run_scenario("tests.nodes_scenario", "-", profile, timeout_s=1200)
    figures = summarize(report)
    out.mkdir(parents=True, exist_ok=True)
    _plot(report, out / "nodes_workers.png")
    events = "\n".join(
        f"- +{e['at'] - report['start']:.1f} s: {e['text']}" for e in report["events"] if e["at"] >= report["start"]
    )
    notes = (
        f"Steps (seconds, load in units of one node's {ONE_NODE} tasks in flight): {report['steps']}.\n\n"
        f"The autoscaler's events (from its log):\n\n{events}"
    )
    config = {
        "quick": quick,
        "profile": profile,
        "steps": report["steps"],
        "one_node_tasks_in_flight": ONE_NODE,
        "autoscaler_update_interval_s": UPDATE_INTERVAL_S,
        "idle_timeout_s": report["autoscaler"]["idle_timeout_minutes"] * 60,
        "node_types": report["autoscaler"]["available_node_types"],
    }
    write(out, "nodes", figures=figures, config=config, notes=notes, plots=["nodes_workers.png"])
    return figures
