"""Redaction of secrets and personal data from what the pool records about a task (the audit
trail of tool calls, approval requests): pure functions, no I/O.

Secrets: values under keys that name a credential (`api_key`, `password`, `authorization`,
...) and strings that look like one (Anthropic, OpenAI, AWS, GitHub, Slack keys, bearer
tokens, JWTs, PEM private keys). Personal data: e-mail addresses, card numbers (13-19
digits that pass the Luhn check), phone numbers, and national id patterns (US SSN, UK
National Insurance number). Each is replaced by a marker naming what was there.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

from agentpool.models import PII_KINDS, AgentResult

#: `pii=` of the redaction functions: all kinds (True), none (False), or the kinds named.
Pii = bool | Collection[str]

#: Dict keys whose values are never recorded (matched case-insensitively, `-`/`_` ignored).
SECRET_KEY_WORDS = (
    "apikey",
    "password",
    "passwd",
    "secret",
    "token",
    "authorization",
    "credential",
    "privatekey",
    "accesskey",
    "cookie",
    "sessionid",
)
#: Deepest nesting walked; anything deeper is dropped (it cannot be checked cheaply).
MAX_DEPTH = 32

_SECRETS = [
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)", re.DOTALL),
    re.compile(r"\bsk-ant-[A-Za-z0-9_-]{8,}"),
    re.compile(r"\bsk-(?:proj-)?[A-Za-z0-9_-]{20,}"),
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
    re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}"),
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{12,}"),
]
# The local part may hold any of RFC 5322's atom characters.
_EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# Digit runs with single spaces or dashes between groups: card and phone candidates.
_DIGITS = re.compile(r"(?<![\w+])\+?\(?\d(?:[\d]|[ .-]\(?\d|\)[ .-]?\d)+(?![\w])")
_DATE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}\b")
_SSN = re.compile(r"\b\d{3}-\d{2}-\d{4}\b")
_UK_NINO = re.compile(r"\b[A-CEGHJ-PR-TW-Z]{2}\s?\d{2}\s?\d{2}\s?\d{2}\s?[A-D]\b")


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of a string of digits (card numbers carry one)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _number(match: re.Match[str], kinds: Collection[str]) -> str:
    text = match.group(0)
    digits = re.sub(r"\D", "", text)
    if 13 <= len(digits) <= 19 and luhn_valid(digits):
        return "[CARD]" if "card" in kinds else text
    # A phone number is written as one: a leading +, parentheses, or two or more separators
    # (a bare run of ten digits is as likely a timestamp or an order number).
    if _DATE.match(text) or "phone" not in kinds:
        return text
    formatted = text.startswith("+") or "(" in text or len(re.findall(r"[ .-]", text)) >= 2
    return "[PHONE]" if 10 <= len(digits) <= 15 and formatted else text


def pii_kinds(pii: Pii) -> Collection[str]:
    """The kinds a `pii=` argument names."""
    if isinstance(pii, bool):
        return PII_KINDS if pii else ()
    return pii


def redact_text(text: str, *, pii: Pii = True) -> str:
    """`text` with secrets (and, with `pii`, personal data of those kinds) replaced by markers."""
    for pattern in _SECRETS:
        text = pattern.sub("[SECRET]", text)
    kinds = pii_kinds(pii)
    if "email" in kinds:
        text = _EMAIL.sub("[EMAIL]", text)
    if "national_id" in kinds:
        text = _SSN.sub("[NATIONAL_ID]", text)
        text = _UK_NINO.sub("[NATIONAL_ID]", text)
    if "card" in kinds or "phone" in kinds:
        text = _DIGITS.sub(lambda m: _number(m, kinds), text)
    return text


def secret_key(name: str) -> bool:
    """Whether a dict key names a credential."""
    folded = name.lower().replace("-", "").replace("_", "")
    return any(word in folded for word in SECRET_KEY_WORDS)


def redact(value: Any, *, pii: Pii = True, keys: bool = True, numbers: bool = True, _depth: int = 0) -> Any:
    """A JSON-like value with secrets and personal data redacted (a new value; the input is
    not changed). With `keys`, credential-named keys keep their key and lose their value;
    with `numbers`, integers that read as card or phone numbers are replaced too (off for
    the pool's own records, whose counts and timestamps are not personal data)."""
    if _depth > MAX_DEPTH:
        return "[TOO_DEEP]"
    if isinstance(value, str):
        return redact_text(value, pii=pii)
    depth = _depth + 1
    if isinstance(value, dict):
        return {
            k: "[REDACTED]"
            if keys and isinstance(k, str) and secret_key(k)
            else redact(v, pii=pii, keys=keys, numbers=numbers, _depth=depth)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v, pii=pii, keys=keys, numbers=numbers, _depth=depth) for v in value]
    if numbers and isinstance(value, int) and not isinstance(value, bool) and pii_kinds(pii):
        text = redact_text(str(value), pii=pii)
        return value if text == str(value) else text
    return value


def redact_record(result: AgentResult, kinds: Collection[str]) -> AgentResult:
    """A final record as a tenant that redacts `kinds` of personal data stores it: its answer
    and error message redacted (a copy). Usage, timings and ids are the pool's own data."""
    if not kinds:
        return result
    update: dict[str, Any] = {"answer": redact(result.answer, pii=kinds, keys=False)}
    if result.error is not None:
        update["error"] = result.error.model_copy(update={"message": redact_text(result.error.message, pii=kinds)})
    return result.model_copy(update=update)


def redact_fields(fields: dict[str, Any], kinds: Collection[str]) -> dict[str, Any]:
    """An event's or audit entry's fields as a tenant that redacts `kinds` stores them: text
    redacted, numbers kept (they are the pool's counts, sizes and timestamps)."""
    if not kinds:
        return fields
    redacted: dict[str, Any] = redact(fields, pii=kinds, keys=False, numbers=False)
    return redacted
