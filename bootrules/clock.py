"""Time as text: `utc()` for every time shown, and `PerSecond` for text that changes once a
second (log time stamps, the HTTP Date header), made once a second.

Formatting a time costs more than answering a machine; in a boot storm thousands of lines
and responses share each second.
"""

from __future__ import annotations

import time
from typing import Callable


class PerSecond:
    """`make(second)` for the second given (default: now), remembered until the second changes."""

    __slots__ = ("_make", "_second", "_text")

    def __init__(self, make: Callable[[int], str]) -> None:
        self._make = make
        self._second = -1
        self._text = ""

    def __call__(self, when: float | None = None) -> str:
        second = int(time.time() if when is None else when)
        if second != self._second:
            self._text = self._make(second)
            self._second = second
        return self._text


def utc(seconds: float | None) -> str | None:
    """A moment as `2026-12-06T12:00:00Z` (None for none): how every page, log line and
    listing writes times."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds)) if seconds else None
