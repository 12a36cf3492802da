"""Small cases for the scheduler core's tests: a configuration, tasks, results, and a core
queued into the way the shell does it."""

from __future__ import annotations

from agentpool.config import AdmissionConfig, PoolConfig
from agentpool.models import AgentResult, AgentTask, RateLimit, TenantPolicy, Timings, Usage
from agentpool.scheduler.core import (
    Drop,
    Reject,
    SchedulerCore,
    Start,
    Ticket,
)
from agentpool.scheduler.dispatch import LeastLoaded

MODEL = "claude-sonnet-4-5"
LIMITED = "claude-haiku-4-5"
#: A prompt of 40 characters and 20 output tokens: an estimate of 10 + 2 x 20 = 50 VTC units.
PROMPT = "x" * 40


def config(**kw: object) -> PoolConfig:
    base: dict[str, object] = {
        "tenants": {
            "a": TenantPolicy(weight=1.0),
            "b": TenantPolicy(weight=2.0, max_concurrency=1),
            "c": TenantPolicy(weight=1.0),
        },
        "limits": {LIMITED: RateLimit(rpm=60)},
        "admission": AdmissionConfig(target_wait_s=0.5, interval_s=1.0, escalate_intervals=2),
    }
    base.update(kw)
    return PoolConfig.model_validate(base)


def task(tenant: str = "a", n: int = 0, **kw: object) -> AgentTask:
    fields: dict[str, object] = {"tenant": tenant, "prompt": PROMPT, "max_tokens": 20, "model": MODEL}
    fields.update({"fallback_models": [], **kw})
    return AgentTask(task_id=f"{tenant}-{n}", **fields)  # type: ignore[arg-type]


def result(t: AgentTask, *, input_tokens: int = 10, output_tokens: int = 20, calls: int = 1) -> AgentResult:
    return AgentResult(
        task_id=t.task_id,
        tenant=t.tenant,
        status="succeeded",
        usage=Usage(input_tokens=input_tokens, output_tokens=output_tokens),
        iterations=calls,
        llm_attempts=calls,
        timings=Timings(),
    )


def core_of(cfg: PoolConfig | None = None, workers: int = 1, slots: int = 1) -> SchedulerCore[str]:
    return SchedulerCore(cfg or config(), LeastLoaded(workers, slots))


def arrive(core: SchedulerCore[str], t: AgentTask, now: float = 0.0) -> Ticket[str] | Reject:
    """Admits and queues a task, as the shell does; the ticket, or the rejection."""
    ticket = core.ticket(t.task_id, t)
    verdict = core.admit(ticket, now)
    if isinstance(verdict, Reject):
        return verdict
    core.enqueue(ticket, now)
    return ticket


def queued(core: SchedulerCore[str], t: AgentTask, now: float = 0.0) -> Ticket[str]:
    ticket = arrive(core, t, now)
    assert isinstance(ticket, Ticket)
    return ticket


def starts(decisions: list[Start[str] | Drop[str]]) -> list[tuple[str, int]]:
    return [(d.ticket.item, d.worker) for d in decisions if isinstance(d, Start)]
