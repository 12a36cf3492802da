"""Writes a benchmark's figures as JSON plus a Markdown report, with machine facts."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    import ray

    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "ray": ray.__version__,
        "when_unix": time.time(),
    }
    try:
        facts["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    try:
        facts["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        pass
    return facts


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def write(
    out: Path,
    name: str,
    *,
    figures: dict[str, float],
    config: dict[str, Any],
    notes: str = "",
    plots: list[str] | None = None,
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"name": name, "figures": figures, "config": config, "machine": machine()}, indent=2))
    lines = [f"# bench: {name}", "", "| figure | value |", "|---|---|"]
    lines += [f"| `{k}` | {v:.6g} |" if isinstance(v, float) else f"| `{k}` | {v} |" for k, v in figures.items()]
    lines += ["", notes, ""]
    lines += [f"![{p}]({p})" for p in plots or []]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    return path
