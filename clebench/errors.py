"""Errors that describe a mistake in what the user asked for, as opposed to a bug in clebench.

The CLI prints a `UserError` (and a missing file) as one line and exits 2; anything else is a bug and keeps its
traceback. Subclass `UserError` for an error whose message says what to change; it is a ValueError, so callers that
catch ValueError keep working.
"""
from __future__ import annotations

__all__ = ["UserError", "MissingExtraError"]


class UserError(ValueError):
    """Bad input (a config, a flag, a file, a model that does not fit): the message names it and what to do."""


class MissingExtraError(UserError, ImportError):
    """An optional dependency is not installed; the message names the pip extra that provides it."""
