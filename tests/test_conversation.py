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
            results = [
                {"type": "tool_result", "tool_use_id": i, "content": f"r{i}"} for i in draw(st.permutations(ids))
            ]
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
def test_the_complete_part_of_an_interrupted_turn_is_a_valid_history(messages: list[dict[str, Any]], stop: int) -> None:
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

    @precondition(lambda self: any(self.present.values()))
    @rule(data=st.data())
    def arrive_again(self, data: st.DataObject) -> None:
        """A job already in line that arrives again (a repeated call) keeps its place."""
        key = data.draw(st.sampled_from(sorted(k for k, v in self.present.items() if v)))
        line = self.turns.line(key)
        item = data.draw(st.sampled_from(line))
        arrival = self.turns.arrive(key, item, data.draw(st.sampled_from(list(OnBusy))))
        assert arrival.holder is line[0]
        assert arrival.turn == (Turn.RUN if item is line[0] else Turn.WAIT)
        assert self.turns.line(key) == line

    @rule(key=st.sampled_from(["a", "b"]))
    def strangers_have_no_place(self, key: str) -> None:
        stranger = Item(-1, key, OnBusy.ENQUEUE)
        assert self.turns.place(key, stranger) is None and self.turns.place("nobody", stranger) is None
        assert self.turns.leave(key, stranger) is None and self.turns.leave("nobody", stranger) is None

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
        assert len(self.turns) == sum(1 for items in self.present.values() if items)


TestTurns = TurnsMachine.TestCase


# --- exact values (what mutation testing asks of each branch) ---------------------------------

from agentpool.conversation import blocks, pairing_problem, transcript  # noqa: E402

USE = {"type": "tool_use", "id": "toolu_1", "name": "calc", "input": {"n": 1}}
RESULT = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "2"}


def test_blocks_reads_a_string_as_one_text_block_and_skips_what_is_not_a_block() -> None:
    assert blocks({"role": "user", "content": "hi"}) == [{"type": "text", "text": "hi"}]
    assert blocks({"role": "user", "content": [{"type": "text", "text": "a"}, "junk", 3]}) == [
        {"type": "text", "text": "a"}
    ]
    assert blocks({"role": "user"}) == []


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ("not a list", "messages must be a list"),
        ([{"role": "user", "content": "x"}, 1], "messages[1] must be an object with only `role` and `content`"),
        (
            [{"role": "user", "content": "x", "name": "y"}],
            "messages[0] must be an object with only `role` and `content`",
        ),
        ([{"role": "system", "content": "x"}], "messages[0].role must be 'user' or 'assistant'"),
        ([{"role": "user", "content": ""}], "messages[0].content is empty"),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": []}],
            "messages[1].content must be a non-empty string or list of blocks",
        ),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": 5}],
            "messages[1].content must be a non-empty string or list of blocks",
        ),
        (
            [{"role": "user", "content": [{"type": "video"}]}],
            "messages[0].content[0] is not a content block (document, image, redacted_thinking, text, thinking, "
            "tool_result, tool_use)",
        ),
        (
            [{"role": "user", "content": [USE]}],
            "messages[0].content[0]: a tool_use block belongs to an assistant message, with an id",
        ),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": [{**USE, "id": ""}]}],
            "messages[1].content[0]: a tool_use block belongs to an assistant message, with an id",
        ),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": [RESULT]}],
            "messages[1].content[0]: a tool_result block belongs to a user message, with a tool_use_id",
        ),
        (
            [{"role": "user", "content": [{**RESULT, "tool_use_id": ""}]}],
            "messages[0].content[0]: a tool_result block belongs to a user message, with a tool_use_id",
        ),
        ([{"role": "assistant", "content": "x"}], "messages[0] must be a user message"),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": [USE]}],
            "messages[1] asks for tools and no message gives their results",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": [USE]},
                {"role": "user", "content": "y"},
            ],
            "messages[2] lacks the tool_result for 'toolu_1'",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": [USE]},
                {"role": "user", "content": [{**RESULT, "tool_use_id": "toolu_2"}]},
            ],
            "messages[2] lacks the tool_result for 'toolu_1'",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": "y"},
                {"role": "user", "content": [RESULT]},
            ],
            "messages[2] has a tool_result for 'toolu_1', which the message before it did not ask for",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": "y"},
                {"role": "assistant", "content": []},
            ],
            "messages[2].content must be a non-empty string or list of blocks",
        ),  # checked past a string message
        ([], None),
        ([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}], None),  # the API joins them
    ],
)
def test_history_problems_are_named_exactly(messages: Any, problem: str | None) -> None:
    assert history_problem(messages) == problem


def test_pairing_allows_a_last_use_unless_final_and_never_pairs_across_the_start() -> None:
    asking = [{"role": "user", "content": "x"}, {"role": "assistant", "content": [USE]}]
    assert pairing_problem(asking) is None  # the loop is about to run the tools
    assert pairing_problem(asking, final=True) == "messages[1] asks for tools and no message gives their results"
    assert history_problem(asking, final=False) is None
    wrapped = [{"role": "user", "content": [RESULT]}, {"role": "assistant", "content": [USE]}]
    assert pairing_problem(wrapped) == (
        "messages[0] has a tool_result for 'toolu_1', which the message before it did not ask for"
    )
    two = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": [USE, {**USE, "id": "toolu_0"}]},
        {"role": "user", "content": [RESULT]},
    ]
    assert pairing_problem(two) == "messages[2] lacks the tool_result for 'toolu_0'"


def test_complete_part_drops_only_a_last_unanswered_use() -> None:
    prompt = {"role": "user", "content": "x"}
    said = {"role": "assistant", "content": "y"}
    asking = {"role": "assistant", "content": [USE]}
    assert complete_part([prompt, said]) == [prompt, said]
    assert complete_part([prompt, said, prompt, asking]) == [prompt, said, prompt]
    assert complete_part([prompt, asking, {"role": "user", "content": [RESULT]}]) == [
        prompt,
        asking,
        {"role": "user", "content": [RESULT]},
    ]
    assert complete_part([]) == []


def test_estimates_and_the_cut_at_exact_bounds() -> None:
    assert estimate_tokens([], 3.0) == 0
    one = [{"role": "user", "content": "abcdef"}]  # 36 characters of JSON
    assert estimate_tokens(one, 5.0) == 8 and estimate_tokens(one, 4.0) == 9 and estimate_tokens(one, 6.0) == 6
    turn = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
    later = [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    history = turn + later
    exact = estimate_tokens(later, 1.0)
    assert compaction_cut(history, exact, 1.0) == 2  # a tail of exactly the budget is kept
    three = [*history, {"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"}]
    assert compaction_cut(three, estimate_tokens(three[2:], 1.0), 1.0) == 2
    assert compaction_cut(three, estimate_tokens(three[2:], 1.0) - 1, 1.0) == 4
    assert compaction_cut(history, exact - 1, 1.0) == 2  # none fits: the last turn
    assert compaction_cut(history, 10_000, 1.0) == 2  # the whole history fits: still cut before the last turn
    # The second message may start the kept part; one that carries tool results may not.
    assert compaction_cut([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], 0, 1.0) == 1
    results = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": [USE]},
        {"role": "user", "content": [RESULT]},
        {"role": "assistant", "content": "y"},
    ]
    assert compaction_cut(results, 0, 1.0) == 0


def test_compacted_and_the_summary_request_are_exact() -> None:
    kept = [{"role": "user", "content": "q"}]
    assert compacted("  the gist \n", kept) == [
        {"role": "user", "content": [{"type": "text", "text": f"{SUMMARY_HEADER}\nthe gist"}]},
        *kept,
    ]
    assert compacted("  ", [])[0]["content"][0]["text"] == f"{SUMMARY_HEADER}\n(nothing to keep)"
    request = summary_request([{"role": "user", "content": "hi"}], max_tokens=77)
    assert request == {
        "max_tokens": 77,
        "messages": [
            {
                "role": "user",
                "content": (
                    "Summarise the conversation below for the assistant who will continue it. Keep every "
                    "fact, decision, name, number, open question and tool result that later turns may need; "
                    "leave out greetings and repetition. Write plain prose or bullet points, no preamble.\n\n"
                    "<conversation>\nUser: hi\n</conversation>"
                ),
            }
        ],
    }
    big = [{"role": "user", "content": "w" * 4000}] * 51  # 204,000 characters of transcript
    content = summary_request(big, max_tokens=1)["messages"][0]["content"]
    assert (
        content.split("<conversation>\n")[1]
        == "[...]\n" + transcript(big, max_chars=10**6)[-200_000:] + "\n</conversation>"
    )
    assert summary_request([{"role": "user", "content": "x" * 50}], max_tokens=1, max_chars=10)["messages"][0][
        "content"
    ].endswith("<conversation>\n[...]\n" + "x" * 10 + "\n</conversation>")


def test_a_transcript_says_who_said_what_and_cuts_long_pieces() -> None:
    messages = [
        {"role": "user", "content": "line one\nsim: tool x {}"},
        {"role": "assistant", "content": [{"type": "text", "text": "let me check"}, USE]},
        {
            "role": "user",
            "content": [
                RESULT,
                {
                    **RESULT,
                    "tool_use_id": "t2",
                    "is_error": True,
                    "content": [
                        {"type": "text", "text": "bad\nnews"},
                        {"type": "image"},
                        {"type": "text", "text": "twice"},
                    ],
                },
            ],
        },
        {"role": "assistant", "content": [{**USE, "input": {"a": 1, "b": b"raw"}}]},
        {"role": "assistant", "content": [{"type": "text", "text": ""}, {"type": "thinking", "thinking": "hm"}]},
    ]
    assert transcript(messages, max_chars=10_000) == (
        "User: line one\n> sim: tool x {}\n"
        "Assistant: let me check\n"
        'Assistant called tool calc with {"n":1}\n'
        "Tool result: 2\n"
        "Tool error: bad\n> news  twice\n"
        """Assistant called tool calc with {"a":1,"b":"b'raw'"}"""
    )
    whole = transcript(messages, max_chars=10_000)
    assert transcript(messages, max_chars=len(whole)) == whole  # exactly at the bound: not cut
    long = [
        {"role": "user", "content": "y" * 5000},
        {"role": "assistant", "content": [{**USE, "input": {"k": "z" * 2000}}]},
        {"role": "user", "content": [{**RESULT, "content": "r" * 2000}]},
    ]
    lines = transcript(long, max_chars=100_000).split("\n")
    assert lines[0] == "User: " + "y" * 4000
    assert lines[1] == "Assistant called tool calc with " + ('{"k":"' + "z" * 2000)[:1000]
    assert lines[2] == "Tool result: " + "r" * 1000
    assert transcript(long, max_chars=30) == "[...]\n" + "\n".join(lines)[-30:]


def test_the_cache_mark_is_exact_and_turns_a_string_into_a_block() -> None:
    history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]
    mark = {"type": "ephemeral"}
    assert with_cache_mark(history, 2) == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": [{"type": "text", "text": "a", "cache_control": mark}]},
    ]
    assert with_cache_mark(history, 1) == [
        {"role": "user", "content": [{"type": "text", "text": "q", "cache_control": mark}]},
        history[1],
    ]
    assert with_cache_mark(history, 3) is history and with_cache_mark(history, 0) is history
    assert with_cache_mark([{"role": "user"}], 1) == [{"role": "user"}]
