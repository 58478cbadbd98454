"""The parent of several workers: it follows the rules file but never loads it.

A process that loads the rules and forks its workers shares the rules' pages with them.
When the rules change, a parent that holds them must free the old ones, and freeing
writes to every page: each old page is copied just to be freed, while the old workers
still hold the originals, and what is freed stays in the parent's heap, in pieces, for
every later generation to carry (README, performance: the memory through a reload).

So the parent, the process the service manager sees, only follows the file and forks a
*leader* for each version of it. The leader loads the rules, forks the workers and
starts again any that dies. Once a new leader's workers run, the old leader retires its
workers and exits, and the old rules leave with its process, no page of them touched.

A leader reports to the parent through a pipe, one JSON object per line:
`{"event": "worker", "pid": N}` for each worker it forks, `{"event": "ready", "rules": N,
"watched": [...]}` once its workers run (with the other files the rules were read from, which
the parent follows too), `{"event": "failed", "problems": "...", "watched": [...]}` when the file does not load
(it has logged why and published it for /healthz), `{"event": "retry"}` when the file
changed while it was read. After the last two it exits.

The parent is a child subreaper (Linux): when a leader dies, its workers become the
parent's children, go on serving, and are retired once a new leader is ready.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import time
from dataclasses import dataclass, field
from typing import Callable

from ..wakeup import Wakeup
from .forking import RESTART_DELAY, exited_children, fork, send_signal

log = logging.getLogger("bootrules")

_PR_SET_CHILD_SUBREAPER = 36


@dataclass
class Leader:
    """The parent's view of one generation: its leader process and what it reported."""

    pid: int
    generation: int
    pipe: int  # the read end of its reports
    state: str = "loading"  # loading, serving, retiring, failed
    workers: set[int] = field(default_factory=set)
    rules: int = 0
    problems: str | None = None
    buffer: bytes = b""


class Generations:
    """Forks a leader per version of the rules and retires the previous one when it is ready.

    `lead(generation, report_fd, mask)` runs in each forked leader and never returns; it
    sets its signal handlers, then the signal mask to `mask`. As in a
    supervisor of workers, everything happens on the main loop; signal handlers and the
    file watcher's thread only set a flag and wake it.
    """

    def __init__(self, lead: Callable[[int, int, set], None], *, exited: Callable[[int], None] = lambda pid: None,
                 retry: Callable[[], None] = lambda: None) -> None:
        self.lead = lead
        self.exited = exited
        self.retry = retry  # the file changed while a leader read it: follow it again
        self.watch: Callable[[tuple[str, ...]], None] = lambda paths: None  # the files a leader read
        self.generation = 0
        self.leaders: dict[int, Leader] = {}
        self.current: Leader | None = None
        self.orphans: set[int] = set()  # workers whose leader died
        self.stopping = False
        self._stop_requested = False
        self._new_requested = False
        self._replace_dead_at: float | None = None
        self._wakeup = Wakeup()
        _become_subreaper()

    # ------------------------------------------------------------ requests (any thread, signal handlers)

    def request_new(self) -> None:
        """Load the rules file in a new generation (it changed, or SIGHUP)."""
        self._new_requested = True
        self._wakeup.notify()

    def request_stop(self) -> None:
        self._stop_requested = True
        self._wakeup.notify()

    def install_signal_handlers(self, on_hup: Callable[[], None]) -> None:
        signal.signal(signal.SIGTERM, lambda _s, _f: self.request_stop())
        signal.signal(signal.SIGINT, lambda _s, _f: self.request_stop())
        signal.signal(signal.SIGCHLD, lambda _s, _f: self._wakeup.notify())
        signal.signal(signal.SIGHUP, lambda _s, _f: on_hup())

    # ------------------------------------------------------------ the main loop

    def start(self) -> Leader | str | None:
        """Fork the first leader and wait for it: the leader, ready; why the rules did not
        load; or None if asked to stop meanwhile."""
        self._new_requested = False
        leader = self._fork_leader()
        while leader.state == "loading" and not self._stop_requested:
            self._wait(0.5)
            self._read(leader)
            self._reap()
        if leader.state == "serving":
            return leader
        if self._stop_requested:
            self._stop_all()
            self._wait_all_gone()
            return None
        self._wait_all_gone()
        return leader.problems or "the rules could not be loaded"

    def run(self) -> int:
        """Supervise the generations until SIGTERM or SIGINT; return the exit status."""
        while True:
            if self._stop_requested and not self.stopping:
                self._stop_all()
            if not self.stopping:
                loading = any(leader.state == "loading" for leader in self.leaders.values())
                if self._new_requested and not loading:
                    self._new_requested = False
                    self._fork_leader()
                elif self._replace_dead_at is not None and not loading and time.monotonic() >= self._replace_dead_at:
                    self._replace_dead_at = None
                    self._fork_leader()
            for leader in list(self.leaders.values()):
                self._read(leader)
            self._reap()
            if self.stopping and not self.leaders and not self.orphans:
                break
            self._wait(0.5)
        log.info("all workers stopped")
        return 0

    def _stop_all(self) -> None:
        self.stopping = True
        for leader in self.leaders.values():
            send_signal(leader.pid, signal.SIGTERM)
        for pid in self._own(self.orphans):
            send_signal(pid, signal.SIGTERM)

    def _wait_all_gone(self) -> None:
        while self.leaders or self.orphans:
            self._wait(0.5)
            for leader in list(self.leaders.values()):
                self._read(leader)
            self._reap()

    def _wait(self, timeout: float) -> None:
        pipes = [leader.pipe for leader in self.leaders.values()]
        try:
            select.select([self._wakeup.fileno(), *pipes], [], [], timeout)
        except (OSError, ValueError):
            return
        self._wakeup.clear()

    # ------------------------------------------------------------ leaders

    def _fork_leader(self) -> Leader:
        self.generation += 1
        read_end, write_end = os.pipe()
        generation, others = self.generation, [other.pipe for other in self.leaders.values()]

        def leader_body(mask: set) -> None:  # its own handlers are set before signals are unblocked
            os.close(read_end)
            for pipe in others:
                os.close(pipe)
            self.lead(generation, write_end, mask)

        pid = fork(leader_body)
        os.close(write_end)
        os.set_blocking(read_end, False)
        leader = Leader(pid=pid, generation=self.generation, pipe=read_end)
        self.leaders[pid] = leader
        return leader

    def _read(self, leader: Leader) -> None:
        """Take in what `leader` has reported so far."""
        while True:
            try:
                chunk = os.read(leader.pipe, 65536)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                break
            leader.buffer += chunk
        *lines, leader.buffer = leader.buffer.split(b"\n")
        for line in lines:
            try:
                report = json.loads(line)
            except ValueError:
                continue
            self._on_report(leader, report)

    def _on_report(self, leader: Leader, report: dict) -> None:
        event = report.get("event")
        if event in ("ready", "failed") and isinstance(report.get("watched"), list):
            self.watch(tuple(str(path) for path in report["watched"]))
        if event == "worker":
            leader.workers.add(int(report["pid"]))
        elif event == "ready" and leader.state == "loading":
            leader.state = "serving"
            leader.rules = int(report.get("rules", 0))
            if self.stopping:
                return
            old = self.current
            self.current = leader
            retired: list[int] = []
            if old is not None:
                old.state = "retiring"
                send_signal(old.pid, signal.SIGUSR1)
                retired += sorted(old.workers)
            for pid in self._own(self.orphans):
                send_signal(pid, signal.SIGUSR1)
                retired.append(pid)
            if leader.generation > 1:
                log.info("new rules: started workers %s, retiring %s", " ".join(map(str, sorted(leader.workers))),
                         " ".join(map(str, retired)) or "none")
        elif event in ("failed", "retry") and leader.state == "loading":
            leader.state = "failed"
            leader.problems = report.get("problems")
            if event == "retry":
                self.retry()

    def _reap(self) -> None:
        for pid, wait_status in exited_children():
            self.exited(pid)
            self.orphans.discard(pid)
            leader = self.leaders.pop(pid, None)
            if leader is None:
                continue
            self._read(leader)  # what it wrote before it exited
            os.close(leader.pipe)
            if leader.state == "loading":
                leader.state = "failed"
                leader.problems = f"the process loading the rules exited with {os.waitstatus_to_exitcode(wait_status)}"
                if not self.stopping:  # stopped while loading: nothing went wrong
                    log.error("%s (generation %d)", leader.problems, leader.generation)
            if leader is self.current:
                self.current = None
                if not self.stopping:
                    # Its workers are ours now (subreaper): they serve on until a new leader is ready.
                    self.orphans |= set(self._own(leader.workers))
                    log.error("the leader of the workers (pid %d) exited with %s; its workers go on serving, "
                              "and new ones load the rules in %.0f s", pid, os.waitstatus_to_exitcode(wait_status),
                              RESTART_DELAY)
                    self._replace_dead_at = time.monotonic() + RESTART_DELAY

    @staticmethod
    def _own(pids: set[int]) -> list[int]:
        """Those of `pids` that are live children of this process (a pid may have been reused)."""
        mine = []
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as stream:
                    fields = stream.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                mine.append(pid)
        return mine


def report(fd: int, event: str, **fields: object) -> None:
    """In a leader: one report to the parent (a line, written whole: far below PIPE_BUF)."""
    try:
        os.write(fd, json.dumps({"event": event, **fields}).encode() + b"\n")
    except OSError:
        pass  # the parent is gone; it no longer needs to know


def _become_subreaper() -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: a dead leader's workers go to init
        pass
