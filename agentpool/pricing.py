"""Prices per model, in USD per million tokens, and the cost of one response's `usage`.

Models are matched by the longest known prefix, so dated ids (`claude-sonnet-4-5-20250929`)
price like their family. Cache writes cost 1.25x input and cache reads 0.1x input, as
Anthropic bills 5-minute ephemeral caching.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from agentpool.models import Usage


class ModelPrice(BaseModel):
    """USD per million tokens of each kind."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cache_write: float | None = Field(default=None, ge=0)
    cache_read: float | None = Field(default=None, ge=0)
    #: What the Message Batches API charges of these prices (Anthropic: half).
    batch_factor: float = Field(default=0.5, gt=0, le=1)

    @property
    def write_rate(self) -> float:
        return self.cache_write if self.cache_write is not None else self.input * 1.25

    @property
    def read_rate(self) -> float:
        return self.cache_read if self.cache_read is not None else self.input * 0.1

    def cost_usd(self, usage: Usage, *, batch: bool = False) -> float:
        total = (
            usage.input_tokens * self.input
            + usage.output_tokens * self.output
            + usage.cache_creation_input_tokens * self.write_rate
            + usage.cache_read_input_tokens * self.read_rate
        )
        return round(total * (self.batch_factor if batch else 1.0) / 1_000_000, 10)

    def worst_cost_usd(self, input_tokens: int, output_tokens: int) -> float:
        """The most a call of at most these tokens can cost: every input token at the
        dearest input rate (plain, cache write or cache read), every output token billed."""
        dearest = max(self.input, self.write_rate, self.read_rate)
        return round((input_tokens * dearest + output_tokens * self.output) / 1_000_000, 10)


DEFAULT_PRICES: dict[str, ModelPrice] = {
    "claude-opus-4-5": ModelPrice(input=5.0, output=25.0),
    "claude-opus-4": ModelPrice(input=15.0, output=75.0),
    "claude-sonnet-4": ModelPrice(input=3.0, output=15.0),
    "claude-3-7-sonnet": ModelPrice(input=3.0, output=15.0),
    "claude-haiku-4-5": ModelPrice(input=1.0, output=5.0),
    "claude-3-5-haiku": ModelPrice(input=0.8, output=4.0),
    "claude-3-haiku": ModelPrice(input=0.25, output=1.25),
}


class PriceTable:
    """Looks up a model's price by longest matching prefix; unknown models cost nothing."""

    def __init__(self, overrides: dict[str, ModelPrice] | None = None) -> None:
        self._prices = {**DEFAULT_PRICES, **(overrides or {})}
        self._by_length = sorted(self._prices, key=len, reverse=True)

    def price(self, model: str) -> ModelPrice | None:
        for prefix in self._by_length:
            if model.startswith(prefix):
                return self._prices[prefix]
        return None

    def priced(self, model: str, usage: Usage, *, batch: bool = False) -> Usage:
        """Returns `usage` with `cost_usd` filled in for `model` (at batch prices with `batch`)."""
        price = self.price(model)
        cost = price.cost_usd(usage, batch=batch) if price else 0.0
        return usage.model_copy(update={"cost_usd": cost})

    def worst_cost_usd(self, models: list[str], input_tokens: int, output_tokens: int) -> float:
        """The most one call of at most these tokens can cost on any model of a fallback
        chain (the call may end on any of them)."""
        return max(
            (price.worst_cost_usd(input_tokens, output_tokens) for m in models if (price := self.price(m))),
            default=0.0,
        )
