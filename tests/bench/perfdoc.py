"""Writing a bench's figures into docs/performance.md, so that no figure there is copied by hand.

Each bench prints its table and, unless run with --quick or --no-docs, puts what it
printed between its own markers in docs/performance.md:

    <!-- bench: servers.py -->
    ```
    …what servers.py printed…
    ```
    <!-- /bench: servers.py -->

with the command and the date it ran. The prose around the markers (what is measured,
how to read it) is the manual's; the figures are the last run's.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import platform
import re
import sys
from pathlib import Path
from typing import Iterator

DOC = Path(__file__).resolve().parent.parent.parent / "docs" / "performance.md"


class _Tee(io.TextIOBase):
    def __init__(self, *streams: io.TextIOBase) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@contextlib.contextmanager
def recorded(bench: str, write: bool = True) -> Iterator[None]:
    """Print as usual; afterwards, put everything printed into the bench's section of the doc."""
    captured = io.StringIO()
    real = sys.stdout
    sys.stdout = _Tee(real, captured)  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout = real
    if write:
        put(bench, captured.getvalue())


def put(bench: str, printed: str) -> None:
    """Replace the bench's section of docs/performance.md with `printed`."""
    command = " ".join([f".venv/bin/python tests/bench/{bench}", *sys.argv[1:]])
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    body = (f"<!-- bench: {bench} -->\n`{command}` on {when} ({platform.machine()}, "
            f"{_cores()} cores), as it printed:\n\n```\n{printed.strip()}\n```\n<!-- /bench: {bench} -->")
    text = DOC.read_text()
    pattern = re.compile(rf"<!-- bench: {re.escape(bench)} -->.*?<!-- /bench: {re.escape(bench)} -->", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{DOC}: no section for {bench} (add the two markers where its figures go)")
    DOC.write_text(pattern.sub(lambda _match: body, text))
    print(f"(written into {DOC.relative_to(DOC.parent.parent)})", file=sys.stderr)


def _cores() -> int:
    import os

    return os.cpu_count() or 1
