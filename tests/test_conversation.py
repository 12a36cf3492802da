"""The pure parts of sessions: a history's checks, the complete part of an interrupted turn,
compaction's cut and summary, the prompt-cache mark, and one turn per session at a time."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agentpool import AgentTask, InvalidTaskInput
from agentpool.conversation import (
    SUMMARY_HEADER,
    compacted,
    compaction_cut,
    complete_part,
    estimate_tokens,
    history_problem,
    summary_request,
    with_cache_mark,
)
from agentpool.scheduler.turns import SessionTurns, Turn
from agentpool.vocabulary import OnBusy


@st.composite
def conversations(draw: Any, *, max_turns: int = 6) -> list[dict[str, Any]]:
    """Valid histories: turns of a user prompt, tool rounds (a use, then its results), and
    an answer; text either as a string or as blocks."""
    messages: list[dict[str, Any]] = []
    for turn in range(draw(st.integers(1, max_turns))):
        text = draw(st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=30))
        content: Any = text if draw(st.booleans()) else [{"type": "text", "text": text}]
        messages.append({"role": "user", "content": content})
        for round_ in range(draw(st.integers(0, 2))):
            ids = [f"toolu_{turn}_{round_}_{i}" for i in range(draw(st.integers(1, 3)))]
            uses = [{"type": "tool_use", "id": i, "name": "calc", "input": {"n": turn}} for i in ids]
            messages.append({"role": "assistant", "content": uses})
            results = [{"type": "tool_result", "tool_use_id": i, "content": f"r{i}"} for i in draw(st.permutations(ids))]
            messages.append({"role": "user", "content": results})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": f"answer {turn}"}]})
    return messages


@given(conversations())
def test_a_valid_history_passes_and_a_broken_pairing_is_named(messages: list[dict[str, Any]]) -> None:
    assert history_problem(messages) is None
    uses = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m["content"][0]["type"] == "tool_use"]
    if uses:
        orphaned = messages[: uses[0]] + messages[uses[0] + 1 :]  # results with no use before them
        assert "tool_result" in (history_problem(orphaned) or "")
        unanswered = messages[: uses[0] + 1] + messages[uses[0] + 2 :]  # a use with no results after it
        assert history_problem(unanswered) is not None


@given(conversations(), st.integers(0, 40))
def test_the_complete_part_of_an_interrupted_turn_is_a_valid_history(
    messages: list[dict[str, Any]], stop: int
) -> None:
    """Cut anywhere a run can stop (after a message of its own), what it keeps is valid."""
    cut = messages[: max(1, min(stop, len(messages)))]
    kept = complete_part(cut)
    assert history_problem(kept) is None
    assert kept == cut[: len(kept)] and len(cut) - len(kept) <= 1


@settings(max_examples=200)
@given(conversations(max_turns=8), st.integers(0, 400), st.text(max_size=50))
def test_compaction_keeps_a_valid_conversation(messages: list[dict[str, Any]], keep: int, summary: str) -> None:
    cut = compaction_cut(messages, keep, 4.0)
    prompts = [i for i, m in enumerate(messages) if m["role"] == "user" and isinstance(m["content"], str | list)]
    prompts = [i for i in prompts if i > 0 and not _has_results(messages[i])]
    if cut == 0:
        assert not prompts  # nothing to cut only when there is one turn
        return
    assert cut in prompts
    older, kept = messages[:cut], messages[cut:]
    assert older and kept[0]["role"] == "user"
    after = compacted(summary, kept)
    assert history_problem(after) is None
    assert after[1:] == kept and after[0]["content"][0]["text"].startswith(SUMMARY_HEADER)
    assert summary_request(older, max_tokens=100)["messages"][0]["role"] == "user"
    # The longest tail within the budget, or the last turn when none fits.
    if estimate_tokens(kept, 4.0) > keep:
        assert cut == prompts[-1]
    else:
        assert all(estimate_tokens(messages[i:], 4.0) > keep for i in prompts if i < cut)


def _has_results(message: dict[str, Any]) -> bool:
    content = message["content"]
    return isinstance(content, list) and any(b.get("type") == "tool_result" for b in content)


@given(conversations(), st.integers(0, 30))
def test_the_cache_mark_goes_on_the_end_of_the_history_only(messages: list[dict[str, Any]], upto: int) -> None:
    before = copy.deepcopy(messages)
    marked = with_cache_mark(messages, upto)
    assert messages == before  # the stored history is never changed
    marks = [
        (i, j)
        for i, m in enumerate(marked)
        for j, b in enumerate(m["content"] if isinstance(m["content"], list) else [])
        if "cache_control" in b
    ]
    if 0 < upto <= len(messages):
        assert marks == [(upto - 1, len(marked[upto - 1]["content"]) - 1)]
    else:
        assert marks == []


def test_a_task_checks_the_history_it_brings() -> None:
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert AgentTask(tenant="acme", prompt="and?", messages=good).messages == good
    orphan = [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x", "content": "1"}]}]
    with pytest.raises(InvalidTaskInput, match="tool_result"):
        AgentTask(tenant="acme", prompt="and?", messages=orphan)
    with pytest.raises(InvalidTaskInput, match="not both"):
        AgentTask(tenant="acme", prompt="and?", messages=good, session_id="s1")
    with pytest.raises(InvalidTaskInput, match="session_id"):
        AgentTask(tenant="acme", prompt="and?", session_id="no spaces allowed")
    with pytest.raises(InvalidTaskInput, match="on_busy"):
        AgentTask(tenant="acme", prompt="and?", session_id="s1", on_busy="wait")  # type: ignore[arg-type]


# --- one turn at a time per session ----------------------------------------------------------


@dataclass(eq=False)
class Item:
    n: int
    key: str
    on_busy: OnBusy


class TurnsMachine(RuleBasedStateMachine):
    """Whatever arrives and leaves: one holder per session; behind it, the interrupting
    tasks in the order they came, then the enqueued ones in the order they came."""

    def __init__(self) -> None:
        super().__init__()
        self.turns: SessionTurns[str, Item] = SessionTurns()
        self.present: dict[str, list[Item]] = {}
        self.count = 0

    @rule(key=st.sampled_from(["a", "b"]), on_busy=st.sampled_from(list(OnBusy)))
    def arrive(self, key: str, on_busy: OnBusy) -> None:
        self.count += 1
        item = Item(self.count, key, on_busy)
        holder = self.turns.holder(key)
        arrival = self.turns.arrive(key, item, on_busy)
        assert arrival.holder is holder
        if holder is None:
            assert arrival.turn == Turn.RUN
        elif on_busy == OnBusy.REJECT:
            assert arrival.turn == Turn.REJECT
            return
        else:
            assert arrival.turn == (Turn.PREEMPT if on_busy.preempts else Turn.WAIT)
        self.present.setdefault(key, []).append(item)

    @precondition(lambda self: any(self.present.values()))
    @rule(data=st.data(), head=st.booleans())
    def leave(self, data: st.DataObject, head: bool) -> None:
        key = data.draw(st.sampled_from(sorted(k for k, v in self.present.items() if v)))
        line = self.turns.line(key)
        item = line[0] if head else data.draw(st.sampled_from(line))
        following = self.turns.leave(key, item)
        self.present[key].remove(item)
        was_head = item is line[0]
        assert following is (line[1] if was_head and len(line) > 1 else None)
        assert self.turns.leave(key, item) is None  # gone: leaving again changes nothing

    @invariant()
    def lines_keep_their_order(self) -> None:
        for key, items in self.present.items():
            line = self.turns.line(key)
            assert sorted(i.n for i in line) == sorted(i.n for i in items)
            if not line:
                assert self.turns.holder(key) is None
                continue
            rest = line[1:]
            # Interrupting ones that arrived while another held the turn go first, by arrival.
            preempting = [i for i in rest if i.on_busy.preempts]
            enqueued = [i for i in rest if not i.on_busy.preempts]
            assert rest == sorted(preempting, key=lambda i: i.n) + sorted(enqueued, key=lambda i: i.n)
            assert [self.turns.place(key, i) for i in line] == list(range(len(line)))


TestTurns = TurnsMachine.TestCase
