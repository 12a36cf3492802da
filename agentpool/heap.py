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

The thresholds stay CPython's: with the first at 10,000 rather than 700, full collections
came 14 times less often, and the scheduler held the cyclic garbage of tens of thousands
of ended tasks meanwhile (its resident memory grew by 335 MB during a 100,000-task `submit`
against 72 MB; `bench scale`).
"""

from __future__ import annotations

import gc

_settled = False


def settle() -> bool:
    """Once per process: collects the young generations, then freezes every object tracked.
    Returns whether this call did it (False when an earlier call already had)."""
    global _settled
    if _settled:
        return False
    gc.collect(1)
    gc.freeze()
    _settled = True
    return True
