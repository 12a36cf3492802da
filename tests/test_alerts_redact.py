"""Pure logic of the observability path: the alert monitor's windows and edges, and the
redaction of secrets and personal data (property-tested)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from agentpool.config import AlertConfig
from agentpool.redact import redact, redact_text
from scheduler.alerts import ERROR_STATUSES, NOT_RUN, AlertMonitor, p95
from tests.reference import luhn_check_digit

STATUSES = ["succeeded", "failed", "timed_out", "rejected", "cancelled", "iteration_cap"]
outcome = st.tuples(
    st.sampled_from(STATUSES),
    st.floats(min_value=0, max_value=100, allow_nan=False),  # latency
    st.floats(min_value=0, max_value=1, allow_nan=False),  # cost
    st.floats(min_value=0, max_value=50, allow_nan=False),  # time step
)


@settings(max_examples=200, deadline=None)
@given(st.lists(outcome, max_size=120), st.integers(min_value=1, max_value=10))
def test_alerts_alternate_and_match_a_recount_of_the_window(outcomes: list, min_tasks: int) -> None:
    config = AlertConfig(run_cost_usd=0.5, error_rate=0.3, p95_latency_s=20, window_s=60, min_tasks=min_tasks)
    monitor = AlertMonitor(config)
    now, window, firing = 0.0, [], {"error_rate": False, "p95_latency": False}
    for status, latency, cost, step in outcomes:
        now += step
        raised = monitor.observe("t", "task", status, latency, cost, now)
        # A run's cost alerts every time it is over, and only then.
        assert any(a.kind == "run_cost" for a in raised) == (cost > 0.5)
        if status not in NOT_RUN:
            window.append((now, status in ERROR_STATUSES, latency))
        window = [o for o in window if o[0] > now - 60]
        for alert in (a for a in raised if a.kind != "run_cost"):
            # Edges alternate: firing only when not firing, resolved only when firing.
            assert firing[alert.kind] == (alert.state == "resolved")
            firing[alert.kind] = alert.state == "firing"
        if len(window) >= min_tasks and status not in NOT_RUN:
            # After each counted outcome the state equals a recount of the window.
            assert firing["error_rate"] == (sum(o[1] for o in window) / len(window) > 0.3)
            assert firing["p95_latency"] == (p95([o[2] for o in window]) > 20)
    assert monitor.firing().get("t", []) == sorted(k for k, v in firing.items() if v)


def test_no_thresholds_no_alerts() -> None:
    monitor = AlertMonitor(AlertConfig())
    assert not monitor.enabled
    assert all(monitor.observe("t", "x", "failed", 1e6, 1e6, float(i)) == [] for i in range(100))


def luhn_complete(prefix: str) -> str:
    """`prefix` plus the check digit that makes it pass Luhn (from the reference, not the module)."""
    return prefix + luhn_check_digit(prefix)


words = st.text(alphabet=st.characters(whitelist_categories=("Lu", "Ll"), max_codepoint=0x7F), max_size=30)


@given(st.text(alphabet="0123456789", min_size=12, max_size=18), words, words, st.sampled_from([" ", "-", ""]))
def test_card_numbers_never_survive(body: str, before: str, after: str, sep: str) -> None:
    card = luhn_complete(body)
    written = sep.join(card[i : i + 4] for i in range(0, len(card), 4))
    text = f"{before} {written} {after}"
    assert card not in redact_text(text).replace(" ", "").replace("-", "")


@given(st.emails(), words)
def test_emails_never_survive(email: str, around: str) -> None:
    assert email not in redact_text(f"{around} <{email}> {around}")


@given(st.from_regex(r"sk-ant-api03-[A-Za-z0-9_-]{20,40}", fullmatch=True), words)
def test_keys_never_survive_in_text_or_under_any_key(key: str, field: str) -> None:
    value = {"nested": [{"note": f"use {key} please"}], "api_key": key, (field or "x"): key}
    assert key not in json.dumps(redact(value)) and key not in json.dumps(redact(value, pii=False))


@given(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=20),
    st.sampled_from(["password", "api_key", "Authorization", "X-Access-Key", "refresh_token", "session-id"]),
)
def test_a_value_under_a_credential_key_is_withheld_though_no_pattern_would_catch_it(secret: str, key: str) -> None:
    assert redact_text(secret) == secret  # nothing in the text itself gives it away
    assert redact({"outer": [{key: secret}]}) == {"outer": [{key: "[REDACTED]"}]}


@given(
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=40), lambda c: st.lists(c, max_size=4))
)
def test_redaction_is_idempotent(value: object) -> None:
    once = redact(value)
    assert redact(once) == once


@given(words)
def test_plain_words_are_left_alone(text: str) -> None:
    assert redact_text(text) == text
