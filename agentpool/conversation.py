"""A conversation's messages as the Messages API takes them: checks, the complete part of an
interrupted turn, compaction's cut and summary, and the prompt-cache mark (pure: no Ray, no
Redis, no provider).

A history is a list of `{"role", "content"}` messages. The API's rules it must keep: it
starts with a user message; every `tool_result` answers a `tool_use` of the assistant
message just before it, and every `tool_use` is answered by the user message just after it
(an unanswered one is allowed only as the very last message, where the loop is about to run
the tools). Two messages of the same role in a row are allowed (the API joins them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

#: Content block types a history may hold.
BLOCK_TYPES = frozenset({"text", "tool_use", "tool_result", "image", "document", "thinking", "redacted_thinking"})
#: The summary of compacted turns opens with this line (the model, and a reader, can tell).
SUMMARY_HEADER = "Summary of the earlier conversation (older turns were compacted):"


def blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A message's content as a list of blocks (a plain string is one text block)."""
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in content or [] if isinstance(b, dict)]


def _ids(message: dict[str, Any], kind: str, field: str) -> list[str]:
    return [str(b.get(field)) for b in blocks(message) if b.get("type") == kind]


def _has(message: dict[str, Any], kind: str) -> bool:
    """Whether the message holds a block of that type."""
    return any(b.get("type") == kind for b in blocks(message))


def history_problem(messages: Any, *, final: bool = True) -> str | None:
    """Why `messages` is not a valid history for the Messages API, or None. With `final`,
    a trailing assistant message may not wait for tool results (a stored history)."""
    if not isinstance(messages, list):
        return "messages must be a list"
    if not messages:
        return None
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"}:
            return f"messages[{i}] must be an object with only `role` and `content`"
        if message.get("role") not in ("user", "assistant"):
            return f"messages[{i}].role must be 'user' or 'assistant'"
        content = message.get("content")
        if isinstance(content, str):
            if not content:
                return f"messages[{i}].content is empty"
            continue
        if not isinstance(content, list) or not content:
            return f"messages[{i}].content must be a non-empty string or list of blocks"
        for j, block in enumerate(content):
            if not isinstance(block, dict) or block.get("type") not in BLOCK_TYPES:
                return f"messages[{i}].content[{j}] is not a content block ({', '.join(sorted(BLOCK_TYPES))})"
            if block["type"] == "tool_use" and (message["role"] != "assistant" or not block.get("id")):
                return f"messages[{i}].content[{j}]: a tool_use block belongs to an assistant message, with an id"
            if block["type"] == "tool_result" and (message["role"] != "user" or not block.get("tool_use_id")):
                return f"messages[{i}].content[{j}]: a tool_result block belongs to a user message, with a tool_use_id"
    if messages[0]["role"] != "user":
        return "messages[0] must be a user message"
    return pairing_problem(messages, final=final)


def pairing_problem(messages: list[dict[str, Any]], *, final: bool = False) -> str | None:
    """Why the tool_use and tool_result blocks of well-formed messages do not pair up as the
    Messages API requires (a result answers a use of the message just before it; a use is
    answered by the message just after it), or None. With `final`, a last assistant message
    may not ask for tools."""
    for i, message in enumerate(messages):
        asked = _ids(messages[i - 1], "tool_use", "id") if i and messages[i - 1]["role"] == "assistant" else []
        answered = _ids(message, "tool_result", "tool_use_id")
        orphans = [a for a in answered if a not in asked]
        if orphans:
            return f"messages[{i}] has a tool_result for {orphans[0]!r}, which the message before it did not ask for"
        if message["role"] == "assistant":
            uses = _ids(message, "tool_use", "id")
            last = i == len(messages) - 1
            if uses and last and final:
                return f"messages[{i}] asks for tools and no message gives their results"
            if uses and not last:
                missing = set(uses) - set(_ids(messages[i + 1], "tool_result", "tool_use_id"))
                if missing:
                    return f"messages[{i + 1}] lacks the tool_result for {sorted(missing)[0]!r}"
    return None


def complete_part(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` up to its last complete exchange: a last assistant message that asks for
    tools whose results never came is dropped (what an interrupted turn keeps)."""
    out = list(messages)
    if out and out[-1].get("role") == "assistant" and _has(out[-1], "tool_use"):
        out.pop()
    return out


def estimate_tokens(messages: list[dict[str, Any]], chars_per_token: float) -> int:
    """Input tokens the messages cost, estimated from their JSON's length."""
    if not messages:
        return 0
    return math.ceil(len(json.dumps(messages, separators=(",", ":"), default=str)) / chars_per_token)


def estimate_input_tokens(request: Mapping[str, Any], chars_per_token: float) -> int:
    """A deliberately generous count of a Messages API request's input tokens, before
    sending it: the JSON of its messages, system prompt and tools at `chars_per_token`."""
    parts = [request.get("messages"), request.get("system"), request.get("tools")]
    chars = sum(len(json.dumps(p, separators=(",", ":"), default=str)) for p in parts if p)
    return max(1, math.ceil(chars / chars_per_token))


def compaction_cut(messages: list[dict[str, Any]], keep_tokens: int, chars_per_token: float) -> int:
    """Where to cut a history for compaction: the index of the first message kept as it is
    (those before it are summarised), or 0 when nothing can be cut. The kept part starts at
    a user message that carries no tool result, so no tool_use is parted from its result;
    it is the longest such tail within `keep_tokens` (or the last one, if none fits)."""
    starts = [i for i, m in enumerate(messages) if i > 0 and m.get("role") == "user" and not _has(m, "tool_result")]
    if not starts:
        return 0
    # Each message serialised once: a tail's JSON is "[" + its messages joined by "," + "]".
    sizes = [len(json.dumps(m, separators=(",", ":"), default=str)) for m in messages]
    tail = sum(sizes[starts[0] :]) + len(sizes) - starts[0] + 1
    for at, start in enumerate(starts):
        if at:
            gone = starts[at - 1]
            tail -= sum(sizes[gone:start]) + start - gone
        if math.ceil(tail / chars_per_token) <= keep_tokens:
            return start
    return starts[-1]


def transcript(messages: list[dict[str, Any]], *, max_chars: int) -> str:
    """The messages as plain text for a summariser: who said what, which tools were called
    with what, and what they gave back (each long piece cut; the lines of a piece after its
    first are quoted, so nothing in them reads as the start of a new entry)."""
    lines: list[str] = []
    for message in messages:
        who = "User" if message["role"] == "user" else "Assistant"
        for block in blocks(message):
            kind = block.get("type")
            if kind == "text" and block.get("text"):
                lines.append(f"{who}: " + block["text"][:4000].replace("\n", "\n> "))
            elif kind == "tool_use":
                args = json.dumps(block.get("input"), separators=(",", ":"), default=str)[:1000]
                lines.append(f"Assistant called tool {block.get('name')} with {args}")
            elif kind == "tool_result":  # its content: a string, or text blocks
                text = " ".join(b.get("text", "") for b in blocks(block))
                status = "error" if block.get("is_error") else "result"
                lines.append(f"Tool {status}: " + str(text)[:1000].replace("\n", "\n> "))
    text = "\n".join(lines)
    return text if len(text) <= max_chars else "[...]\n" + text[-max_chars:]


def summary_request(older: list[dict[str, Any]], *, max_tokens: int, max_chars: int = 200_000) -> dict[str, Any]:
    """The Messages API request (less its model) that asks for a summary of `older`."""
    prompt = (
        "Summarise the conversation below for the assistant who will continue it. Keep every "
        "fact, decision, name, number, open question and tool result that later turns may need; "
        "leave out greetings and repetition. Write plain prose or bullet points, no preamble.\n\n"
        f"<conversation>\n{transcript(older, max_chars=max_chars)}\n</conversation>"
    )
    return {"max_tokens": max_tokens, "messages": [{"role": "user", "content": prompt}]}


def compacted(summary: str, kept: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history after compaction: one user message with the summary, then the kept turns."""
    text = f"{SUMMARY_HEADER}\n{summary.strip() or '(nothing to keep)'}"
    return [{"role": "user", "content": [{"type": "text", "text": text}]}, *kept]


def with_cache_mark(messages: list[dict[str, Any]], upto: int) -> list[dict[str, Any]]:
    """A copy of `messages` with a prompt-cache mark on the last block of `messages[upto - 1]`:
    the end of the stable prefix (the history a session's task starts from), so later turns
    and later tasks read it from the provider's cache. Unchanged when `upto` is 0."""
    if upto <= 0 or upto > len(messages):
        return messages
    marked = list(messages)
    content = [dict(b) for b in blocks(marked[upto - 1])]
    if not content:
        return messages
    content[-1]["cache_control"] = {"type": "ephemeral"}
    marked[upto - 1] = {"role": marked[upto - 1]["role"], "content": content}
    return marked
