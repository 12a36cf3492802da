"""The HTTP API's commands: `agentpool serve` and `agentpool keys create/list/revoke`."""

from __future__ import annotations

import logging
import time
from typing import Annotated

import typer

from agentpool.cli_common import AddressOption, NameOption, _connect, _debug, console, friendly, stderr
from agentpool.vocabulary import Ingress


def _interrupted(*_: object) -> None:
    """SIGTERM ends `serve` as Ctrl-C does (a service manager's stop)."""
    raise KeyboardInterrupt


keys_app = typer.Typer(help="API keys of the HTTP API, per tenant (shown once; Redis keeps a salted hash).")


@keys_app.command("create")
@friendly
def keys_create(
    tenant: Annotated[str, typer.Argument(help="Whose key: requests with it act as this tenant.")],
    label: Annotated[str, typer.Option("--label", help="What the key is for (shown by `keys list`).")] = "",
    name: NameOption = "agentpool",
    address: AddressOption = None,
) -> None:
    """Creates a key for TENANT and prints it (only now: it cannot be shown again)."""
    print(_connect(name, address).create_api_key(tenant, name=label))


@keys_app.command("list")
@friendly
def keys_list(
    tenant: Annotated[str, typer.Argument(help="Whose keys.")],
    name: NameOption = "agentpool",
    address: AddressOption = None,
) -> None:
    """Lists TENANT's keys: id, label and when each was made (never a key itself)."""
    for key in _connect(name, address).api_keys(tenant):
        made = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(key["created_unix"]))
        print(f"{key['key_id']}  {made} UTC  {key['name']}")


@keys_app.command("revoke")
@friendly
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (the part after `ap_`).")],
    name: NameOption = "agentpool",
    address: AddressOption = None,
) -> None:
    """Revokes a key: requests with it get 401 from now on."""
    if not _connect(name, address).revoke_api_key(key_id):
        stderr.print(f"[yellow]no key {key_id}[/]")
        raise typer.Exit(1)
    console.print(f"key {key_id} revoked")


@friendly
def serve(
    host: Annotated[str, typer.Option(help="Address the API listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Its port.")] = 8000,
    ingress: Annotated[
        Ingress | None,
        typer.Option(help="What takes connections: HAProxy where found (auto), or Serve's Python proxy."),
    ] = None,
    key: Annotated[
        list[str] | None, typer.Option("--key", help="Create and print an API key for this tenant; repeatable.")
    ] = None,
    name: NameOption = "agentpool",
    address: AddressOption = None,
) -> None:
    """Serves the HTTP API on Ray Serve until interrupted: for the pool NAME running on the
    Ray cluster (RAY_ADDRESS, or one `ray start --head` runs here), or else for a local pool
    this command starts (configured by AGENTPOOL_* variables) and stops when it ends."""
    import signal

    from agentpool import AgentPool, PoolConfig
    from agentpool.errors import PoolNotRunning
    from agentpool.http.serve import serve_http, stop_http

    if not _debug["on"]:  # importing Serve set its logger to INFO again
        logging.getLogger("ray.serve").setLevel(logging.ERROR)
    try:
        pool = AgentPool.connect(name, address=address)
        origin = "running on the cluster"
    except (PoolNotRunning, ConnectionError):
        pool = AgentPool.start(PoolConfig(name=name))
        origin = "started here (local Ray, stopped with this command)"
    try:
        update: dict[str, object] = {"host": host, "port": port}
        if ingress is not None:
            update["ingress"] = ingress
        http = pool.config.http.model_copy(update=update)
        url = serve_http(pool.config.name, http)
        console.print(f"pool [bold]{pool.config.name}[/] {origin}")
        console.print(f"HTTP API at [bold]{url}[/]  (OpenAPI: {url}/docs, console: {url}/)")
        for tenant in key or []:
            console.print(f"API key for {tenant}: {pool.create_api_key(tenant, name='agentpool serve')}")
        signal.signal(signal.SIGTERM, _interrupted)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            console.print("stopping")
        stop_http(pool.config.name)
    finally:
        pool.shutdown()
