"""How the simulated provider behaves: latency, injected faults and server-side limits."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ModelLimitsConfig(BaseModel):
    """Server-side per-minute limits of one model, overriding the simulator-wide ones."""

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(default=None, ge=1)
    itpm: int | None = Field(default=None, ge=1)
    otpm: int | None = Field(default=None, ge=1)


class SimulatorConfig(BaseModel):
    """Knobs of the simulated Anthropic Messages API.

    Latency of one response is `latency_ms * lognormal(0, latency_sigma) +
    per_output_token_ms * output_tokens`: a long right tail like a real provider's. Limits
    are per model, enforced like Anthropic's: continuously replenished token buckets, 429
    with `retry-after` when one is empty.
    """

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    latency_ms: float = Field(default=20.0, ge=0, le=600_000)
    latency_sigma: float = Field(default=0.3, ge=0, le=3)
    per_output_token_ms: float = Field(default=0.0, ge=0, le=1_000)
    #: Probability per request of answering with that HTTP status (e.g. {529: 0.01}).
    fault_rates: dict[int, float] = Field(default_factory=dict)
    rpm: int | None = Field(default=None, ge=1)
    itpm: int | None = Field(default=None, ge=1)
    otpm: int | None = Field(default=None, ge=1)
    #: Limits for particular models (exact ids), in place of rpm/itpm/otpm above.
    model_limits: dict[str, ModelLimitsConfig] = Field(default_factory=dict)
    #: Largest request body accepted before answering 413, like the real API's 32 MB.
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    #: Message Batches: how long after its creation a batch's requests are done (each
    #: request's own `sim: delay` adds to it), and when an unfinished batch expires (the
    #: real API: within 24 hours, most in under one).
    batch_delay_ms: float = Field(default=1000.0, ge=0, le=86_400_000)
    batch_expiry_s: float = Field(default=86_400.0, gt=0, le=86_400)
