"""The one error type of `idlora-trl`: a problem with what the user asked for, reported in one line (exit status 2)."""

from __future__ import annotations


class UsageError(Exception):
    """A problem with what the user asked for: reported in one line, exit status 2."""


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
