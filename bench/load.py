"""Open-loop load: arrivals per stream (Poisson, or bursty with heavy-tailed gaps), each
stream from its own seeded generator."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray

from agentpool import AgentPool, AgentResult, AgentTask

#: Makes the k-th task of a stream, drawing whatever it needs from the stream's generator.
MakeTask = Callable[[str, int, random.Random], AgentTask]
#: The gap before a stream's next arrival, for a mean rate (per second), from its generator.
Gaps = Callable[[random.Random, float], float]


def poisson(rng: random.Random, rate: float) -> float:
    """Exponential gaps: a Poisson process (coefficient of variation 1)."""
    return rng.expovariate(rate)


def bursty(cv: float) -> Gaps:
    """Gamma-distributed gaps with mean 1/rate and coefficient of variation `cv`: above 1,
    arrivals come in bursts separated by long lulls, as in traces of real LLM traffic."""
    shape = 1 / cv**2

    def gap(rng: random.Random, rate: float) -> float:
        return rng.gammavariate(shape, 1 / (rate * shape))

    return gap


@dataclass
class Timeline:
    """When things happened in an open-loop phase, in seconds from its start: each task's
    arrival (by task_id) and samples of the pool's queue, (at, queued, in_flight)."""

    sample_every_s: float = 0.25
    arrived_at: dict[str, float] = field(default_factory=dict)
    queue: list[tuple[float, int, int]] = field(default_factory=list)

    def ended_at(self, result: AgentResult) -> float:
        """When the task's result was ready (its arrival plus its end-to-end time)."""
        return self.arrived_at[result.task_id] + result.timings.total_ms / 1000

    def _sample(self, pool: AgentPool, begin: float, stop: threading.Event) -> None:
        while not stop.wait(self.sample_every_s):
            status = pool.status()
            self.queue.append((time.monotonic() - begin, int(status["queued"]), int(status["in_flight"])))


def open_loop(
    pool: AgentPool,
    rates: dict[str, float],
    duration_s: float,
    seed: int,
    make_task: MakeTask,
    *,
    measured: set[str] | None = None,
    timeline: Timeline | None = None,
    gaps: Gaps = poisson,
) -> dict[str, list[AgentResult]]:
    """Submits each stream's arrivals on time, whatever has finished (arrivals never wait for
    completions). A stream's arrival times and tasks depend only on its name and `seed`, so
    the same stream is the same load whatever else runs beside it.

    Returns the results of the `measured` streams (all by default), in arrival order; the
    other streams' outstanding tasks are cancelled. A `timeline` gets the arrival times and
    queue samples, until the last measured result is in.
    """
    arrivals: list[tuple[float, str, AgentTask]] = []
    for stream, rate in rates.items():
        rng = random.Random(f"{seed}:{stream}")
        at, k = gaps(rng, rate), 0
        while at < duration_s:
            arrivals.append((at, stream, make_task(stream, k, rng)))
            at, k = at + gaps(rng, rate), k + 1
    arrivals.sort(key=lambda a: a[0])
    refs: dict[str, list[ray.ObjectRef]] = {s: [] for s in rates}
    begin = time.monotonic()
    stop = threading.Event()
    sampler = None
    if timeline is not None:
        timeline.arrived_at.update((task.task_id, at) for at, _, task in arrivals)
        sampler = threading.Thread(target=timeline._sample, args=(pool, begin, stop), daemon=True)
        sampler.start()
    try:
        for at, stream, task in arrivals:
            delay = begin + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            refs[stream] += pool.submit([task])
        wanted = set(rates) if measured is None else measured
        results: dict[str, list[AgentResult]] = {}
        for stream, stream_refs in refs.items():
            if stream in wanted:
                results[stream] = ray.get(stream_refs)
            else:
                for ref in stream_refs:
                    ray.cancel(ref)
    finally:
        stop.set()
        if sampler is not None:
            sampler.join()
    return results


def require_succeeded(results: list[AgentResult], what: str) -> None:
    """A benchmark measures tasks that ran: any other outcome makes its figures meaningless."""
    failed = [r.status for r in results if r.status != "succeeded"]
    if failed:
        raise RuntimeError(f"{what}: {len(failed)} of {len(results)} tasks did not succeed: {sorted(set(failed))}")


def wait_idle(pool: AgentPool, timeout_s: float = 60.0) -> None:
    """Waits until the previous phase's leftovers (cancelled backlog, runs in flight) are gone,
    so that each phase measures only its own traffic."""
    end = time.monotonic() + timeout_s
    status = pool.status()
    while time.monotonic() < end:
        status = pool.status()
        if status["queued"] == 0 and status["in_flight"] == 0:
            return
        time.sleep(0.1)
    raise TimeoutError(f"pool still busy after {timeout_s}s: {status['queued']} queued, {status['in_flight']} running")
