"""A generation's workers: forked by its leader, started again when one dies, stopped or
retired together (bootrules.serve.generations runs a leader per version of the rules)."""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from typing import Callable

from ..wakeup import Wakeup
from . import waitress_loop as server
from .forking import RESTART_DELAY, exit_after, exited_children, fork, send_signal, watch_parents
from .worker import STOP_GRACE, stop_on_signals

log = logging.getLogger("bootrules")


class Supervisor:
    """Forks and watches one generation's workers (in its leader, bootrules.serve.generations).

    Everything happens on the main loop of `run`; the signal handlers only set a flag and
    wake it. SIGTERM or SIGINT stops the workers (they drain within STOP_GRACE), SIGUSR1
    retires them (new rules elsewhere: they drain within the retire grace); either way
    `run` returns once every worker has exited. A worker that dies is started again.
    """

    def __init__(self, count: int, *, retire_grace: float = 30.0,
                 exited: Callable[[int], None] = lambda pid: None,
                 spawned: Callable[[int], None] = lambda pid: None, parents: frozenset[int] = frozenset()) -> None:
        self.count = count
        # Who else may be a worker's parent: the parent of all, which adopts the workers of a
        # leader that died (a worker whose parent is none of these stops).
        self.parents = parents
        self.serve: Callable[[server.Shutdown], None] = lambda shutdown: None  # given to run()
        self.retire_grace = retire_grace
        self.exited = exited
        self.spawned = spawned
        self.workers: dict[int, int] = {}  # pid -> worker number
        self.stopping = False
        self._stop_signal: int | None = None  # SIGTERM (stop) or SIGUSR1 (retire), once asked
        self._signalled: dict[int, int] = {}  # worker -> the stop signal it was sent
        self._restarts: dict[int, float] = {}  # worker number -> when to start it again
        self._wakeup = Wakeup()

    # ------------------------------------------------------------ requests (signal handlers)

    def install_signal_handlers(self) -> None:
        """From here on SIGTERM/SIGINT stop and SIGUSR1 retires, even before `run` (while loading)."""
        signal.signal(signal.SIGTERM, lambda _s, _f: self.request_stop(signal.SIGTERM))
        signal.signal(signal.SIGINT, lambda _s, _f: self.request_stop(signal.SIGTERM))
        signal.signal(signal.SIGUSR1, lambda _s, _f: self.request_stop(signal.SIGUSR1))
        signal.signal(signal.SIGCHLD, lambda _s, _f: self._wakeup.notify())

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop (SIGTERM) or retire (SIGUSR1) every worker; a stop wins over a retirement."""
        if self._stop_signal is None or signum == signal.SIGTERM:
            self._stop_signal = signum
        self._wakeup.notify()

    # ------------------------------------------------------------ the main loop

    def run(self, serve: Callable[[server.Shutdown], None], started: Callable[[], None] = lambda: None) -> int:
        """Start workers that run `serve`, call `started`, and supervise them until asked to
        stop or retire; return the exit status."""
        self.serve = serve
        status = 0
        self.install_signal_handlers()
        if self._stop_signal is None:  # asked to stop while loading: fork nothing
            self.start_generation()
            started()
            log.info("started %d workers: %s", self.count, " ".join(str(pid) for pid in self.workers))
        while True:
            if self._stop_signal is not None:
                self.stopping = True
                for pid in self.workers:
                    # A stop after a retirement is sent too: it shortens the drain.
                    if self._signalled.get(pid) != self._stop_signal:
                        self._signalled[pid] = self._stop_signal
                        send_signal(pid, self._stop_signal)
            status |= self._reap()
            if self.stopping and not self.workers:
                break
            if not self.stopping:
                self._restart_due()
            self._wakeup.wait(0.5)
        return 0 if self.stopping else status

    def _reap(self) -> int:
        """Collect every worker that has exited; schedule a restart for one that died."""
        status = 0
        for pid, wait_status in exited_children():
            if pid not in self.workers:
                continue
            number = self.workers.pop(pid)
            self._signalled.pop(pid, None)
            self.exited(pid)
            if self.stopping:
                continue
            log.error("worker %d (pid %d) exited with %s; starting it again", number, pid,
                      os.waitstatus_to_exitcode(wait_status))
            status = 1
            self._restarts[number] = time.monotonic() + RESTART_DELAY
        return status

    def _restart_due(self) -> None:
        now = time.monotonic()
        for number, when in list(self._restarts.items()):
            if when <= now:
                del self._restarts[number]
                self.spawn(number)

    # ------------------------------------------------------------ workers

    def spawn(self, number: int) -> None:
        """Fork worker `number` (bootrules.serve.forking says how)."""
        leader = os.getpid()
        pid = fork(lambda mask: _run_worker(self.serve, number, mask, self.retire_grace,
                                            {leader, *self.parents}))
        self.workers[pid] = number
        self.spawned(pid)

    def start_generation(self) -> None:
        """Fork a full set of workers on the rules this process holds."""
        # Objects made so far (the rules) are never collected: keeping the collector off
        # them keeps their pages shared between the workers.
        gc.freeze()
        for number in range(self.count):
            self.spawn(number)


def _run_worker(serve: Callable[[server.Shutdown], None], number: int, mask: set, retire_grace: float,
                parents: set[int]) -> None:
    """The body of a forked worker: its own handlers first, then signals unblocked; never returns.

    SIGUSR1 retires the worker (new rules: drain within `retire_grace`), SIGTERM and
    SIGINT stop it (drain within STOP_GRACE; a second one: at once), SIGHUP is the parent's.
    """

    def work() -> None:
        shutdown = server.Shutdown()
        stop_on_signals(shutdown)
        signal.signal(signal.SIGUSR1, lambda _s, _f: shutdown.request(retire_grace))
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if parents - {0}:
            watch_parents(parents, lambda: shutdown.request(STOP_GRACE), f"worker {number}")
        serve(shutdown)

    exit_after(work, f"worker {number}")
