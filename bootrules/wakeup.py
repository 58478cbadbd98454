"""A wake-up pipe: the one thing a signal handler does besides setting a flag.

A Python signal handler runs between two bytecodes of the main thread, and may run inside
another handler. One that takes a lock (threading.Event.set does) can wait for the lock
held by the code it interrupted, forever. Writing a byte to a non-blocking pipe takes no
lock, so `notify` is safe there; the thread that acts on it waits in `wait`.
"""

from __future__ import annotations

import os
import select


class Wakeup:
    """A self-pipe: `notify` from anywhere (a signal handler, a thread), `wait` in one thread."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def notify(self) -> None:
        """Wake the waiting thread; never blocks (a full pipe already means 'wake up')."""
        try:
            os.write(self._write, b"!")
        except (BlockingIOError, OSError):
            pass

    def fileno(self) -> int:
        """The end to wait on alongside others (select); `clear` it once woken."""
        return self._read

    def clear(self) -> None:
        try:
            while os.read(self._read, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def wait(self, timeout: float | None) -> bool:
        """Wait up to `timeout` seconds for a notification; tell whether one came (and clear it)."""
        try:
            ready, _w, _x = select.select([self._read], [], [], timeout)
        except (OSError, ValueError):  # closed meanwhile
            return False
        if not ready:
            return False
        self.clear()
        return True

    def close(self) -> None:
        for fd in (self._read, self._write):
            try:
                os.close(fd)
            except OSError:
                pass
