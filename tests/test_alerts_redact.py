"""Pure logic of the observability path: the alert monitor's windows and edges, and the
redaction of secrets and personal data (property-tested)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from agentpool.config import AlertConfig
from agentpool.redact import redact, redact_text
from agentpool.scheduler.alerts import MAX_WINDOW, Alert, AlertMonitor, p95
from agentpool.vocabulary import TaskStatus
from tests.reference import luhn_check_digit

STATUSES = list(TaskStatus)
#: The oracle's own reading of the rules: errors for the error rate, and tasks left out.
ERROR_STATUSES = {"failed", "timed_out"}
NOT_RUN = {"rejected", "cancelled"}
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
    assert all(monitor.observe("t", "x", TaskStatus.FAILED, 1e6, 1e6, float(i)) == [] for i in range(100))


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


# --- exact values -------------------------------------------------------------------------------


def test_p95_is_the_nearest_rank() -> None:
    assert p95([3.0]) == 3.0
    assert p95([float(v) for v in range(1, 21)]) == 19.0  # rank ceil(0.95 * 20) = 19
    assert p95([float(v) for v in range(1, 101)]) == 95.0
    assert p95([5.0, 1.0]) == 5.0  # rank ceil(1.9) = 2


def test_a_run_over_its_cost_alerts_on_its_own() -> None:
    monitor = AlertMonitor(AlertConfig(run_cost_usd=0.5))
    assert monitor.observe("acme", "t1", TaskStatus.SUCCEEDED, 1.0, 0.5, 0.0) == []  # at the threshold: not over
    assert monitor.observe("acme", "t2", TaskStatus.SUCCEEDED, 1.0, 0.75, 0.0) == [
        Alert("acme", "run_cost", "firing", 0.75, 0.5, "t2")
    ]
    assert monitor.firing() == {}  # a per-run alert holds no state


def test_windowed_checks_fire_and_resolve_with_their_values() -> None:
    monitor = AlertMonitor(AlertConfig(error_rate=0.5, p95_latency_s=2.0, window_s=10.0, min_tasks=2))
    assert monitor.observe("acme", "t1", TaskStatus.FAILED, 3.0, 0.0, 0.0) == []  # below min_tasks
    assert monitor.observe("acme", "t2", TaskStatus.SUCCEEDED, 1.0, 0.0, 1.0) == [
        Alert("acme", "p95_latency", "firing", 3.0, 2.0)  # 1 error of 2 is at, not over, 0.5
    ]
    assert monitor.observe("acme", "t3", TaskStatus.TIMED_OUT, 1.0, 0.0, 2.0) == [
        Alert("acme", "error_rate", "firing", round(2 / 3, 6), 0.5)
    ]
    assert monitor.firing() == {"acme": ["error_rate", "p95_latency"]}
    # At 10.0 the outcome of 0.0 is exactly window_s old and leaves the window.
    assert monitor.observe("acme", "t4", TaskStatus.SUCCEEDED, 1.0, 0.0, 10.0) == [
        Alert("acme", "error_rate", "resolved", round(1 / 3, 6), 0.5),
        Alert("acme", "p95_latency", "resolved", 1.0, 2.0),
    ]
    assert monitor.observe("acme", "t5", TaskStatus.REJECTED, 9.0, 0.0, 10.0) == []  # never ran: not counted
    assert monitor.firing() == {}


def test_only_the_checks_configured_are_kept() -> None:
    latency_only = AlertMonitor(AlertConfig(p95_latency_s=1.0, min_tasks=1))
    assert latency_only.observe("a", "t", TaskStatus.FAILED, 5.0, 0.0, 0.0) == [
        Alert("a", "p95_latency", "firing", 5.0, 1.0)
    ]
    errors_only = AlertMonitor(AlertConfig(error_rate=0.1, min_tasks=1))
    assert errors_only.observe("a", "t", TaskStatus.FAILED, 5.0, 0.0, 0.0) == [
        Alert("a", "error_rate", "firing", 1.0, 0.1)
    ]
    neither = AlertMonitor(AlertConfig(run_cost_usd=1.0))
    assert neither.observe("a", "t", TaskStatus.FAILED, 5.0, 0.0, 0.0) == [] and neither._windows == {}


def test_a_window_keeps_at_most_its_limit_of_outcomes() -> None:
    monitor = AlertMonitor(AlertConfig(error_rate=0.5, min_tasks=1, window_s=86_400))
    assert monitor.observe("a", "t0", TaskStatus.FAILED, 1.0, 0.0, 0.0)[0].state == "firing"
    for i in range(MAX_WINDOW - 1):
        monitor.observe("a", f"t{i + 1}", TaskStatus.SUCCEEDED, 1.0, 0.0, 0.0)
    window = monitor._windows["a"]
    assert len(window.outcomes) == MAX_WINDOW and window.errors == 1  # full: the failure still in it
    monitor.observe("a", "last", TaskStatus.SUCCEEDED, 1.0, 0.0, 0.0)
    assert len(window.outcomes) == MAX_WINDOW and window.errors == 0  # one more pushes it out
