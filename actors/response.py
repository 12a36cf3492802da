"""What the pool accepts from the provider: a Messages API response, checked before use.

The SDK builds its response objects without validating them, so a truncated body, a field
of the wrong type or an oversized payload would surface later as a `KeyError` deep in the
loop. Here it is one typed error at the boundary instead (`MalformedResponse`), which the
LLM client treats like a 5xx: retried, then the next model. Block types the pool does not
know are kept as they came (the API may add some) and skipped when reading text and tools.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, StringConstraints, ValidationError

from agentpool.errors import MalformedResponse

#: Largest response body read; a real one (64k output tokens at most) is far below it.
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
MAX_BLOCKS = 1024

_Id = Annotated[str, StringConstraints(strict=True, pattern=r"^[A-Za-z0-9_-]{1,256}$")]
_Count = Annotated[StrictInt, Field(ge=0, le=10**9)]


class _Block(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Annotated[str, StringConstraints(strict=True, min_length=1, max_length=64)]


class _Text(_Block):
    type: Literal["text"]
    text: StrictStr


class _ToolUse(_Block):
    type: Literal["tool_use"]
    id: _Id
    name: Annotated[str, StringConstraints(strict=True, pattern=r"^[A-Za-z0-9_-]{1,128}$")]
    input: dict[str, Any]


class _Usage(BaseModel):
    model_config = ConfigDict(extra="allow")
    input_tokens: _Count = 0
    output_tokens: _Count = 0
    cache_read_input_tokens: _Count | None = None
    cache_creation_input_tokens: _Count | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[dict[str, Any]] = Field(max_length=MAX_BLOCKS)
    stop_reason: Annotated[str, StringConstraints(strict=True, max_length=64)] | None = None
    usage: _Usage


_KNOWN: dict[str, type[_Block]] = {"text": _Text, "tool_use": _ToolUse}


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


def _not_json(constant: str) -> Any:
    # NaN and Infinity are not JSON: accepted here, they would fail the next request's encoding.
    raise ValueError(f"{constant} is not a JSON value")


def parse_message(raw: bytes, *, model: str) -> dict[str, Any]:
    """The response body as a checked dict (nulls dropped, as the SDK's `exclude_none` would).

    Raises:
        MalformedResponse: If the body is too large, not JSON, or not a usable message.
    """

    def bad(why: str) -> MalformedResponse:
        return MalformedResponse(why, status_code=None, error_type="MalformedResponse", retryable=True)

    if len(raw) > MAX_RESPONSE_BYTES:
        raise bad(f"the response is {len(raw)} bytes; at most {MAX_RESPONSE_BYTES} are read")
    try:
        body = json.loads(raw, parse_constant=_not_json)
    except (ValueError, RecursionError) as exc:
        raise bad(f"the response is not JSON ({type(exc).__name__})") from None
    if not isinstance(body, dict):
        raise bad(f"the response is a JSON {type(body).__name__}, not an object")
    try:
        _Message.model_validate(body)
        for block in body["content"]:
            _KNOWN.get(block.get("type"), _Block).model_validate(block)
    except (ValidationError, AttributeError) as exc:
        where = ""
        if isinstance(exc, ValidationError) and exc.errors():
            first = exc.errors()[0]
            where = f" at {'/'.join(str(p) for p in first['loc'])}: {first['msg']}"
        raise bad(f"the response is not a message{where}"[:500]) from None
    body.setdefault("model", model)
    try:
        return _without_none(body)
    except RecursionError:
        raise bad("the response nests too deeply") from None
