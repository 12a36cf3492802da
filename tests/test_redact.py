"""Redaction (`agentpool/redact.py`) pinned down exactly: which texts, keys and numbers are
replaced by which marker, and which are left alone; card checksums from `tests.reference`."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentpool.models import AgentResult, ErrorInfo
from agentpool.redact import MAX_DEPTH, luhn_valid, redact, redact_fields, redact_record, redact_text, secret_key
from tests.reference import PUBLISHED_CARDS, luhn_check_digit, luhn_ok


def test_the_reference_accepts_the_published_test_cards() -> None:
    assert all(luhn_ok(card) for card in PUBLISHED_CARDS)


@pytest.mark.parametrize("card", PUBLISHED_CARDS)
def test_published_cards_pass_and_every_other_last_digit_fails(card: str) -> None:
    assert luhn_valid(card)
    for digit in "0123456789":
        if digit != card[-1]:
            assert not luhn_valid(card[:-1] + digit)


@given(st.text(alphabet="0123456789", min_size=1, max_size=24))
def test_the_checksum_agrees_with_the_reference(digits: str) -> None:
    assert luhn_valid(digits) == luhn_ok(digits)


@given(st.text(alphabet="0123456789", min_size=12, max_size=18))
def test_every_completed_number_of_card_length_is_redacted(body: str) -> None:
    card = body + luhn_check_digit(body)
    assert redact_text(f"pay with {card} now") == "pay with [CARD] now"


@pytest.mark.parametrize(
    ("text", "everything", "cards_only"),
    [
        ("card 4111 1111 1111 1111 ok", "card [CARD] ok", "card [CARD] ok"),
        ("4111 1111 1111 1112", "4111 1111 1111 1112", "4111 1111 1111 1112"),  # fails Luhn, too long for a phone
        ("room 18 please", "room 18 please", "room 18 please"),  # passes Luhn, far too short for a card
        ("+1 415 555 0100", "[PHONE]", "+1 415 555 0100"),
        ("(415) 555-0100", "[PHONE]", "(415) 555-0100"),
        ("415-555-0100", "[PHONE]", "415-555-0100"),
        ("415-5550100", "415-5550100", "415-5550100"),  # one separator: as likely an order number
        ("4155550100", "4155550100", "4155550100"),  # a bare run: as likely a timestamp
        ("+1 555 0100", "+1 555 0100", "+1 555 0100"),  # 8 digits: too short
        ("+1 234 567 890", "[PHONE]", "+1 234 567 890"),  # 10 digits: the shortest phone
        ("+123 456 789 012 345", "[PHONE]", "+123 456 789 012 345"),  # 15 digits: the longest
        ("+1 234 567 8901 2345 6", "+1 234 567 8901 2345 6", "+1 234 567 8901 2345 6"),  # 16 digits
        ("at 2024-01-15 1030 sharp", "at 2024-01-15 1030 sharp", "at 2024-01-15 1030 sharp"),  # a date
        ("+14155550100", "[PHONE]", "+14155550100"),  # a leading + marks a phone number
        ("(415)5550100", "[PHONE]", "(415)5550100"),  # so does an area code in parentheses
    ],
)
def test_numbers_in_text(text: str, everything: str, cards_only: str) -> None:
    assert redact_text(text) == everything
    assert redact_text(text, pii=["card"]) == cards_only


def test_card_length_bounds() -> None:
    for length in (13, 19):
        body = "4" * (length - 1)
        assert redact_text(body + luhn_check_digit(body)) == "[CARD]"
    for length in (12, 20):
        body = "4" * (length - 1)
        number = body + luhn_check_digit(body)
        assert redact_text(number) == number


def test_a_kind_not_asked_for_is_left() -> None:
    assert redact_text("4111111111111111", pii=["phone"]) == "4111111111111111"
    assert redact_text("call +1 415 555 0100", pii=["card", "email"]) == "call +1 415 555 0100"
    assert redact_text("a.b@example.org", pii=False) == "a.b@example.org"


@pytest.mark.parametrize("key", ["password", "Api-Key", "ACCESS_KEY", "x-auth-token", "Cookie", "client_secret"])
def test_values_under_credential_keys_are_withheld_whatever_they_look_like(key: str) -> None:
    assert secret_key(key)
    assert redact({key: "hunter2", "note": "hunter2"}) == {key: "[REDACTED]", "note": "hunter2"}
    assert redact({key: "hunter2"}, pii=False) == {key: "[REDACTED]"}
    assert redact({key: "hunter2"}, keys=False) == {key: "hunter2"}


@pytest.mark.parametrize("key", ["note", "monkey", "pass", "user_id", "keyboard"])
def test_ordinary_keys_are_not_credentials(key: str) -> None:
    assert not secret_key(key)


def test_non_string_keys_are_kept_and_their_values_redacted() -> None:
    assert redact({1: "a.b@example.org", 2: "x"}) == {1: "[EMAIL]", 2: "x"}


def test_the_pii_choice_reaches_nested_values() -> None:
    value = {"list": ["a.b@example.org", {"deep": ["a.b@example.org"]}], "n": 4111111111111111}
    assert redact(value, pii=False) == value
    assert redact(value, pii=["phone"]) == value
    assert redact(value) == {"list": ["[EMAIL]", {"deep": ["[EMAIL]"]}], "n": "[CARD]"}
    assert redact(("a.b@example.org",)) == ["[EMAIL]"]


def test_the_keys_and_numbers_choices_reach_nested_values() -> None:
    value = {"outer": {"password": "hunter2", "n": 4111111111111111}, "rows": [{"token": "t"}, 4111111111111111]}
    assert redact(value, keys=False, numbers=False) == value
    assert redact(value, pii=False) == {
        "outer": {"password": "[REDACTED]", "n": 4111111111111111},
        "rows": [{"token": "[REDACTED]"}, 4111111111111111],
    }
    assert redact(value) == {
        "outer": {"password": "[REDACTED]", "n": "[CARD]"},
        "rows": [{"token": "[REDACTED]"}, "[CARD]"],
    }


def _nested(depth: int) -> object:
    value: object = "a.b@example.org"
    for _ in range(depth):
        value = [value]
    return value


def test_nesting_deeper_than_the_limit_is_dropped() -> None:
    kept, dropped = redact(_nested(MAX_DEPTH)), redact(_nested(MAX_DEPTH + 1))
    for _ in range(MAX_DEPTH):
        kept, dropped = kept[0], dropped[0]  # type: ignore[index]
    assert kept == "[EMAIL]"
    assert dropped == ["[TOO_DEEP]"]


def test_dicts_count_towards_the_nesting_limit() -> None:
    def nested(depth: int) -> object:
        value: object = "a.b@example.org"
        for _ in range(depth):
            value = {"k": value}
        return value

    kept, dropped = redact(nested(MAX_DEPTH)), redact(nested(MAX_DEPTH + 1))
    for _ in range(MAX_DEPTH):
        kept, dropped = kept["k"], dropped["k"]  # type: ignore[index]
    assert kept == "[EMAIL]"
    assert dropped == {"k": "[TOO_DEEP]"}


def test_integers_that_read_as_cards_or_phones_are_replaced_other_numbers_kept() -> None:
    assert redact(4111111111111111) == "[CARD]"
    assert redact(4111111111111111, numbers=False) == 4111111111111111
    assert redact(4111111111111111, pii=["phone"]) == 4111111111111111
    assert redact(4111111111111111, pii=False) == 4111111111111111
    assert redact(1234) == 1234
    assert redact(True) is True and redact(None) is None
    # Floats are measurements, not numbers written by a person: left as they are.
    assert redact(4111111111111117.0) == 4111111111111117.0


def test_each_kind_and_secrets_get_their_own_marker() -> None:
    text = "ssn 123-45-6789, ni AB 12 34 56 C, key sk-ant-abcdefghijkl, tel +1 415 555 0100"
    everything = "ssn [NATIONAL_ID], ni [NATIONAL_ID], key [SECRET], tel [PHONE]"
    assert redact_text(text) == everything
    assert (
        redact_text(text, pii=["national_id"])
        == "ssn [NATIONAL_ID], ni [NATIONAL_ID], key [SECRET], tel +1 415 555 0100"
    )
    assert redact_text(text, pii=["phone"]) == "ssn 123-45-6789, ni AB 12 34 56 C, key [SECRET], tel [PHONE]"
    assert redact_text(text, pii=False) == "ssn 123-45-6789, ni AB 12 34 56 C, key [SECRET], tel +1 415 555 0100"


def test_a_record_loses_personal_data_in_its_answer_and_error_message_only() -> None:
    record = AgentResult(
        task_id="t-jane@example.com",
        tenant="acme",
        status="failed",
        answer={"to": "jane@example.com", "note": "call 415 555 0199", "count": 4111111111111111, "password": "pw"},
        error=ErrorInfo(type="ToolError", message="mail to jane@example.com bounced, call 415 555 0199"),
    )
    kept = redact_record(record, [])
    assert kept is record
    emails = redact_record(record, ["email"])
    # Only the kinds named; a credential-named key is the caller's (it is not personal data).
    assert emails.answer == {"to": "[EMAIL]", "note": "call 415 555 0199", "count": 4111111111111111, "password": "pw"}
    assert emails.error is not None and emails.error.message == "mail to [EMAIL] bounced, call 415 555 0199"
    assert emails.task_id == record.task_id and record.answer["to"] == "jane@example.com"  # a copy
    assert redact_record(record.model_copy(update={"error": None}), ["email"]).error is None
    every = redact_record(record, ["email", "phone", "card"])
    assert every.answer == {
        "to": "[EMAIL]",
        "note": "call [PHONE]",
        "count": "[CARD]",
        "password": "pw",
    }  # a card number, as a number too


def test_event_fields_keep_their_numbers_and_lose_personal_text() -> None:
    fields = {"problem": "reach jane@example.com or 415 555 0199", "tokens": 4111111111111111, "api_key": "sk-live"}
    assert redact_fields(fields, []) is fields
    assert redact_fields(fields, ["email", "card"]) == {
        "problem": "reach [EMAIL] or 415 555 0199",
        "tokens": 4111111111111111,
        "api_key": "sk-live",  # credentials are the caller's to scrub; this is the PII rule
    }
