"""What a pool spent over a period, summed from its tenants' days (`cluster.spend`): by
tenant, model and lane, and what the response cache and the batch lane saved against list
prices. Pure."""

from __future__ import annotations

from collections import defaultdict
from typing import Any


def summarise(raw: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """The report of `read_spend`'s output: `total_usd`, `list_usd` (the same calls at
    real-time list prices), `saved` (`batch_lane_usd`, `response_cache_usd`), `calls`,
    `cache` (`hits`, `misses`, `hit_rate`), and `by_tenant`, `by_model`, `by_lane` (each
    name -> `spend_usd`, `list_usd`, `calls`)."""
    groups: dict[str, dict[str, dict[str, float]]] = {
        g: defaultdict(lambda: defaultdict(float)) for g in ("by_tenant", "by_model", "by_lane")
    }
    hits = misses = cache_saved = 0.0
    for tenant, days in raw.items():
        for fields in days.values():
            hits += fields.get("cache_hits", 0.0)
            misses += fields.get("cache_misses", 0.0)
            cache_saved += fields.get("cache_saved_usd", 0.0)
            for name, value in fields.items():
                kind, _, rest = name.partition("|")
                lane, _, model = rest.partition("|")
                if kind not in ("spend", "list", "calls") or not model:
                    continue
                column = {"spend": "spend_usd", "list": "list_usd", "calls": "calls"}[kind]
                for group, key in (("by_tenant", tenant), ("by_model", model), ("by_lane", lane)):
                    groups[group][key][column] += value
    lanes = groups["by_lane"]
    total = sum(row["spend_usd"] for row in lanes.values())
    listed = sum(row["list_usd"] for row in lanes.values())
    lookups = hits + misses
    return {
        "total_usd": round(total, 10),
        "list_usd": round(listed, 10),
        "saved": {"batch_lane_usd": round(listed - total, 10), "response_cache_usd": round(cache_saved, 10)},
        "calls": int(sum(row["calls"] for row in lanes.values())),
        "cache": {"hits": int(hits), "misses": int(misses), "hit_rate": round(hits / lookups, 4) if lookups else None},
        **{
            group: {
                key: {
                    "spend_usd": round(row["spend_usd"], 10),
                    "list_usd": round(row["list_usd"], 10),
                    "calls": int(row["calls"]),
                }
                for key, row in sorted(rows.items(), key=lambda kv: -kv[1]["spend_usd"])
            }
            for group, rows in groups.items()
        },
    }
