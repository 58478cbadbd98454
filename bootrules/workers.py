"""Serve with several waitress processes sharing one listening socket.

waitress runs in one process, and Python runs one thread at a time, so one process uses
one core. The parent binds the socket, loads the rules, and forks the workers, which share
the parent's copy of the rules (copy-on-write pages). The parent follows the rules file;
when it changes, the parent loads it once and replaces the workers (see Supervisor). It
also restarts a worker that dies, and on SIGTERM or SIGINT stops them all and waits.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Callable

log = logging.getLogger("bootrules")

RESTART_DELAY = 1.0
# A retiring worker closes a connection that never carried a request after this long, so
# one it has only just accepted keeps it until its request has arrived and been answered.
QUIET_BEFORE_CLOSE = 1.0


def listening_socket(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """Bind and listen on host:port (IPv4 or IPv6), ready to be shared with forked workers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class Supervisor:
    """Forks and watches the workers; replaces them all when the rules change.

    A reload happens in the parent: it loads the new rules once, forks a new generation of
    workers that share them, and retires the old generation. A retiring worker stops
    accepting, answers what it has in hand, closes its connections and exits (see
    retire_on_sigusr1). So no worker ever holds two copies of the rules, or spends its
    time loading them.
    """

    def __init__(self, count: int, sock: socket.socket, serve: Callable[[socket.socket], None],
                 started: Callable[[], None] = lambda: None, exited: Callable[[int], None] = lambda pid: None) -> None:
        self.count = count
        self.started = started
        self.sock = sock
        self.serve = serve
        self.exited = exited
        self.generation = 0
        self.workers: dict[int, tuple[int, int]] = {}  # pid -> (generation, worker number)
        self.stopping = False
        self.replace_requested = False

    def spawn(self, number: int) -> None:
        """Fork worker `number` of the current generation."""
        pid = os.fork()
        if pid == 0:  # the worker
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, _exit_quietly)
            for signum in (signal.SIGCHLD, signal.SIGUSR2):
                signal.signal(signum, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the parent reloads
            code = 0
            try:
                self.serve(self.sock)
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else 0
            except BaseException:
                log.exception("worker %d failed", number)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        self.workers[pid] = (self.generation, number)

    def start_generation(self) -> None:
        """Fork a full set of workers on the rules the parent holds now."""
        # Objects made so far (the rules) are never collected: keeping the collector off
        # them keeps their pages shared between the workers.
        gc.freeze()
        for number in range(self.count):
            self.spawn(number)

    def replace_all(self) -> None:
        """Start a new generation, then retire the old one (the rules have changed)."""
        old = [pid for pid, (generation, _number) in self.workers.items() if generation == self.generation]
        self.generation += 1
        self.start_generation()
        for pid in old:
            _signal(pid, signal.SIGUSR1)
        new = [pid for pid, (generation, _number) in self.workers.items() if generation == self.generation]
        log.info("new rules: started workers %s, retiring %s", " ".join(map(str, new)), " ".join(map(str, old)))

    def request_replace(self) -> None:
        """Ask the main loop to replace the workers; safe from any thread."""
        os.kill(os.getpid(), signal.SIGUSR2)

    def run(self) -> int:
        """Start the workers and supervise them until SIGTERM or SIGINT."""
        status = 0

        def stop(_signum: int, _frame: object) -> None:
            self.stopping = True
            for pid in list(self.workers):
                _signal(pid, signal.SIGTERM)

        def replace(_signum: int, _frame: object) -> None:
            self.replace_requested = True

        self.start_generation()
        self.started()
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGUSR2, replace)
        log.info("started %d workers: %s", self.count, " ".join(str(pid) for pid in self.workers))
        while self.workers:
            if self.replace_requested and not self.stopping:
                self.replace_requested = False
                self.replace_all()
            try:
                # Polled, not blocking: a blocking wait() is resumed after a signal
                # (PEP 475), so a replacement asked for by SIGUSR2 would wait for a death.
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.05)
                continue
            if pid not in self.workers:
                continue
            generation, number = self.workers.pop(pid)
            self.exited(pid)
            if self.stopping or generation != self.generation:
                continue  # stopped, or a retired worker finishing
            log.error("worker %d (pid %d) exited with %s; starting it again", number, pid,
                      os.waitstatus_to_exitcode(wait_status))
            status = 1
            time.sleep(RESTART_DELAY)
            if not self.stopping:
                self.spawn(number)
        self.sock.close()
        log.info("all workers stopped")
        return 0 if self.stopping else status


def retire_on_sigusr1(server: object, grace: float) -> None:
    """In a worker: on SIGUSR1 stop accepting, finish what is in hand, close, and exit.

    A connection is closed once it has answered and has nothing in progress; a request in
    hand is never cut. Whatever is left after `grace` seconds is closed anyway. (A WSGI app
    may not send `Connection: close`, a hop-by-hop header, so this is done at the server.)
    """

    def retire(_signum: int, _frame: object) -> None:
        server.accepting = False  # type: ignore[attr-defined]  # waitress stops polling the socket
        threading.Thread(target=_drain, args=(server, time.monotonic() + grace), daemon=True).start()

    signal.signal(signal.SIGUSR1, retire)


def _drain(server: object, deadline: float) -> None:
    from waitress.channel import HTTPChannel

    def channels() -> list[HTTPChannel]:
        return [c for c in list(server._map.values()) if isinstance(c, HTTPChannel)]  # type: ignore[attr-defined]

    def close_what_is_done() -> None:  # runs on waitress's own loop thread
        now = time.time()
        for channel in channels():
            with channel.requests_lock:
                if channel.request is not None or channel.requests or channel.total_outbufs_len:
                    continue  # a request arriving, in hand or being sent: let it finish
                served = channel.last_activity > channel.creation_time
                if served or now - channel.last_activity > QUIET_BEFORE_CLOSE:
                    # Answered and idle (a keep-alive client reconnects, to a new worker),
                    # or accepted but unused for a while.
                    channel.handle_close()

    # Empty twice in a row: a connection accepted in the very loop pass that saw SIGUSR1
    # shows up only a moment later.
    empty_checks = 0
    while empty_checks < 2 and time.monotonic() < deadline:
        server.trigger.pull_trigger(close_what_is_done)  # type: ignore[attr-defined]
        time.sleep(0.1)
        empty_checks = empty_checks + 1 if not channels() else 0
    os.kill(os.getpid(), signal.SIGTERM)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def exit_on_sigterm() -> None:
    """Turn SIGTERM into a normal exit, so that logs are flushed and sockets closed."""
    signal.signal(signal.SIGTERM, _exit_quietly)


def _exit_quietly(_signum: int, _frame: object) -> None:
    sys.exit(0)
