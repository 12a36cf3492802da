"""`heap.settle`: once per process, young start-up garbage collected and the survivors frozen.

Run in a child interpreter: freezing is process-wide and would change the test process's
own collector for every test after this one.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

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
    thresholds = gc.get_threshold()

    assert heap.settle() is True
    assert dead() is None, "start-up garbage is collected before freezing"
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == thresholds, "CPython's thresholds stay"
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
