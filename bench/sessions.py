"""`sessions`: what a long conversation costs per turn, kept by the pool (`session_id`) or by
the caller (`messages`), with and without compaction, against stateless turns.

One conversation per mode, turn after turn, against the same simulator in the same run:

- `stateless`: every turn a task with no history (the baseline: what a turn costs alone);
- `caller`: the caller sends the whole history with each turn (`AgentTask(messages=...)`);
- `session`: the pool keeps it (`session_id`), compaction off;
- `compacted`: the pool keeps it, compaction on (`compact_above_tokens`).

Latency is the caller's wall time per turn; the late turns (the last `measured` of them,
with the longest histories) are compared. Cost and input tokens come from each record's
usage; "uncached" prices every input token at the base rate, as a request without the
history's cache mark would pay.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from agentpool import AgentPool, AgentResult, AgentTask, PoolConfig, SessionPolicy, TenantPolicy
from agentpool.pricing import PriceTable
from agentpool.simulator import SimulatorConfig, SimulatorServer
from bench.report import latency_cdf, percentile, write

#: Words of each prompt's text (twice in the prompt, once in the answer).
_WORDS = 90
_MODES = ("stateless", "caller", "session", "compacted")


def _prompt(turn: int, salt: str) -> str:
    """A turn's prompt; `salt` makes each conversation's text its own (no round reads the
    simulator's prompt cache that another wrote)."""
    text = " ".join(f"{salt}w{turn}x{i}" for i in range(_WORDS))
    return f"sim: answer reply {turn}: {text}\nQuestion {turn}: {text}"


def _turn_chars() -> int:
    """About how many characters of history one turn adds (its prompt and its answer)."""
    prompt = _prompt(0, "r0x123456")
    return len(prompt) + len(prompt.splitlines()[0].removeprefix("sim: answer "))


def _conversation(pool: AgentPool, mode: str, turns: int, tag: str) -> tuple[list[tuple[float, AgentResult]], int]:
    """The turns' wall times and records, and how many compactions the session had."""
    out: list[tuple[float, AgentResult]] = []
    history: list[dict[str, Any]] = []
    tenant = "brief" if mode == "compacted" else "acme"
    for turn in range(turns):
        options: dict[str, Any] = {}
        if mode in ("session", "compacted"):
            options["session_id"] = f"{tag}-{mode}"
        elif mode == "caller" and history:
            options["messages"] = list(history)
        task = AgentTask(tenant=tenant, prompt=_prompt(turn, tag), **options)
        started = time.monotonic()
        (result,) = pool.run([task])
        out.append(((time.monotonic() - started) * 1000, result))
        assert result.status == "succeeded", result.error
        history += [{"role": "user", "content": task.prompt}, {"role": "assistant", "content": str(result.answer)}]
    session = pool.sessions.export(tenant, f"{tag}-{mode}") if mode in ("session", "compacted") else None
    return out, int(session["compactions"]) if session else 0


def _uncached_cost(prices: PriceTable, result: AgentResult) -> float:
    u = result.usage
    price = prices.price(result.model or "claude-sonnet-4-5")
    assert price is not None
    inputs = u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens
    return (inputs * price.input + u.output_tokens * price.output) / 1_000_000


def run(out: Path, quick: bool) -> dict[str, Any]:
    turns, measured = 120, 30
    rounds = 1 if quick else 3
    sim_config = SimulatorConfig(latency_ms=20, latency_sigma=0, seed=11)
    compacting = SessionPolicy(compact_above_tokens=12_000, keep_recent_tokens=4_000)
    runs: dict[str, list[list[tuple[float, AgentResult]]]] = {m: [] for m in _MODES}
    compactions: list[int] = []
    with SimulatorServer(sim_config) as sim:
        config = PoolConfig(
            name="bench-sessions",
            anthropic_base_url=sim.url,
            anthropic_api_key="bench",
            num_workers=1,
            worker_concurrency=8,
            # `acme` never compacts (the default would, above 50,000 tokens): the plain session.
            tenants={
                "brief": TenantPolicy(sessions=compacting),
                "acme": TenantPolicy(sessions=SessionPolicy(compact_above_tokens=None)),
            },
        )
        with AgentPool.start(config) as pool:
            _conversation(pool, "stateless", 10, "warmup")
            for r in range(rounds):
                for mode in _MODES:  # interleaved: the machine's noise falls on every mode alike
                    conversation, compacted = _conversation(pool, mode, turns, f"r{r}x{time.time_ns() % 10**6}")
                    runs[mode].append(conversation)
                    if mode == "compacted":
                        compactions.append(compacted)
            prices = PriceTable(config.prices)
    late = {m: [ms for conv in runs[m] for ms, _ in conv[-measured:]] for m in _MODES}
    late_results = {m: [res for conv in runs[m] for _, res in conv[-measured:]] for m in _MODES}
    p50 = {m: percentile(late[m], 0.5) for m in _MODES}

    def mean(values: list[float]) -> float:
        return sum(values) / max(1, len(values))

    def input_tokens(m: str) -> float:
        return mean(
            [
                float(r.usage.input_tokens + r.usage.cache_read_input_tokens + r.usage.cache_creation_input_tokens)
                for r in late_results[m]
            ]
        )

    cost = {m: mean([r.usage.cost_usd for r in late_results[m]]) for m in _MODES}
    uncached = mean([_uncached_cost(prices, r) for r in late_results["session"]])
    cache_read = mean([float(r.usage.cache_read_input_tokens) for r in late_results["session"]])
    figures = {
        "turns": turns,
        "measured_late_turns": measured * rounds,
        "late_history_tokens_session": round(input_tokens("session")),
        "late_history_tokens_compacted": round(input_tokens("compacted")),
        "stateless_turn_p50_ms": round(p50["stateless"], 2),
        "caller_turn_p50_ms": round(p50["caller"], 2),
        "session_turn_p50_ms": round(p50["session"], 2),
        "compacted_turn_p50_ms": round(p50["compacted"], 2),
        "session_over_stateless_latency": round(p50["session"] / p50["stateless"], 3),
        "session_over_caller_latency": round(p50["session"] / p50["caller"], 3),
        "compacted_over_session_latency": round(p50["compacted"] / p50["session"], 3),
        "session_cache_read_share": round(cache_read / max(1.0, input_tokens("session")), 3),
        "session_cost_over_uncached": round(cost["session"] / uncached, 3),
        "compacted_cost_over_session": round(cost["compacted"] / cost["session"], 3),
        "compacted_tokens_over_session": round(input_tokens("compacted") / input_tokens("session"), 3),
        "compactions_per_conversation": round(mean([float(c) for c in compactions]), 2),
    }
    out.mkdir(parents=True, exist_ok=True)
    plot = latency_cdf(out, "sessions", {m: late[m] for m in _MODES}, title="late turns: wall time per turn")
    notes = (
        f"One conversation of {turns} turns per mode and round ({rounds} rounds, modes interleaved), "
        f"each turn adding about {_turn_chars()} characters; the last {measured} turns of each are compared. "
        "The simulator's latency does not grow with input, so latency ratios show what the pool "
        "itself adds for a long history (loading it, checkpointing it, storing it); token and cost "
        "ratios show what the prompt cache and compaction save."
    )
    write(
        out,
        "sessions",
        figures=figures,
        notes=notes,
        plots=[plot],
        config={
            "turns": turns,
            "measured": measured,
            "rounds": rounds,
            "quick": quick,
            "simulator": sim_config.model_dump(),
            "compaction": compacting.model_dump(),
        },
    )
    return figures
