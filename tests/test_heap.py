"""`heap.settle`: once per process, young start-up garbage collected, the survivors frozen
and the collector's thresholds raised; and the scheduler's jobs, which the raised thresholds
rely on, leave no cycle behind when they end (`Job.close`).

`settle` runs in a child interpreter: freezing is process-wide and would change the test
process's own collector for every test after this one.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import time
import weakref

from agentpool import AgentTask
from agentpool.scheduler.decisions import Ticket
from agentpool.scheduler.jobs import Job

_CHILD = textwrap.dedent(
    """
    import gc, weakref
    from agentpool import heap

    class Node:
        pass

    gc.disable()  # only settle() may collect what follows
    garbage = Node()
    garbage.me = garbage  # a cycle: only the collector frees it
    dead = weakref.ref(garbage)
    del garbage
    kept = Node()
    kept.me = kept
    assert dead() is not None

    assert heap.settle() is True
    assert dead() is None, "start-up garbage is collected before freezing"
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == heap.THRESHOLDS == (50_000, 10, 10)
    assert not any(o is kept for o in gc.get_objects()), "what survived is frozen, out of every generation"

    frozen = gc.get_freeze_count()
    assert heap.settle() is False
    assert gc.get_freeze_count() == frozen, "a second call freezes nothing more"
    print("ok")
    """
)


def test_settle_collects_then_freezes_once() -> None:
    done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


async def test_a_closed_job_is_freed_by_reference_counting() -> None:
    """A job and its ticket hold each other until the job ends; closed, the two go as soon
    as nothing else holds the job, with the collector off. (Async: a job's futures need a
    running event loop.)"""
    task = AgentTask(tenant="t", prompt="hello")
    enabled = gc.isenabled()
    gc.disable()
    try:
        open_job = Job(task, "", time.time())
        open_job.ticket = Ticket(open_job, task, None)
        still_open = weakref.ref(open_job)
        del open_job
        assert still_open() is not None, "an open job and its ticket make a cycle"

        job = Job(task, "", time.time())
        job.ticket = Ticket(job, task, None)
        job.close()
        closed = weakref.ref(job)
        del job
        assert closed() is None
        Job(task, "", time.time()).close()  # a job that never had a ticket closes too
    finally:
        if enabled:
            gc.enable()
        gc.collect()
