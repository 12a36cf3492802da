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
