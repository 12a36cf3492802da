"""The garbage collector of a pool's long-lived processes: what they hold from the start is
set aside once, so collections scan only what came after.

An actor process holds a few hundred thousand objects from its start (Ray's core worker,
the modules it imported, the SDK's classes and schemas) that live as long as it does.
CPython's collector scans them all again at every full collection, and an actor busy with
hundreds of tasks at once triggers one every second or so. With the simulator answering at
once (`bench overhead`'s batch of 4,000 tasks, 11.6 s on this 2-core machine), each worker
was in the collector for about 3 s of it, three quarters of that in 7-8 full collections
over its start-up objects (`gc.callbacks`, wall time).

`settle()`, called once at the end of an actor's constructor, collects the young garbage
start-up left, then freezes the survivors (`gc.freeze()`: moved to a permanent generation
that collections skip; reference counting still frees them). Only the young generations:
a full collection over what the actors' imports hold took 140 ms and found nothing to free,
and every pool start would pay it once per actor. Ray Serve does the same for its replicas
(`RAY_SERVE_FREEZE_GC_ON_STARTUP`).

Then it raises the first threshold from CPython's 700 to 50,000 (`THRESHOLDS`). A young
collection comes after that many more container objects were made than freed, and scans
every young object still alive: in a busy actor, the state of the hundreds of tasks it has
in flight, again and again. A 30,000-task `submit` on the zero-latency simulator (2-core
machine, `gc.callbacks`, wall time) spent 43 s of its 136 CPU-seconds in the collector:
each worker 9 s (5,600 young collections), the relay 12 s (15 full ones over its growing
set of waiting calls), the scheduler 8 s; at 50,000 the collector took 10 s in all and the
batch ran at 530 tasks/s instead of 440-450 (490 with the scheduler's cycle below gone).
A later collection lets cyclic garbage live longer, so it is safe only while the pool's
per-task objects are freed by reference counting: the one cycle every task made (the
scheduler's job and its ticket) is broken when the job ends (`Job.close`), and what the
collector still finds is a few objects per second. (An earlier try at 10,000, with that
cycle still there, held the garbage of tens of thousands of ended tasks: the scheduler's
memory grew by 335 MB during a 100,000-task `submit`, against 72 MB.)
"""

from __future__ import annotations

import gc

#: The collector's thresholds in the pool's actors (CPython's: 700, 10, 10).
THRESHOLDS = (50_000, 10, 10)

_settled = False


def settle() -> bool:
    """Once per process: collects the young generations, freezes every object tracked, and
    sets `THRESHOLDS`. Returns whether this call did it (False when an earlier call had)."""
    global _settled
    if _settled:
        return False
    gc.collect(1)
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
    _settled = True
    return True
