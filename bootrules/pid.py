"""This process's ID, kept current across fork() by a hook rather than asked of the kernel.

`os.getpid()` is a system call on Linux (glibc stopped caching it), and the request path
asks on every decision whether it runs in a process forked since its state was made (the
recorder's thread, the metrics file). `pid.current` answers that from memory.
"""

from __future__ import annotations

import os

current = os.getpid()


def _forked() -> None:
    global current
    current = os.getpid()


os.register_at_fork(after_in_child=_forked)
