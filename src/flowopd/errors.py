"""User-facing errors: one line that names the problem and the fix, never a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """An error caused by user input (bad path, unknown name, invalid config).

    The CLI prints ``error: <message>`` and exits with status 2, without a traceback.
    """


def closest(name: str, choices: Iterable[str]) -> str:
    """A ' (did you mean 'x'?)' hint for an unknown name, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def unknown(kind: str, name: str, choices: Iterable[str]) -> UserError:
    """``UserError("unknown reward 'ocrr' (did you mean 'ocr'?); choose one of: ...")``."""
    choices = sorted(choices)
    return UserError(
        f"unknown {kind} '{name}'{closest(name, choices)}; choose one of: {', '.join(choices)}"
    )
