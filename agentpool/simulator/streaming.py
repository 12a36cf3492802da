"""The simulator's streaming answers: a message as the server-sent events the Messages API
streams (`message_start`, content blocks in small deltas, `message_delta`, `message_stop`)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from agentpool.simulator.script import Reply

#: Characters per `text_delta` when the simulator streams a text block.
_STREAM_CHUNK = 16


async def stream(
    request: web.Request, message: dict[str, Any], reply: Reply, headers: dict[str, str]
) -> web.StreamResponse:
    """Server-sent events in the order the Messages API streams them."""
    resp = web.StreamResponse(headers={**headers, "content-type": "text/event-stream"})
    await resp.prepare(request)

    async def send(event: str, data: dict[str, Any]) -> None:
        await resp.write(f"event: {event}\ndata: {json.dumps({'type': event, **data})}\n\n".encode())

    start = {**message, "content": [], "stop_reason": None}
    start["usage"] = {**message["usage"], "output_tokens": 1}
    await send("message_start", {"message": start})
    for index, block in enumerate(reply.content):
        if block["type"] == "text":
            await send("content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}})
            text = block["text"]  # in small pieces, as the API streams tokens
            for at in range(0, max(len(text), 1), _STREAM_CHUNK):
                delta = {"type": "text_delta", "text": text[at : at + _STREAM_CHUNK]}
                await send("content_block_delta", {"index": index, "delta": delta})
        else:
            empty = {**block, "input": {}}
            await send("content_block_start", {"index": index, "content_block": empty})
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
            await send("content_block_delta", {"index": index, "delta": delta})
        await send("content_block_stop", {"index": index})
    await send(
        "message_delta",
        {
            "delta": {"stop_reason": reply.stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": reply.output_tokens},
        },
    )
    await send("message_stop", {})
    await resp.write_eof()
    return resp
