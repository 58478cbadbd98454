"""Pausing Python's cyclic garbage collector while a large rule set is built."""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def paused() -> Iterator[None]:
    """Keep the cyclic collector off for the block, and on again after it if it was on.

    Every collection walks every object made so far: building 100,000 rules, or their
    index, with the collector on takes time that grows with the square of the rules.
    Nothing built there is garbage in a cycle.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
