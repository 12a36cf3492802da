"""Keeping credentials out of everything the pool records.

The Anthropic key lives in a `SecretStr` from the moment it is read (environment or secrets
file) until the worker hands it to the SDK. Whatever text leaves a worker and could carry
it (provider error messages, exception text, log lines) passes a `Scrubber` first: the exact
secrets it knows are replaced, and so is anything shaped like a credential
(`agentpool.redact`), in case a provider or proxy echoes a key the pool never saw.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from pydantic import SecretStr

from agentpool.redact import redact_text

MARK = "[SECRET]"
#: Shorter strings are not treated as secrets: replacing them would mangle ordinary text.
_MIN_SECRET_LEN = 8
#: Loggers whose records may carry request details (the SDK and its HTTP stack).
_LOGGERS = ("anthropic", "httpx", "httpx2", "httpcore", "agentpool", "ray")


#: Variables that may hold the provider key; actors drop them from their environment so that
#: tool code (and the children it forks) cannot read them.
KEY_VARIABLES = ("ANTHROPIC_API_KEY", "AGENTPOOL_ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN")


def forget_env_secrets() -> None:
    """Removes the provider key from this process's environment (a local Ray's processes
    inherit the driver's)."""
    for name in KEY_VARIABLES:
        os.environ.pop(name, None)


class Scrubber:
    """Replaces known secrets and credential-shaped strings in text with `[SECRET]`."""

    def __init__(self, secrets: Iterable[str | SecretStr | None] = ()) -> None:
        plain = {s.get_secret_value() if isinstance(s, SecretStr) else s for s in secrets if s is not None}
        # Longest first, so a secret that contains another is replaced whole.
        self._secrets = sorted((s for s in plain if len(s) >= _MIN_SECRET_LEN), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MARK)
        return redact_text(text, pii=False)


class ScrubFilter(logging.Filter):
    """A logging filter that scrubs each record's message and exception text in place."""

    def __init__(self, scrub: Scrubber) -> None:
        super().__init__()
        self._scrub = scrub

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self._scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[0] is not None:
            # Formatted once here, scrubbed, and kept as the text handlers print.
            text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            record.exc_text, record.exc_info = self._scrub(text), None
        elif record.exc_text:
            record.exc_text = self._scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self._scrub(record.stack_info)
        return True


def install_log_scrubber(scrub: Scrubber) -> ScrubFilter:
    """Scrubs what this process logs: every handler of the root logger (records from any
    logger pass one) and the loggers of the SDK, its HTTP stack, Ray and agentpool."""
    flt = ScrubFilter(scrub)
    root = logging.getLogger()
    targets: list[logging.Filterer] = [*root.handlers]
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        targets.append(logger)
        targets.extend(logger.handlers)
    for target in targets:
        if not any(isinstance(f, ScrubFilter) for f in target.filters):
            target.addFilter(flt)
    return flt
