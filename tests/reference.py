"""Independent oracles for the pure cores' tests: computed here from the published rule,
never with the code under test."""

from __future__ import annotations

#: Test card numbers the card networks publish (each passes the Luhn check).
PUBLISHED_CARDS = [
    "4111111111111111",  # Visa
    "4012888888881881",  # Visa
    "5555555555554444",  # Mastercard
    "378282246310005",  # American Express (15 digits)
    "6011111111111117",  # Discover
    "30569309025904",  # Diners Club (14 digits)
    "3530111333300000",  # JCB
]


def luhn_check_digit(body: str) -> str:
    """The digit that completes `body` under ISO/IEC 7812-1 Annex B: from the right of the
    completed number, every second digit (the check digit being the first) is doubled and
    replaced by the sum of its decimal digits; the total is a multiple of ten."""
    total = 0
    for position, char in enumerate(reversed(body), start=2):  # position 1 is the check digit
        value = int(char) * (2 if position % 2 == 0 else 1)
        total += sum(int(d) for d in str(value))
    return str(-total % 10)


def luhn_ok(number: str) -> bool:
    return luhn_check_digit(number[:-1]) == number[-1]
