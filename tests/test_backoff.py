"""Which provider errors are retried, moved past or final, and how long a retry waits:
`actors/backoff.py` against exceptions built as the anthropic SDK builds them (no HTTP)."""

from __future__ import annotations

import random

import anthropic
import httpx2
import pytest

from agentpool.actors.backoff import Backoff, Decision, classify, retry_after_s
from agentpool.config import RetryPolicy
from agentpool.errors import MalformedResponse

URL = "http://sim.local:8123/v1/messages?beta=true"


def status_error(status: int, headers: dict[str, str] | None = None, *, message: str = "it went wrong") -> Exception:
    request = httpx2.Request("POST", URL)
    response = httpx2.Response(status, headers=headers or {}, request=request)
    body = {"type": "error", "error": {"type": f"e{status}", "message": message}}
    return anthropic.APIStatusError(f"Error code: {status}", response=response, body=body)


@pytest.mark.parametrize(
    ("status", "headers", "action"),
    [
        (400, {}, "fail"),
        (401, {}, "fail"),
        (403, {}, "fail"),
        (413, {}, "fail"),
        (422, {}, "fail"),
        (400, {"x-should-retry": "true"}, "fail"),  # a wrong request stays wrong, whatever the header says
        (401, {"x-should-retry": "true"}, "fail"),
        (403, {"x-should-retry": "true"}, "fail"),
        (413, {"x-should-retry": "true"}, "fail"),
        (422, {"x-should-retry": "true"}, "fail"),
        (402, {"x-should-retry": "true"}, "retry"),
        (404, {}, "fallback"),  # the model is unknown here: the next one may exist
        (429, {"x-should-retry": "false"}, "fallback"),
        (500, {"x-should-retry": "false"}, "fallback"),
        (408, {}, "retry"),
        (409, {}, "retry"),
        (429, {}, "retry"),
        (500, {}, "retry"),
        (503, {}, "retry"),
        (529, {}, "retry"),
        (418, {}, "fail"),
        (418, {"x-should-retry": "true"}, "retry"),
        (499, {}, "fail"),
    ],
)
def test_each_status_has_its_action(status: int, headers: dict[str, str], action: str) -> None:
    decision = classify(status_error(status, headers))
    assert decision.action == action
    assert decision.status_code == status


def test_a_status_error_keeps_the_provider_s_type_message_and_wait() -> None:
    decision = classify(status_error(429, {"retry-after": "7"}, message="slow down"))
    assert decision == Decision("retry", 429, "e429", "slow down", 7.0)


def test_without_a_body_the_class_name_and_the_sdk_text_stand_in() -> None:
    request = httpx2.Request("POST", URL)
    exc = anthropic.RateLimitError("Error code: 429", response=httpx2.Response(429, request=request), body=None)
    assert classify(exc) == Decision("retry", 429, "RateLimitError", "Error code: 429", None)


def test_messages_are_cut_at_a_thousand_characters() -> None:
    long = "x" * 1500
    assert classify(status_error(500, message=long)).message == "x" * 1000
    assert classify(MalformedResponse(long)).message == "x" * 1000
    assert classify(ValueError(long)).message == "x" * 1000


def test_a_malformed_response_is_retried_like_a_5xx() -> None:
    assert classify(MalformedResponse("not JSON")) == Decision("retry", None, "MalformedResponse", "not JSON")


def test_connection_errors_are_retried_and_name_the_url_without_its_query() -> None:
    request = httpx2.Request("POST", URL)
    for exc in (anthropic.APIConnectionError(request=request), anthropic.APITimeoutError(request=request)):
        decision = classify(exc)
        assert decision.action == "retry" and decision.status_code is None
        assert decision.error_type == type(exc).__name__
        assert decision.message == f"{exc} (calling http://sim.local:8123/v1/messages)"


def test_a_connection_error_message_is_cut_too() -> None:
    exc = anthropic.APIConnectionError(request=httpx2.Request("POST", "http://h/" + "p" * 2000))
    assert classify(exc).message == f"Connection error. (calling http://h/{'p' * 2000}"[:1000]


def test_a_url_without_a_port_is_named_without_one() -> None:
    exc = anthropic.APIConnectionError(request=httpx2.Request("POST", "https://api.example.com/v1/messages"))
    assert classify(exc).message == "Connection error. (calling https://api.example.com/v1/messages)"


def test_a_connection_error_raised_before_any_request_says_so() -> None:
    exc = anthropic.APIConnectionError(request=httpx2.Request("POST", URL))
    del exc.request
    assert classify(exc).message == "Connection error. (no request was made)"


def test_anything_else_is_final() -> None:
    assert classify(KeyError("k")) == Decision("fail", None, "KeyError", "'k'")


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        ({"retry-after-ms": "250", "retry-after": "3"}, 0.25),
        ({"retry-after-ms": "soon", "retry-after": "3"}, 3.0),  # an unreadable value gives way to the next
        ({"retry-after": "0"}, 0.0),
        ({"retry-after": "600"}, 600.0),
        ({"retry-after": "600.5"}, None),
        ({"retry-after-ms": "-1"}, None),
    ],
)
def test_retry_after_bounds_and_precedence(headers: dict[str, str], wait: float | None) -> None:
    assert retry_after_s(headers) == wait


def test_headers_that_cannot_be_read_give_no_wait() -> None:
    assert retry_after_s(object()) is None
    assert retry_after_s(None) is None


class _Fixed(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize(
    ("attempt", "server", "expected"),
    [
        (1, None, 0.5 * (1 - 0.4 * 0.25)),
        (2, None, 1.0 * (1 - 0.4 * 0.25)),
        (4, None, 4.0 * (1 - 0.4 * 0.25)),
        (10, None, 5.0 * (1 - 0.4 * 0.25)),  # capped at max_delay_s
        (1, 2.5, 2.5),  # never shorter than the provider asked
        (4, 1.0, 4.0 * (1 - 0.4 * 0.25)),
    ],
)
def test_the_delay_is_exponential_jittered_capped_and_honours_the_server(
    attempt: int, server: float | None, expected: float
) -> None:
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=5.0, jitter=0.4)
    assert Backoff(policy, _Fixed(0.25)).delay_s(attempt, server) == pytest.approx(expected)


def test_a_backoff_without_a_generator_makes_its_own() -> None:
    delays = {Backoff(RetryPolicy(base_delay_s=1.0, jitter=1.0)).delay_s(1, None) for _ in range(20)}
    assert len(delays) > 1 and all(0.0 <= d <= 1.0 for d in delays)
