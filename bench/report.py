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


def latency_cdf(out: Path, name: str, series: dict[str, list[float]], *, title: str | None = None) -> str:
    """Plots the latency CDF of each series (log scale) to `out/NAME_latency_cdf.png`; returns the file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in series.items():
        ordered = sorted(values)
        if ordered:
            ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("latency per task (ms)")
    ax.set_ylabel("fraction of tasks")
    ax.set_title(title or f"{name}: latency CDF")
    ax.legend()
    ax.grid(alpha=0.3)
    file_name = f"{name}_latency_cdf.png"
    fig.savefig(out / file_name, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return file_name
