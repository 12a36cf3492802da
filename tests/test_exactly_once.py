"""The exactly-once record against a real Redis, as a hypothesis state machine: any
interleaving of admissions, runs' final writes, checkpoints and leases leaves each task with
at most one record and one stream entry, the first written, and nothing of a finished task
behind (no admission, backlog entry, checkpoint, lease, cancel flag or decision); the
backlog holds exactly the unfinished admissions, in the order they came, and a read of it
from any point returns what follows that point."""

from __future__ import annotations

import asyncio
import uuid

import redis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from agentpool.cluster.keys import Keys
from agentpool.cluster.store import ResultStore
from agentpool.models import AgentResult, AgentTask

TASKS = [f"task{i}" for i in range(4)]
STATUSES = ["succeeded", "failed", "cancelled", "rejected"]


def test_exactly_once_state_machine(redis_url: str) -> None:
    class Machine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.loop = asyncio.new_event_loop()
            self.keys = Keys(f"eo{uuid.uuid4().hex[:8]}")
            self.store = ResultStore(redis_url, keys=self.keys, pool="p")
            self.client = redis.Redis.from_url(redis_url, decode_responses=True)
            self.final: dict[str, str] = {}  # task -> status of the first record
            self.admitted: dict[str, int] = {}  # task -> arrival number
            self.leases: dict[str, str] = {}

        def _task(self, task_id: str) -> AgentTask:
            return AgentTask(task_id=task_id, tenant="acme", prompt="p")

        @rule(task_id=st.sampled_from(TASKS))
        def admit(self, task_id: str) -> None:
            admission = self.loop.run_until_complete(self.store.admit(self._task(task_id), "{}"))
            if task_id in self.final:
                assert admission.record is not None and admission.record.status == self.final[task_id]
            else:
                assert admission.record is None and admission.known == (task_id in self.admitted)
                if not admission.known:  # a new arrival number, after every earlier one
                    assert admission.arrival > max(self.admitted.values(), default=0)
                    self.admitted[task_id] = admission.arrival
                else:  # admitted before: its own arrival number again
                    assert admission.arrival == self.admitted[task_id]

        @rule(task_id=st.sampled_from(TASKS), status=st.sampled_from(STATUSES))
        def finish(self, task_id: str, status: str) -> None:
            result = AgentResult(task_id=task_id, tenant="acme", status=status)  # type: ignore[arg-type]
            stored, created = self.loop.run_until_complete(self.store.write_result(result))
            assert created == (task_id not in self.final)
            self.final.setdefault(task_id, status)
            assert stored.status == self.final[task_id]  # every run returns the first record
            self.admitted.pop(task_id, None)
            self.leases.pop(task_id, None)

        @rule(task_id=st.sampled_from(TASKS))
        def checkpoint(self, task_id: str) -> None:
            if task_id not in self.final:  # a run discards its checkpoints before its final write
                self.loop.run_until_complete(self.store.save_checkpoint("acme", task_id, "{}", 60))

        @rule(task_id=st.sampled_from(TASKS), run=st.sampled_from(["r1", "r2"]))
        def begin(self, task_id: str, run: str) -> None:
            begun = self.loop.run_until_complete(self.store.begin("acme", task_id, run, 60_000))
            if task_id in self.final:
                assert begun.result is not None and begun.result.status == self.final[task_id]
            expected = task_id not in self.leases
            assert begun.leased == expected
            self.leases.setdefault(task_id, run)
            assert begun.holder == self.leases[task_id]

        @rule(task_id=st.sampled_from(TASKS), run=st.sampled_from(["r1", "r2"]))
        def release(self, task_id: str, run: str) -> None:
            freed = self.loop.run_until_complete(self.store.release_lease("acme", task_id, run))
            assert freed == (self.leases.get(task_id) == run)
            if freed:
                del self.leases[task_id]

        @invariant()
        def one_record_each(self) -> None:
            entries = self.client.xrange(self.keys.results("acme"))
            ids = [f["task_id"] for _, f in entries]
            assert sorted(ids) == sorted(self.final)  # one entry per finished task, no more
            for task_id in self.final:
                assert self.client.exists(self.keys.result("acme", task_id))
                assert not self.client.hexists(self.keys.admitted("acme", "p"), task_id)

        @rule(after=st.integers(min_value=0, max_value=12), limit=st.integers(min_value=1, max_value=5))
        def pull(self, after: int, limit: int) -> None:
            [read] = self.loop.run_until_complete(self.store.pull([("acme", "standard", str(after), limit)]))
            later = sorted((n, t) for t, n in self.admitted.items() if n > after)
            assert [(t, n) for t, n, _ in read.entries] == [(t, n) for n, t in later[:limit]]
            assert read.left == len(later) - len(read.entries)

        @invariant()
        def admissions_match(self) -> None:
            assert set(self.client.hkeys(self.keys.admitted("acme", "p"))) == set(self.admitted)
            in_order = sorted(self.admitted, key=self.admitted.__getitem__)
            assert self.client.zrange(self.keys.backlog("acme", "p", "standard"), 0, -1) == in_order

        def teardown(self) -> None:
            self.loop.run_until_complete(self.store.close())
            self.loop.close()
            for key in self.client.scan_iter(f"{self.keys.prefix}:*"):
                self.client.delete(key)
            self.client.close()

    Machine.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
    Machine.TestCase().runTest()
