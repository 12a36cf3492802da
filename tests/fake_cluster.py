"""A Ray cluster on this machine whose worker nodes Ray's own autoscaler adds and removes.

The autoscaler (the head's `monitor` process, the same code as on a cloud) runs with Ray's
`fake_multinode` provider: a "node" it launches is a raylet of its own on this machine,
started by the monitor, and terminating it kills that raylet. The node types, their custom
resources, `min_workers` and the upscaling speed come from `ray-cluster.yaml`; only the
node counts are capped to what one machine holds and the idle timeout is shortened.

Ray's `AutoscalingCluster` does the same but runs `ray stop --force` first (which would kill
every other Ray on the machine, the test suite's too) and reads an example file the wheel
does not ship; this starts the head with `ray.cluster_utils.Cluster` on a port of its own
and, when stopped, kills exactly the processes the monitor started.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import ray
import yaml
from ray._private import ray_constants
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID, FAKE_HEAD_NODE_TYPE
from ray.cluster_utils import Cluster

from agentpool.cluster.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
RAY_CLUSTER_YAML = ROOT / "ray-cluster.yaml"
#: How often the autoscaler looks (Ray's default is 5 s; its own tests use 1 s).
UPDATE_INTERVAL_S = 1

_EVENT = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}).*:event_summary:"
    r"(?P<text>(?P<verb>Adding|Removing) (?P<count>\d+) nodes?(?:\(s\))? of type (?P<type>[\w.-]+?)\.?(?: .*)?)$"
)


@dataclass(frozen=True)
class AutoscalerEvent:
    """One line of the autoscaler's own event summary (what `ray status` and drivers show)."""

    at: float  # unix time
    added: bool  # False: removed
    count: int
    node_type: str
    text: str


def fake_config(gcs_address: str, *, max_nodes: dict[str, int], idle_timeout_s: float) -> dict[str, Any]:
    """`ray-cluster.yaml`'s node types on the fake provider: the same resources and
    `min_workers`, at most `max_nodes[type]` nodes of each type (types not named: none)."""
    source = yaml.safe_load(RAY_CLUSTER_YAML.read_text())
    types: dict[str, Any] = {}
    for name, spec in source["available_node_types"].items():
        if name == source["head_node_type"]:
            types[FAKE_HEAD_NODE_TYPE] = {"resources": spec["resources"], "node_config": {}, "max_workers": 0}
            continue
        cap = min(int(spec["max_workers"]), max_nodes.get(name, 0))
        types[name] = {
            "resources": spec["resources"],
            "node_config": {},
            "min_workers": min(int(spec.get("min_workers", 0)), cap),
            "max_workers": cap,
        }
    return {
        "cluster_name": "agentpool-fake",
        "max_workers": sum(t.get("max_workers", 0) for t in types.values()),
        "upscaling_speed": source.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_s / 60,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "auth": {"ssh_user": "ubuntu"},
        "docker": {},
        "available_node_types": types,
        "head_node_type": FAKE_HEAD_NODE_TYPE,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class FakeAutoscalingCluster:
    """The head node (the control plane's resources, as in `ray-cluster.yaml`) and Ray's
    autoscaler; worker nodes come and go as the autoscaler decides."""

    def __init__(self, *, max_nodes: dict[str, int], idle_timeout_s: float) -> None:
        self.max_nodes = max_nodes
        self.idle_timeout_s = idle_timeout_s
        self.config: dict[str, Any] = {}
        self._cluster: Cluster | None = None
        self._config_file = ""

    def start(self) -> str:
        """Starts the head and the autoscaler; the address to `ray.init`."""
        # The monitor (a child of this process) reads these: the fake provider refuses to
        # run without the first.
        os.environ["RAY_FAKE_CLUSTER"] = "1"
        os.environ["AUTOSCALER_UPDATE_INTERVAL_S"] = str(UPDATE_INTERVAL_S)
        port = free_port()
        address = f"{ray.util.get_node_ip_address()}:{port}"
        self.config = fake_config(address, max_nodes=self.max_nodes, idle_timeout_s=self.idle_timeout_s)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="agentpool-fake-", delete=False) as f:
            yaml.safe_dump(self.config, f)
            self._config_file = f.name
        head = dict(self.config["available_node_types"][FAKE_HEAD_NODE_TYPE]["resources"])
        self._cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": head.pop("CPU", 0),
                "resources": head,
                "gcs_server_port": port,
                "autoscaling_config": self._config_file,
                # The provider knows its head by this id.
                "env_vars": {"RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID},
            },
        )
        return str(self._cluster.address)

    def events(self) -> list[AutoscalerEvent]:
        """The autoscaler's event summary so far, from its log."""
        assert self._cluster is not None
        log = Path(self._cluster.head_node.get_logs_dir_path()) / "monitor.log"
        found = []
        for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
            m = _EVENT.match(line)
            if m:
                at = datetime.strptime(m["ts"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                found.append(AutoscalerEvent(at, m["verb"] == "Adding", int(m["count"]), m["type"], m["text"]))
        return found

    def _monitor(self) -> psutil.Process:
        assert self._cluster is not None
        info = self._cluster.head_node.all_processes[ray_constants.PROCESS_TYPE_MONITOR][0]
        return psutil.Process(info.process.pid)

    def shutdown(self) -> None:
        """Stops the head and every node the autoscaler started, and nothing else: the
        fake nodes are the monitor's children (raylets and the agents they start)."""
        if self._cluster is None:
            return
        try:
            children = self._monitor().children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        session = self._cluster.head_node.get_session_dir_path()
        self._cluster.shutdown()
        for proc in children:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(children, timeout=10)
        # A raylet's workers and agents outlive it for a moment; they are its session's.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _session_processes(session):
            for proc in _session_processes(session):
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.2)
        os.unlink(self._config_file)
        self._cluster = None


def _session_processes(session_dir: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(session_dir in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            continue
    return found
