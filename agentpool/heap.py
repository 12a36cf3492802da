"""The garbage collector of a pool's long-lived processes: what they hold from the start is
set aside once, so collections scan only what came after.

An actor process holds a few hundred thousand objects from its start (Ray's core worker,
the modules it imported, the SDK's classes and schemas) that live as long as it does.
CPython's collector scans them all again at every full collection, and an actor busy with
hundreds of tasks at once triggers one every second or so: on a 2-core machine with the
simulator answering at once, a worker spent about half of its CPU in the collector, most
of it in full collections over its start-up objects (`bench overhead`, measured with
`gc.callbacks`).

`settle()`, called once at the end of an actor's constructor, collects what start-up left,
then freezes the survivors (`gc.freeze()`: moved to a permanent generation that collections
skip; reference counting still frees them) and raises the first generation's threshold so
the objects of tasks in flight are not scanned again and again while they wait. Ray Serve
does the same for its replicas (`RAY_SERVE_FREEZE_GC_ON_STARTUP`).
"""

from __future__ import annotations

import gc

#: Allocations (less deallocations) of tracked objects between young collections. CPython's
#: default, 700, is a few tasks' worth in a worker running hundreds: each young collection
#: then promotes the objects of tasks still in flight, which the older generations scan again.
YOUNG_THRESHOLD = 10_000

_settled = False


def settle() -> bool:
    """Once per process: collects, freezes what survives and raises the young threshold.
    Returns whether this call did it (False when an earlier call already had)."""
    global _settled
    if _settled:
        return False
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, YOUNG_THRESHOLD), middle, old)
    _settled = True
    return True
