"""Serve with several waitress processes sharing one listening socket.

waitress runs in one process, and Python runs one thread at a time, so one process uses
one core. The parent binds the socket, checks and loads the rules once, and forks the
workers. They start with the parent's rules (shared copy-on-write pages), each then follows
the file on its own. The parent only supervises: it passes SIGHUP on, restarts a worker
that dies, and on SIGTERM or SIGINT stops them all and waits for them.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import sys
import time
from typing import Callable

log = logging.getLogger("bootrules")

RESTART_DELAY = 1.0


def listening_socket(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """Bind and listen on host:port (IPv4 or IPv6), ready to be shared with forked workers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def run_workers(count: int, sock: socket.socket, serve: Callable[[socket.socket], None],
                started: Callable[[], None] = lambda: None, exited: Callable[[int], None] = lambda pid: None) -> int:
    """Fork `count` workers running `serve(sock)`; supervise them until told to stop.

    `started()` runs in the parent once every worker has been forked; `exited(pid)` after
    each worker ends.
    """
    stopping = False
    workers: dict[int, int] = {}  # pid -> worker number

    def spawn(number: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            signal.signal(signal.SIGTERM, _exit_quietly)
            signal.signal(signal.SIGINT, _exit_quietly)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            code = 0
            try:
                serve(sock)
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else 0
            except BaseException:
                log.exception("worker %d failed", number)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        workers[pid] = number

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(workers):
            _signal(pid, signal.SIGTERM)

    def forward_hup(_signum: int, _frame: object) -> None:
        for pid in list(workers):
            _signal(pid, signal.SIGHUP)

    # Objects made so far (the rules loaded by the parent) are never collected: keeping
    # the collector off them keeps their pages shared between the workers.
    gc.freeze()
    for number in range(count):
        spawn(number)
    started()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, forward_hup)
    log.info("started %d workers: %s", count, " ".join(str(pid) for pid in workers))

    status = 0
    while workers:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries wait() itself
            continue
        number = workers.pop(pid, None)
        if number is None:
            continue
        exited(pid)
        code = os.waitstatus_to_exitcode(wait_status)
        if stopping:
            continue
        log.error("worker %d (pid %d) exited with %s; starting it again", number, pid, code)
        status = 1
        time.sleep(RESTART_DELAY)
        if not stopping:
            spawn(number)
    sock.close()
    log.info("all workers stopped")
    return 0 if stopping else status


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
