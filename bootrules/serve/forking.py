"""Forking the processes of `serve`, and what every forked process shares: signals blocked
across the fork, reaping, ending without returning, and noticing that its parent died.

Signals are blocked while a child is forked, so it never runs its parent's handlers: it
sets its own before anything can reach it, then unblocks them. A child of `serve` also
watches its parent: if the parent is killed (SIGKILL leaves no chance to stop the
children), the child is adopted by another process, and stops within a second, so that no
worker keeps the port and old rules with nobody watching it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Callable, Iterator

log = logging.getLogger("bootrules")

RESTART_DELAY = 1.0  # before a worker, or a leader, that died is started again
FORK_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP, signal.SIGCHLD)
PARENT_CHECK_EVERY = 0.5  # seconds


def fork(body: Callable[[set], None]) -> int:
    """Fork a child that runs `body(mask)` and never returns; return its pid in the parent.

    The child starts with FORK_SIGNALS blocked; `body` sets its handlers, then the mask
    to `mask` (what it was before the fork).
    """
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, FORK_SIGNALS)
    try:
        pid = os.fork()
        if pid == 0:
            body(blocked)
            os._exit(1)  # body never returns
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return pid


def exited_children() -> Iterator[tuple[int, int]]:
    """Every child that has exited so far, as (pid, wait status), without waiting."""
    while True:
        try:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, wait_status


def exit_after(body: Callable[[], None], what: str) -> None:
    """Run the body of a forked process, then end the process (never returning into the
    code that forked it): status 0, SystemExit's code, or 1 after logging a failure."""
    code = 0
    try:
        body()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 0
    except BaseException:
        log.exception("%s failed", what)
        code = 1
    finally:
        logging.shutdown()
        os._exit(code)


def send_signal(pid: int, signum: int) -> None:
    """Signal `pid`; one that has exited meanwhile needs nothing more."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def watch_parents(parents: set[int], orphaned: Callable[[], None], what: str) -> None:
    """Call `orphaned()` once this process's parent is none of `parents` (it died, and
    someone else adopted this process). From a thread: `orphaned` must be thread-safe."""

    def watch() -> None:
        while True:
            time.sleep(PARENT_CHECK_EVERY)
            if os.getppid() not in parents:
                log.error("%s (pid %d): the bootrules process that started it is gone; stopping", what, os.getpid())
                orphaned()
                return

    threading.Thread(target=watch, daemon=True, name="bootrules-parent-watch").start()
