"""The Redis key layout (a contract: see DESIGN.md). Braces are Redis Cluster hash tags, so
all of one tenant's keys share a slot and an ACL pattern `~agentpool:{acme}:*` covers them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "agentpool"

    def _tenant(self, tenant: str) -> str:
        return f"{self.prefix}:{{{tenant}}}"

    def result(self, tenant: str, task_id: str) -> str:
        return f"{self._tenant(tenant)}:result:{task_id}"

    def results(self, tenant: str) -> str:
        return f"{self._tenant(tenant)}:results"

    def events(self, tenant: str) -> str:
        return f"{self._tenant(tenant)}:events"

    def checkpoint(self, tenant: str, task_id: str) -> str:
        return f"{self._tenant(tenant)}:checkpoint:{task_id}"

    def usage(self, tenant: str, day: str) -> str:
        return f"{self._tenant(tenant)}:usage:{day}"

    def tool_call(self, tenant: str, task_id: str, tool_use_id: str) -> str:
        """A side-effecting tool call's record: started, then its outcome."""
        return f"{self._tenant(tenant)}:toolcall:{task_id}:{tool_use_id}"

    def tool_cache(self, tenant: str, tool: str, digest: str) -> str:
        """A cacheable tool's result for one set of arguments."""
        return f"{self._tenant(tenant)}:toolcache:{tool}:{digest}"
