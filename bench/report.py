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


def cpu_seconds(processes: list[Any]) -> float:
    """User plus system CPU time of these `psutil.Process`es; one that has exited counts 0."""
    import psutil

    total = 0.0
    for proc in processes:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


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


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _per_bin(times: list[float], bin_s: float, bins: int) -> list[float]:
    counts = [0.0] * bins
    for t in times:
        if 0 <= t < bins * bin_s:
            counts[int(t / bin_s)] += 1
    return [c / bin_s for c in counts]


def timeseries(
    out: Path,
    name: str,
    *,
    completed: dict[str, list[float]],
    by_tenant: dict[str, list[float]],
    queue: list[tuple[float, int, int]],
    duration_s: float,
    bin_s: float = 1.0,
    title: str | None = None,
) -> str:
    """Three panels over a phase: completions per second of each series (`completed`: when
    each task ended, seconds from the phase start), the pool's queue depth and tasks in flight
    (`queue`: samples of (at, queued, in_flight)), and each tenant's share of the completions
    per bin (`by_tenant`). Written to `out/NAME_timeseries.png`; returns the file name."""
    plt = _pyplot()
    end = max([duration_s, *(t for ts in completed.values() for t in ts)])
    bins = max(1, int(end / bin_s) + 1)
    xs = [(i + 0.5) * bin_s for i in range(bins)]
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    for label, times in completed.items():
        top.plot(xs, _per_bin(times, bin_s, bins), label=label)
    top.set_ylabel("completed per s")
    top.legend(fontsize=8)
    middle.plot([q[0] for q in queue], [q[1] for q in queue], label="queued")
    middle.plot([q[0] for q in queue], [q[2] for q in queue], label="in flight")
    middle.set_ylabel("tasks")
    middle.legend(fontsize=8)
    rates = {tenant: _per_bin(times, bin_s, bins) for tenant, times in by_tenant.items()}
    totals = [sum(r[i] for r in rates.values()) or 1.0 for i in range(bins)]
    bottom.stackplot(xs, *[[r[i] / totals[i] for i in range(bins)] for r in rates.values()], labels=list(rates))
    bottom.set_ylabel("share of completed")
    bottom.set_xlabel("seconds from the start of the phase")
    bottom.set_ylim(0, 1)
    bottom.legend(fontsize=8, loc="lower right")
    for ax in (top, middle, bottom):
        ax.grid(alpha=0.3)
    for ax in (top, middle):
        ax.axvline(duration_s, color="grey", linestyle=":", linewidth=1)
    fig.suptitle(title or f"{name}: over time")
    file_name = f"{name}_timeseries.png"
    fig.savefig(out / file_name, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return file_name


def latency_cdf(out: Path, name: str, series: dict[str, list[float]], *, title: str | None = None) -> str:
    """Plots the latency CDF of each series (log scale) to `out/NAME_latency_cdf.png`; returns the file name."""
    plt = _pyplot()
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
