"""The response cache's rules, without storage: which LLM calls may be answered from it,
which responses may be kept in it, and the key a call is found under (`cluster.responses`
stores them per tenant, with a TTL)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from agentpool.vocabulary import CacheMode

#: Responses kept: complete answers and tool requests. Never a truncated one (`max_tokens`),
#: a refusal, or a pause, whose repeat would be wrong or worth asking again.
_KEPT_STOPS = frozenset({"end_turn", "tool_use", "stop_sequence"})


def cache_mode(task_mode: CacheMode | None, tenant_mode: CacheMode) -> CacheMode:
    """The task's own choice, else its tenant's."""
    return task_mode if task_mode is not None else tenant_mode


def may_use(mode: CacheMode, request: Mapping[str, Any]) -> bool:
    """Whether a call of `request` may be answered from (and kept in) the cache. The API
    takes no sampling parameters (every answer is a sample), so the tenant's or the task's
    opting in decides; a request that names one anyway (through a proxy that still takes
    them) is cached only at `temperature` 0."""
    if mode is CacheMode.OFF:
        return False
    return bool(request.get("temperature", 0) == 0)


def keepable(message: Mapping[str, Any]) -> bool:
    """Whether a provider's response may be kept: complete, with content."""
    return message.get("stop_reason") in _KEPT_STOPS and bool(message.get("content"))


def cache_key(request: Mapping[str, Any], models: list[str]) -> str:
    """The digest a call is kept under: its model chain and every field of its request
    (system prompt, messages, tools, `max_tokens`, temperature, ...), canonical JSON, so the
    same call finds the same entry whatever order its fields came in. Cache marks
    (`cache_control`) are part of it: they are part of what the provider is asked."""
    canonical = json.dumps([models, dict(request)], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()
