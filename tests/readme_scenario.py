"""Runs the README's python and bash blocks for real, in a process with a Ray cluster of its
own (the detached-pool block needs one that outlives the pool's driver), an embedded Redis
as `AGENTPOOL_REDIS_URL`, and `myapp.tools` written from the README. Prints a JSON report
on its last line: for each block, its line and what went wrong (None when it ran)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from tests.readme_blocks import blocks, shell_lines

#: A line that follows or waits for new results may still be running at its time-out.
_WAITS = ("--follow", " BLOCK ")
_WAIT_S, _LINE_TIMEOUT_S = 8, 90


def _run_python(code: str, namespace: dict[str, Any]) -> str | None:
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "<README>", "exec"), namespace)
    except BaseException:
        return traceback.format_exc(limit=-3)[-3000:]
    return None


def _run_bash(code: str, env: dict[str, str], cwd: str) -> str | None:
    problems = []
    exports = [line for line in shell_lines(code) if line.startswith("export ")]
    for line in shell_lines(code):
        if line.startswith("export "):
            continue
        script = "\n".join([*exports, line])
        waits = any(w in f" {line} " for w in _WAITS)
        try:
            done = subprocess.run(
                ["bash", "-c", script],
                env=env,
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=_WAIT_S if waits else _LINE_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            if not waits:
                problems.append(f"{line}: still running after {_LINE_TIMEOUT_S} s")
            continue
        if done.returncode != 0:
            problems.append(f"{line}: exit {done.returncode}: {(done.stderr or done.stdout)[-1500:]}")
    if exports:  # the variables the block sets must be ones the pool accepts
        check = "\n".join([*exports, f"{sys.executable} -c 'from cluster.telemetry import check_env; check_env()'"])
        done = subprocess.run(["bash", "-c", check], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            problems.append(f"the exported variables: {done.stderr[-1500:]}")
    return "\n".join(problems) or None


def main() -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster

    from agentpool.cluster.redis_server import EmbeddedRedis, find_redis_server

    root = Path(__file__).resolve().parent.parent
    work = Path(tempfile.mkdtemp(prefix="readme-"))
    found = blocks()
    for block in found:
        if block.lang == "python" and block.module_path:
            target = work / block.module_path
            target.parent.mkdir(parents=True, exist_ok=True)
            for parent in target.relative_to(work).parents:
                (work / parent / "__init__.py").touch()
            target.write_text(block.code + "\n")
    redis = EmbeddedRedis()
    url = redis.start()
    bin_dirs = [str(Path(sys.executable).parent), str(Path(find_redis_server()).parent)]  # agentpool, redis-cli
    # Set before the cluster starts: its processes (the pool's actors) inherit them.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(work), str(root), os.environ.get("PYTHONPATH", "")])
    os.environ["PATH"] = os.pathsep.join([*bin_dirs, os.environ["PATH"]])
    os.environ["AGENTPOOL_REDIS_URL"] = url
    sys.path[:0] = [str(work)]
    head = {"num_cpus": 2, "resources": {"agentpool_head": 1, "agent_worker": 8, "tool_executor": 8}}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    os.environ["RAY_ADDRESS"] = cluster.address
    report: dict[str, Any] = {}
    try:
        namespace: dict[str, Any] = {"__name__": "__main__"}
        for block in found:
            if block.lang == "python" and not block.module_path:
                report[str(block.line)] = _run_python(block.code, namespace)
                if ray.is_initialized():  # a block that left its pool running: the next starts its own
                    with contextlib.suppress(Exception):
                        from agentpool.launch import NAMESPACE

                        for actor in ray.util.list_named_actors(all_namespaces=True):
                            if actor["namespace"] == NAMESPACE:
                                ray.kill(ray.get_actor(actor["name"], namespace=NAMESPACE), no_restart=True)
                    ray.shutdown()
        env = {**os.environ, "AGENTPOOL_REDIS_URL": url}
        for block in found:
            if block.lang == "bash" and block.marker is None:
                report[str(block.line)] = _run_bash(block.code, env, str(root))
    finally:
        ray.shutdown()
        cluster.shutdown()
        redis.stop()
    return report


if __name__ == "__main__":
    print(json.dumps(main()))
