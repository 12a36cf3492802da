"""What the simulated model says: explicit `sim:` directives, else a deterministic heuristic.

Pure functions of the request body, so tests (and users reading a surprising transcript) can
predict every turn. Directives are lines in the most recent user message that has text (the
task's prompt, or a follow-up such as a schema correction):

    sim: tool <name> <json args>     call that tool; the n-th directive on the n-th turn
    sim: answer <text>               final answer, verbatim (the k-th one on the k-th final turn)
    sim: fail <status> [xN|always] [model=<id>]
                                     fail the first N attempts (default 1) with that status
    sim: delay <ms>                  add this much latency to each response
    sim: output_tokens <n>           report n output tokens per response (capped at max_tokens)
    sim: raw <base64>                answer 200 with exactly these bytes as the body (hostile
                                     and malformed responses, for the fuzz tests)
    sim: bloat <n>                   answer with a text block of n characters (huge payloads)
    sim: unable <model>[,<model>...]  models whose id starts with one of these are not up to
                                     the task: they answer only `UNABLE` (model routing tests)
    sim: fail_share <fraction> <status>  fail that share of tasks, always, with that status: a
                                     task is picked by a hash of its first prompt (so the
                                     same tasks fail on every attempt and every run)
    sim: judge <regex>               a scripted judge: answers the JSON verdict
                                     {"pass", "score", "reason"}, passing when the regex is
                                     found in the prompt (the answer under judgement)

Directives may also stand in the system prompt, so that an agent's version (its spec) can
decide how the simulated model behaves: the prompt's directives of a kind replace the
system prompt's of the same kind.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from agentpool.protocol import SCHEMA_MARKER

_DIRECTIVE = re.compile(r"^\s*sim:\s*(\w+)\s*(.*?)\s*$", re.MULTILINE)
_ARITHMETIC = re.compile(r"[-+(]*\d[\d.\s]*(?:[-+*/%^][\s(]*[-+]?\d[\d.\s)]*)+")


@dataclass(frozen=True)
class FailSpec:
    status: int
    times: int | None  # None: always
    model: str | None


#: What a model named by `sim: unable` answers.
UNABLE = "I cannot do this task."


@dataclass
class Directives:
    tools: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    fails: list[FailSpec] = field(default_factory=list)
    delay_ms: float = 0.0
    output_tokens: int | None = None
    raw: bytes | None = None
    bloat: int = 0
    unable: list[str] = field(default_factory=list)
    #: (share of tasks, status) for `sim: fail_share`.
    fail_share: tuple[float, int] | None = None
    judge: re.Pattern[str] | None = None

    @property
    def empty(self) -> bool:
        return not (self.tools or self.answers)


@dataclass(frozen=True)
class Reply:
    """The assistant turn to send: content blocks and why the turn stopped."""

    content: list[dict[str, Any]]
    stop_reason: str
    output_tokens: int


class DirectiveError(ValueError):
    """Raised when a `sim:` line cannot be parsed; the server answers 400 with the reason."""


def estimate_tokens(value: Any) -> int:
    """About four characters per token, like the usual rule of thumb for English and JSON."""
    if value is None:
        return 0
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return max(1, math.ceil(len(text) / 4))


def parse_directives(text: str) -> Directives:
    out = Directives()
    for match in _DIRECTIVE.finditer(text):
        verb, rest = match.group(1).lower(), match.group(2)
        if verb == "tool":
            name, _, raw = rest.partition(" ")
            try:
                args = json.loads(raw) if raw.strip() else {}
            except json.JSONDecodeError as exc:
                raise DirectiveError(f"sim: tool {name}: arguments are not JSON: {exc}") from exc
            if not isinstance(args, dict):
                raise DirectiveError(f"sim: tool {name}: arguments must be a JSON object")
            out.tools.append((name, args))
        elif verb == "answer":
            out.answers.append(rest)
        elif verb == "fail":
            out.fails.append(_parse_fail(rest))
        elif verb == "delay":
            out.delay_ms = float(rest)
        elif verb == "output_tokens":
            out.output_tokens = int(rest)
        elif verb == "raw":
            try:
                out.raw = base64.b64decode(rest, validate=True)
            except ValueError as exc:
                raise DirectiveError(f"sim: raw needs base64: {exc}") from exc
        elif verb == "unable":
            out.unable += [p.strip() for p in rest.split(",") if p.strip()]
        elif verb == "bloat":
            out.bloat = min(int(rest), 64 * 1024 * 1024)
        elif verb == "fail_share":
            out.fail_share = _parse_share(rest)
        elif verb == "judge":
            try:
                out.judge = re.compile(rest)
            except re.error as exc:
                raise DirectiveError(f"sim: judge needs a regular expression: {exc}") from exc
        else:
            raise DirectiveError(f"unknown simulator directive 'sim: {verb}'")
    return out


def _parse_share(rest: str) -> tuple[float, int]:
    parts = rest.split()
    try:
        share, status = float(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise DirectiveError("sim: fail_share needs a fraction and a status, e.g. 'sim: fail_share 0.2 500'") from None
    if not 0 <= share <= 1:
        raise DirectiveError("sim: fail_share: the fraction is between 0 and 1")
    return share, status


def merged_directives(system: str, prompt: str) -> Directives:
    """The directives of a request: the system prompt's, each kind replaced by the prompt's
    when the prompt has that kind."""
    base, own = parse_directives(system), parse_directives(prompt)
    defaults = Directives()
    for name in base.__dataclass_fields__:
        mine = getattr(own, name)
        if mine != getattr(defaults, name):
            setattr(base, name, mine)
    return base


def first_prompt(body: dict[str, Any]) -> str:
    """The text of the conversation's first user message (the task's prompt)."""
    for msg in body.get("messages", []):
        if msg.get("role") == "user":
            text = _text_of(msg.get("content", ""))
            if text.strip():
                return text
    return ""


def in_share(text: str, share: float) -> bool:
    """Whether a task whose prompt is `text` falls in the first `share` of all prompts (a
    stable hash, the same in every process and run)."""
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def _parse_fail(rest: str) -> FailSpec:
    parts = rest.split()
    if not parts or not parts[0].isdigit():
        raise DirectiveError("sim: fail needs an HTTP status, e.g. 'sim: fail 529'")
    times: int | None = 1
    model = None
    for part in parts[1:]:
        if part == "always":
            times = None
        elif part.startswith("x") and part[1:].isdigit():
            times = int(part[1:])
        elif part.startswith("model="):
            model = part.removeprefix("model=")
        else:
            raise DirectiveError(f"sim: fail: cannot read {part!r}")
    return FailSpec(status=int(parts[0]), times=times, model=model)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")


def system_text(body: dict[str, Any]) -> str:
    return _text_of(body.get("system") or "")


def conversation_state(messages: list[dict[str, Any]]) -> tuple[str, int, str | None]:
    """Returns (text of the last user message with text, assistant turns since it, last tool
    result's text or None)."""
    anchor, anchor_text = 0, ""
    for i in range(len(messages) - 1, -1, -1):
        msg = messages[i]
        if msg.get("role") == "user" and _text_of(msg.get("content", "")).strip():
            anchor, anchor_text = i, _text_of(msg["content"])
            break
    turns = sum(1 for m in messages[anchor + 1 :] if m.get("role") == "assistant")
    last_result = None
    for msg in reversed(messages):
        content = msg.get("content")
        if msg.get("role") != "user" or not isinstance(content, list):
            continue
        results = [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]
        if results:
            inner = results[-1].get("content", "")
            last_result = _text_of(inner) if not isinstance(inner, str) else inner
            break
    return anchor_text, turns, last_result


def fail_key(body: dict[str, Any]) -> str:
    """Identifies "the same attempt" across retries: same prompt, same turn."""
    anchor, turns, _ = conversation_state(body.get("messages", []))
    return f"{turns}:{anchor}"


def plan_reply(body: dict[str, Any], directives: Directives, id_seed: str) -> Reply:
    """Decides the assistant turn for a validated request body."""
    messages = body["messages"]
    offered = {str(t.get("name")): t for t in body.get("tools") or [] if isinstance(t, dict)}
    anchor, turns, last_result = conversation_state(messages)
    schema = _requested_schema(system_text(body))

    if any(str(body["model"]).startswith(prefix) for prefix in directives.unable):
        return _text_reply(UNABLE, body, directives)
    if directives.judge is not None:
        found = directives.judge.search(anchor) is not None
        verdict = {"pass": found, "score": 1.0 if found else 0.0, "reason": "scripted judge"}
        return _text_reply(json.dumps(verdict), body, directives)
    if directives.tools and turns < len(directives.tools):
        name, args = directives.tools[turns]
        return _tool_reply(name, args, f"toolu_{id_seed}", directives)
    if directives.answers:
        index = min(max(0, turns - len(directives.tools)), len(directives.answers) - 1)
        return _text_reply(directives.answers[index], body, directives)
    if not directives.tools and turns == 0 and offered:
        call = _heuristic_call(anchor, offered)
        if call is not None:
            return _tool_reply(call[0], call[1], f"toolu_{id_seed}", directives)
    if schema is not None:
        return _text_reply(json.dumps(_instance(schema, last_result)), body, directives)
    if last_result is not None:
        return _text_reply(f"The answer is {last_result}.", body, directives)
    return _text_reply(f"Simulated answer to: {anchor.strip()[:200]}", body, directives)


def _tool_reply(name: str, args: dict[str, Any], tool_id: str, d: Directives) -> Reply:
    block = {"type": "tool_use", "id": tool_id, "name": name, "input": args}
    tokens = d.output_tokens or estimate_tokens(block) + 8
    return Reply(content=[block], stop_reason="tool_use", output_tokens=tokens)


def _text_reply(text: str, body: dict[str, Any], d: Directives) -> Reply:
    max_tokens = int(body["max_tokens"])
    tokens = d.output_tokens or estimate_tokens(text)
    if tokens > max_tokens:
        # Cut the text at the budget, as a real model stops mid-sentence at max_tokens.
        text = text[: max_tokens * 4]
        return Reply([{"type": "text", "text": text}], "max_tokens", max_tokens)
    return Reply([{"type": "text", "text": text}], "end_turn", tokens)


def _heuristic_call(prompt: str, offered: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    if "calculator" in offered:
        match = _ARITHMETIC.search(prompt)
        if match:
            return "calculator", {"expression": match.group(0).strip()}
    if "web_search" in offered:
        return "web_search", {"query": prompt.strip()[:200]}
    for name, spec in offered.items():
        args = _instance(spec.get("input_schema") or {"type": "object"}, prompt.strip()[:100])
        if isinstance(args, dict):
            return name, args
    return None


def _requested_schema(system: str) -> dict[str, Any] | None:
    at = system.find(SCHEMA_MARKER)
    if at < 0:
        return None
    start = system.find("{", at)
    if start < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(system[start:])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _instance(schema: dict[str, Any], text: str | None, depth: int = 0) -> Any:
    """A small, deterministic value that satisfies common JSON Schemas."""
    if depth > 8:
        return None
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return _instance(schema[key][0], text, depth + 1)
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties", {})
        return {k: _instance(v, text, depth + 1) for k, v in props.items()}
    if kind == "array":
        items = schema.get("items", {"type": "string"})
        return [_instance(items, text, depth + 1)] * max(1, int(schema.get("minItems", 1)))
    if kind == "string":
        return text if text is not None else "simulated"
    if kind == "integer":
        return int(schema.get("minimum", 0))
    if kind == "number":
        return _number_from(text, schema)
    if kind == "boolean":
        return True
    return None


def _number_from(text: str | None, schema: dict[str, Any]) -> float:
    if text is not None:
        try:
            return float(text)
        except ValueError:
            pass
    return float(schema.get("minimum", 0))
