"""`CompletionBook`'s lookups by id: one MGET's worth per tenant, and the replies read back."""

from __future__ import annotations

from agentpool.cluster.completions import CompletionBook
from agentpool.cluster.keys import Keys
from agentpool.models import AgentResult


def test_lookups_group_the_awaited_ids_by_tenant_and_found_reads_their_replies_back() -> None:
    book = CompletionBook(Keys("ap"))
    for task_id, tenant in [("a1", "acme"), ("b1", "beta"), ("a2", "acme"), ("a3", "acme")]:
        book.watch(task_id, tenant)
    book.watch("a2", "acme")  # awaited twice: found twice
    book.forget("a3")
    lookups = book.lookups(["a1", "b1", "a2", "a3", "unknown"])
    assert [(g.task_ids, g.keys) for g in lookups] == [
        (["a1", "a2"], [Keys("ap").result("acme", "a1"), Keys("ap").result("acme", "a2")]),
        (["b1"], [Keys("ap").result("beta", "b1")]),
    ]
    a2 = AgentResult(task_id="a2", tenant="acme", status="succeeded", answer="x")
    found = book.found(lookups, [[None, a2.model_dump_json()], [None]])
    assert found == [a2, a2]
    assert sorted(book.awaited()) == ["a1", "b1"] and len(book) == 2
    assert book.lookups(["a2"]) == []  # found: no longer looked up
