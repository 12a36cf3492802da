"""Process isolation for tools: each call of a process-isolated tool runs in a child process
of its own, forked from a small helper (the zygote) that the executor starts once.

A thread cannot be stopped and a crash takes its process with it; a child process can be
killed and can die alone. So for such a tool:

- a call that overruns its timeout is killed (SIGKILL) at the timeout: no thread stays stuck,
  and a tool spinning in C code or a busy loop stops using the CPU;
- a call that kills its process (`os._exit`, a segfault, the OOM killer) costs that call a
  `crashed` result and a fork, while the executor, its other calls and its Ray worker live on.

The zygote imports the executor's tool modules once, then forks per call (copy-on-write, a
millisecond or two), so a call pays neither an interpreter start nor the imports. It runs no
tool code itself, has a single thread (forking it is safe, unlike forking a Ray worker), and
exits with its children when the executor goes (its standard input closes).

Wire: frames of a 4-byte big-endian length and a pickle, on the zygote's stdin and stdout
(the zygote points its own fd 1 at stderr, so a tool's `print` cannot corrupt them).
    executor -> zygote: ("run", call_id, tool, kwargs) | ("kill", call_id)
    zygote -> executor: ("ready",) | ("ok", call_id, content) | ("tool_error", call_id, kind, message)
                        | ("error", call_id, type_name, message) | ("crashed", call_id, how)
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import json
import os
import pickle
import selectors
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from agentpool.errors import ToolError
from agentpool.vocabulary import ToolErrorKind

_HEADER = struct.Struct(">I")
_PR_SET_PDEATHSIG = 1
_REAP_EVERY_S = 0.02
#: Longest a zygote may take to import the tool modules before calls fail.
START_TIMEOUT_S = 60.0


class ToolRaised(Exception):  # it stands for the tool's own exception
    """A process-isolated tool raised: carries the type name of its exception, for the model."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(message)
        self.type_name = type_name


class Sandbox:
    """The executor's side: starts the zygote and runs calls in its children.

    Args:
        modules: Tool modules for the zygote to import (the executor's own).
    """

    def __init__(self, modules: list[str]) -> None:
        self._modules = modules
        self._ids = itertools.count()
        self._pending: dict[int, tuple[str, asyncio.Future[str]]] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._transport: asyncio.WriteTransport | None = None
        self._reader: asyncio.Task[None] | None = None
        self.crashes = 0
        self.killed = 0
        self.start()

    def start(self) -> None:
        """Launches the zygote now (it imports in the background); connected on first use."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "agentpool.actors.tool_sandbox", *self._modules],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
        )
        self._ready = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def call(self, tool: str, kwargs: dict[str, Any], timeout_s: float) -> str:
        """Runs `tool(**kwargs)` in a fresh child, killed once `timeout_s` has passed.

        Returns:
            The tool's output as text (JSON for other values).

        Raises:
            TimeoutError: The call overran (its child is killed).
            ToolError: The tool raised one, or it crashed its process (`kind="crashed"`).
            ToolRaised: The tool raised another exception.
        """
        await asyncio.wait_for(self._connect(), START_TIMEOUT_S)  # not the tool's time: a start-up is rare
        call_id = next(self._ids)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = (tool, future)
        try:
            self._send(("run", call_id, tool, kwargs))  # arguments that do not pickle raise here
            return await asyncio.wait_for(future, timeout_s)
        except (TimeoutError, asyncio.CancelledError):
            if future.cancelled():  # no answer came: the child still runs
                self.killed += 1
                self._send(("kill", call_id))
            raise
        finally:
            self._pending.pop(call_id, None)

    async def _connect(self) -> None:
        if self._ready is None:  # not connected yet, or the last zygote is gone (see `_read`)
            if self._proc is None or self._proc.poll() is not None:
                self.start()
            assert self._proc is not None and self._proc.stdin is not None and self._proc.stdout is not None
            loop = asyncio.get_running_loop()
            self._ready = loop.create_future()
            reader = asyncio.StreamReader(limit=2**26)
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), self._proc.stdout)
            self._transport, _ = await loop.connect_write_pipe(asyncio.Protocol, self._proc.stdin)
            self._reader = loop.create_task(self._read(reader, self._ready))  # held: the loop keeps tasks weakly
        await asyncio.shield(self._ready)

    def _send(self, message: tuple[Any, ...]) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._transport.write(_HEADER.pack(len(payload)) + payload)

    async def _read(self, reader: asyncio.StreamReader, ready: asyncio.Future[None]) -> None:
        try:
            while True:
                size = _HEADER.unpack(await reader.readexactly(_HEADER.size))[0]
                self._deliver(pickle.loads(await reader.readexactly(size)), ready)  # trusted: our own zygote's frames
        except (asyncio.IncompleteReadError, ConnectionError, pickle.UnpicklingError):
            pass
        # The zygote is gone (it runs no tool code, so only a kill gets it): calls in flight
        # fail as crashed, and the next call starts a new one.
        self.crashes += 1
        if not ready.done():
            ready.set_exception(ToolError("the tool sandbox failed to start", tool="", kind=ToolErrorKind.CRASHED))
        for tool, future in list(self._pending.values()):
            if not future.done():
                future.set_exception(_crashed(tool, "its sandbox process died"))
        if self._transport is not None:
            self._transport.close()
        self._transport = None
        self._ready = None
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            self._proc.wait()

    def _deliver(self, message: tuple[Any, ...], ready: asyncio.Future[None]) -> None:
        kind = message[0]
        if kind == "ready":
            ready.set_result(None)
            return
        entry = self._pending.get(message[1])
        if entry is None or entry[1].done():  # killed at its timeout: nobody waits any more
            return
        tool, future = entry
        if kind == "ok":
            future.set_result(message[2])
        elif kind == "tool_error":
            future.set_exception(ToolError(message[3], tool=tool, kind=ToolErrorKind.of(message[2])))
        elif kind == "error":
            future.set_exception(ToolRaised(message[2], message[3]))
        else:
            future.set_exception(_crashed(tool, message[2]))

    def close(self) -> None:
        """Stops the zygote: its standard input closes, and it kills its children and exits."""
        if self._proc is None or self._proc.poll() is not None:
            return
        try:
            if self._transport is None:
                raise RuntimeError("not connected")
            self._transport.close()  # after any frame still buffered
        except RuntimeError:  # never connected, or its event loop is closed
            assert self._proc.stdin is not None
            with contextlib.suppress(OSError):
                self._proc.stdin.close()


def _crashed(tool: str, how: str) -> ToolError:
    return ToolError(f"tool {tool} crashed the process it ran in ({how})", tool=tool, kind=ToolErrorKind.CRASHED)


# --- the zygote (runs as `python -m agentpool.actors.tool_sandbox MODULE...`) ---------------------------


@dataclass
class _Child:
    call_id: int
    pid: int
    chunks: list[bytes] = field(default_factory=list)


def _run_in_child(spec: Any, kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """What the child sends back: never raises."""
    try:
        value = asyncio.run(spec.fn(**kwargs)) if spec.is_async else spec.fn(**kwargs)
        return ("ok", value if isinstance(value, str) else json.dumps(value, default=str))
    except ToolError as exc:
        return ("tool_error", exc.fields.get("kind", "error"), exc.message)
    except BaseException as exc:  # a tool's own failure, reported to the model
        return ("error", type(exc).__name__, str(exc))


def _read_frame(stream: BinaryIO) -> tuple[Any, ...] | None:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    payload = b""
    while len(payload) < size:
        chunk = stream.read(size - len(payload))
        if not chunk:
            return None
        payload += chunk
    message: tuple[Any, ...] = pickle.loads(payload)  # trusted: the executor that started us
    return message


def _how_it_ended(pid: int) -> str:
    """Reaps a child whose result pipe has closed: it has exited, or is about to (a tool that
    closed the pipe itself and lives on is killed after a moment)."""
    for _ in range(100):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.005)
    else:
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.WEXITSTATUS(status)}"


def _reap(exiting: dict[int, float]) -> None:
    """Reaps the children that have exited; kills one that lingers after sending its outcome."""
    now = time.monotonic()
    for pid, kill_at in list(exiting.items()):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            del exiting[pid]
        elif now >= kill_at:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def serve(modules: list[str]) -> None:
    """The zygote's loop: fork a child per "run", report how each one ended."""
    from agentpool.tools import load_tools

    control_in = os.fdopen(os.dup(0), "rb", buffering=0)
    control_out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # anything printed goes to stderr, never into the frames
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)

    def send(*message: Any) -> None:
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        control_out.write(_HEADER.pack(len(payload)) + payload)

    tools = load_tools(modules)
    try:  # Linux: a child dies with the zygote, even if the zygote is killed by a signal
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        prctl = None
    selector = selectors.DefaultSelector()
    selector.register(control_in, selectors.EVENT_READ, None)
    children: dict[int, _Child] = {}  # by the fd its result comes on
    exiting: dict[int, float] = {}  # children that sent their outcome, to reap: pid -> when to kill
    send("ready")
    while True:
        events = selector.select(_REAP_EVERY_S if exiting else None)
        _reap(exiting)
        for key, _ in events:
            if key.data is None:
                message = _read_frame(control_in)
                if message is None:  # the executor is gone: so are its calls
                    for running in children.values():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(running.pid, signal.SIGKILL)
                    return
                if message[0] == "kill":
                    for running in children.values():
                        if running.call_id == message[1]:
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(running.pid, signal.SIGKILL)
                    continue
                _, call_id, name, kwargs = message
                spec = tools.get(name)
                if spec is None:
                    send("tool_error", call_id, "unknown_tool", f"unknown tool {name!r}")
                    continue
                read_fd, write_fd = os.pipe()
                pid = os.fork()
                if pid == 0:  # the child: run the tool, send its outcome, leave without cleanup
                    try:
                        selector.close()
                        control_in.close()
                        control_out.close()
                        for fd in (read_fd, *children):
                            os.close(fd)
                        signal.signal(signal.SIGINT, signal.SIG_DFL)
                        if prctl is not None:
                            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
                        result = pickle.dumps(_run_in_child(spec, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
                        with os.fdopen(write_fd, "wb") as out:
                            out.write(result)
                    finally:
                        os._exit(0)
                os.close(write_fd)
                # Non-blocking: an event of this batch may name a descriptor number that a
                # child has just released and a new child's pipe taken, with nothing to read yet.
                os.set_blocking(read_fd, False)
                children[read_fd] = _Child(call_id, pid)
                selector.register(read_fd, selectors.EVENT_READ, read_fd)
            else:
                child = children.get(key.data)
                if child is None:
                    continue
                try:
                    chunk = os.read(key.data, 1 << 16)
                except BlockingIOError:
                    continue
                if chunk:
                    child.chunks.append(chunk)
                    continue
                selector.unregister(key.data)
                os.close(key.data)
                del children[key.data]
                try:
                    outcome = pickle.loads(b"".join(child.chunks))  # trusted: our own zygote's frames
                except Exception:  # nothing, or cut short: the process died
                    send("crashed", child.call_id, _how_it_ended(child.pid))
                else:  # answered at once; the child is on its way out
                    send(outcome[0], child.call_id, *outcome[1:])
                    exiting[child.pid] = time.monotonic() + 1.0


if __name__ == "__main__":
    serve(sys.argv[1:])
