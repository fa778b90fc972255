"""User-facing errors: the CLI prints these as one line and exits with code 2."""

from __future__ import annotations


class PersonaError(Exception):
    """A problem the user can fix: the message names it and says how.

    Library code raises this (never ``sys.exit``) so that the CLI, the consumer and the API can each
    turn it into their own kind of clear error (one line + exit 2, a DLQ reason, a 4xx problem).
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} ({hint})")


class DataError(PersonaError):
    """Input data is missing, malformed or unusable."""


class BundleError(PersonaError):
    """A model bundle is missing, tampered with, truncated or incompatible."""
