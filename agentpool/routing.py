"""Cost-aware model routing (`AgentTask(model="auto")`): a ladder of models, each with the
capability tier it declares, and the rules that pick a task's first model and its way up.
Pure: prices come in as a function, so this sits beside the models it configures."""

from __future__ import annotations

from collections.abc import Callable, Collection

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agentpool.tenant_parts import ModelName

#: The model name that asks for routing.
AUTO = "auto"


class RoutedModel(BaseModel):
    """A model the router may pick, and the capability it declares (1 the least)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelName
    tier: int = Field(ge=1, le=10)


class Routing(BaseModel):
    """How `model="auto"` routes: the cheapest model of `ladder` whose tier is at least the
    task's (`AgentTask.tier`, 1 when unset) goes first; a task escalates to the next tier's
    cheapest model when its model fails (after its retries), when its answer does not match
    the task's output schema (`escalate_on_invalid_output`), or when the answer contains
    `escalate_when_answer_contains` (a phrase the system prompt tells weaker models to say
    when a task is beyond them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ladder: list[RoutedModel] = Field(
        default_factory=lambda: [
            RoutedModel(model="claude-haiku-4-5", tier=1),
            RoutedModel(model="claude-sonnet-4-5", tier=2),
            RoutedModel(model="claude-opus-4-5", tier=3),
        ],
        min_length=1,
        max_length=16,
    )
    escalate_on_invalid_output: bool = True
    escalate_when_answer_contains: str | None = Field(default=None, min_length=1, max_length=200)

    @model_validator(mode="after")
    def _distinct(self) -> Routing:
        names = [m.model for m in self.ladder]
        if len(set(names)) != len(names):
            raise ValueError(f"the routing ladder names a model twice: {names}")
        return self


def route(
    routing: Routing, need: int, allowed: Collection[str] | None, list_price: Callable[[str], float]
) -> list[str]:
    """A routed task's models, in the order it tries them: the cheapest allowed model whose
    tier is at least `need`, then one model per higher tier (the cheapest of each), up the
    ladder. Empty when no allowed model is capable enough."""
    fit = [m for m in routing.ladder if m.tier >= need and (allowed is None or m.model in allowed)]
    if not fit:
        return []
    first = min(fit, key=lambda m: (list_price(m.model), m.tier))
    chain = [first.model]
    for higher in sorted({m.tier for m in fit if m.tier > first.tier}):
        chain.append(min((m for m in fit if m.tier == higher), key=lambda m: list_price(m.model)).model)
    return chain
