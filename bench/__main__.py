"""`python -m bench NAME [--quick] [--out DIR]`; `python -m bench all` runs every benchmark."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from agentpool.launch import start_local_ray
from agentpool.pool import NAMESPACE
from bench import (
    autoscale,
    batch,
    chaos,
    cost,
    fairness,
    http,
    mutation,
    nodes,
    overhead,
    overload,
    ratelimit,
    rollout,
    scale,
    sessions,
    tools,
)

BENCHMARKS: dict[str, Callable[[Path, bool], dict[str, Any]]] = {
    "batch": batch.run,
    "ratelimit": ratelimit.run,
    "fairness": fairness.run,
    "tools": tools.run,
    "overhead": overhead.run,
    "overload": overload.run,
    "scale": scale.run,
    "autoscale": autoscale.run,
    "chaos": chaos.run,
    "nodes": nodes.run,
    "http": http.run,
    "sessions": sessions.run,
    "cost": cost.run,
    "rollout": rollout.run,
    "mutation": mutation.run,
}
#: Benchmarks of pure code, run without Ray (and left out of `all`, which measures the pool).
WITHOUT_RAY = {"mutation"}
#: Benchmarks that start a Ray cluster of their own (in a subprocess).
OWN_CLUSTER = {"nodes"}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("name", choices=[*BENCHMARKS, "all"])
    parser.add_argument("--quick", action="store_true", help="a run of under a minute")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory")
    args = parser.parse_args()
    names = [n for n in BENCHMARKS if n not in WITHOUT_RAY] if args.name == "all" else [args.name]
    args.out.mkdir(parents=True, exist_ok=True)
    # One local Ray for every benchmark and phase: a pool started inside it leaves it running.
    if any(name not in WITHOUT_RAY | OWN_CLUSTER for name in names):
        start_local_ray(namespace=NAMESPACE, log_to_driver=False, include_dashboard=False, configure_logging=False)
    try:
        for name in names:
            figures = BENCHMARKS[name](args.out, args.quick)
            print(json.dumps({name: figures}, indent=2))
            print(f"wrote {args.out / (name + '.json')} and {args.out / (name + '.md')}")
    finally:
        ray.shutdown()
    if args.name == "all":
        print(f"wrote {combined_report(args.out, names, quick=args.quick)}")


def combined_report(out: Path, names: list[str], *, quick: bool) -> Path:
    """One Markdown report of every benchmark's report, in the order they ran."""
    parts = [f"# agentpool benchmarks ({'quick' if quick else 'full'} run)", ""]
    for name in names:
        report = out / f"{name}.md"
        if report.exists():
            # Each report starts with its own top-level heading: one level down here.
            parts += ["#" + line if line.startswith("#") else line for line in report.read_text().splitlines()]
            parts.append("")
    path = out / "REPORT.md"
    path.write_text("\n".join(parts) + "\n")
    return path


if __name__ == "__main__":
    main()
