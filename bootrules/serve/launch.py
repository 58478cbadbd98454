"""`serve`: one process, or pre-forked workers on one socket; signals and the supervisors.

waitress runs in one process, and Python runs one thread at a time, so one process uses
one core. With several workers the parent binds the socket and follows the rules file;
for each version of it, a leader process loads the rules once and forks the workers,
which share its copy (copy-on-write pages), so no worker ever holds two copies or spends
its time loading them. A new version's leader retires the old one once its workers run
(bootrules.generations). A worker that dies is started again by its leader; SIGTERM or
SIGINT stops them all.

Signal handlers here only set a flag or write a byte to a wake-up pipe (bootrules.wakeup):
anything more, run inside another handler, can deadlock.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import waitress_loop as server
from ..application import create_app
from .generations import Generations, report, send_signal
from ..logs import configure_logging
from ..metrics import MULTIPROC_ENV, Metrics, clear_runtime_files, worker_exited
from ..decide.reloader import Reloader
from ..settings import Settings
from ..wakeup import Wakeup
from ..web.boot import SLOW_PATHS

log = logging.getLogger("bootrules")

RESTART_DELAY = 1.0
# How long a stopping server (SIGTERM) may take to answer what it has in hand; a second
# SIGTERM stops it at once. A retiring worker (new rules) has the channel timeout.
STOP_GRACE = 10.0
WORKER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP, signal.SIGCHLD)


class StartError(Exception):
    """bootrules cannot start; the message says why, in a line or a few."""


def serve(settings: Settings) -> int:
    """Serve until stopped; return the exit status."""
    configure_logging(settings.log_format)
    # Until the handlers are in place, SIGHUP (systemctl reload) must not kill us.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    workers = settings.resolved_workers()
    runtime = _runtime_directory() if workers > 1 else None
    try:
        metrics = Metrics()  # made after the runtime directory: it decides the metrics mode
        if settings.server == "granian":
            from .granian_worker import missing

            reason = missing()
            if reason:
                raise StartError(reason)
        _raise_open_files_limit(settings.connection_limit + 100)  # per process: each worker has its own
        if runtime is None:
            return _serve_alone(settings, metrics)
        return _serve_generations(settings, metrics, workers, os.path.join(runtime, "status.json"))
    finally:
        if runtime and runtime.startswith(tempfile.gettempdir()) and os.path.basename(runtime).startswith("bootrules-"):
            shutil.rmtree(runtime, ignore_errors=True)


def _serve_alone(settings: Settings, metrics: Metrics) -> int:
    """One process: it loads and follows the file itself, and serves."""
    reloader = Reloader(settings.rules, settings.poll_interval, metrics=metrics)
    if not reloader.reload():
        raise StartError(f"{settings.rules} is not valid, not starting:\n{reloader.last_error or 'cannot load the rules'}")
    sock = _listen(settings)
    _log_serving(settings, len(reloader.snapshot.ruleset), sock, 1)
    return WorkerPlan(settings, reloader, metrics, sock).serve_alone()


def _serve_generations(settings: Settings, metrics: Metrics, workers: int, status_path: str) -> int:
    """Several workers: this process follows the file, and a leader per version loads it
    and forks the workers (bootrules.generations says why)."""
    sock = _listen(settings)

    def lead(generation: int, report_fd: int, mask: set) -> None:
        _lead(settings, metrics, sock, workers, status_path, generation, report_fd, mask)

    generations = Generations(lead, exited=worker_exited)
    reloader = Reloader(settings.rules, settings.poll_interval, on_changed=generations.request_new)
    generations.retry = reloader.retry
    generations.install_signal_handlers(on_hup=reloader.request_reload)
    try:
        reloader.reload()  # notes the version the first leader loads
        first = generations.start()
        if first is None:
            return 0
        if isinstance(first, str):
            raise StartError(f"{settings.rules} is not valid, not starting:\n{first}")
        _log_serving(settings, first.rules, sock, workers)
        reloader.start()
        return generations.run()
    finally:
        reloader.stop()
        sock.close()


def _lead(settings: Settings, metrics: Metrics, sock: socket.socket, workers: int, status_path: str,
          generation: int, report_fd: int, mask: set) -> None:
    """The body of a generation's leader: load the rules, fork the workers and watch them
    until retired (SIGUSR1) or stopped (SIGTERM); never returns."""

    def lead() -> None:
        supervisor = Supervisor(workers, retire_grace=float(settings.channel_timeout), exited=worker_exited,
                                spawned=lambda pid: report(report_fd, "worker", pid=pid))
        supervisor.install_signal_handlers()  # before the load: a stop then forks nothing
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the parent's
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        reloader = Reloader(settings.rules, 0, metrics=metrics, status_path=status_path,
                            counts_as_reload=generation > 1)
        if not reloader.reload():
            if reloader.last_error is not None:
                report(report_fd, "failed", problems=str(reloader.last_error))
            else:
                report(report_fd, "retry")
            return
        release_free_memory()
        plan = WorkerPlan(settings, reloader, metrics, sock)
        supervisor.run(plan.serve_as_worker,
                       started=lambda: report(report_fd, "ready", rules=len(reloader.snapshot.ruleset)))

    _exit_after(lead, f"the leader of generation {generation}")


def _listen(settings: Settings) -> socket.socket:
    try:
        return listening_socket(settings.host, settings.port)
    except OSError as error:
        raise StartError(f"cannot listen on {settings.host}:{settings.port}: {error.strerror or error}") from None


def _log_serving(settings: Settings, rules: int, sock: socket.socket, workers: int) -> None:
    log.info("serving %d rules from %s on http://%s:%d/ with %d %s worker(s)",
             rules, settings.rules, settings.host, sock.getsockname()[1], workers, settings.server)


def listening_socket(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """Bind and listen on host:port (IPv4 or IPv6), ready to be shared with forked workers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


@dataclass
class WorkerPlan:
    """How one serving process is built from the settings, the rules and the socket."""

    settings: Settings
    reloader: Reloader
    metrics: Metrics
    sock: socket.socket
    app: Any = field(default=None, init=False)  # made by build(), in the serving process

    def server_options(self) -> dict:
        settings = self.settings
        # waitress would strip X-Forwarded-* before the app sees them; TrustedProxies decides
        # instead, by the peer's address, so that CIDRs and several proxies work.
        # Idle and slow clients: waitress's defaults (100 connections, select(), which stops at
        # 1024 descriptors, and a 120 s idle timeout) let a few hundred silent connections lock
        # every machine out. poll() and a larger limit keep the door open; the timeout closes
        # the silent ones.
        return {"ident": "bootrules", "clear_untrusted_proxy_headers": False,
                "connection_limit": settings.connection_limit, "channel_timeout": settings.channel_timeout,
                "asyncore_use_poll": True, "cleanup_interval": min(30, settings.channel_timeout),
                "slow_paths": SLOW_PATHS}

    def build(self, shutdown: server.Shutdown) -> Any:
        self.app = create_app(settings=self.settings, reloader=self.reloader, metrics=self.metrics)
        if self.settings.server == "granian":
            from .granian_worker import GranianServer

            return GranianServer(self.app, self.sock, shutdown, self.server_options())
        return server.create(self.app, self.sock, shutdown, **self.server_options())

    def run(self, shutdown: server.Shutdown) -> None:
        """Serve until stopped, then write the armed rows and machines seen not written yet."""
        try:
            self.build(shutdown).run()
        finally:
            for name in ("bootrules.once", "bootrules.recorder"):  # what is not written yet
                writer = self.app.extensions.get(name) if self.app is not None else None
                if writer is not None:
                    writer.close()

    def serve_alone(self) -> int:
        """One process: it follows the file itself; SIGHUP reloads, SIGTERM drains and stops."""
        shutdown = server.Shutdown()
        _stop_on_signals(shutdown)
        signal.signal(signal.SIGHUP, lambda _signum, _frame: self.reloader.request_reload())
        self.reloader.start()
        try:
            self.run(shutdown)
        finally:
            self.reloader.stop()
            self.sock.close()
        log.info("stopped")
        return 0

    def serve_as_worker(self, shutdown: server.Shutdown) -> None:
        """In a forked worker (signals set by the supervisor): serve until asked to stop.
        The leader's parent follows the file and starts new generations: no watcher here."""
        self.run(shutdown)


def _stop_on_signals(shutdown: server.Shutdown) -> None:
    """SIGTERM and SIGINT: drain and stop within STOP_GRACE; the second one: stop now."""

    def stop(_signum: int, _frame: object) -> None:
        shutdown.request(0.0 if shutdown.requested else STOP_GRACE)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


class Supervisor:
    """Forks and watches one generation's workers (in its leader, bootrules.generations).

    Everything happens on the main loop of `run`; the signal handlers only set a flag and
    wake it. SIGTERM or SIGINT stops the workers (they drain within STOP_GRACE), SIGUSR1
    retires them (new rules elsewhere: they drain within the retire grace); either way
    `run` returns once every worker has exited. A worker that dies is started again.
    """

    def __init__(self, count: int, *, retire_grace: float = 30.0,
                 exited: Callable[[int], None] = lambda pid: None,
                 spawned: Callable[[int], None] = lambda pid: None) -> None:
        self.count = count
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
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return status
            if pid == 0:
                return status
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

    def _restart_due(self) -> None:
        now = time.monotonic()
        for number, when in list(self._restarts.items()):
            if when <= now:
                del self._restarts[number]
                self.spawn(number)

    # ------------------------------------------------------------ workers

    def spawn(self, number: int) -> None:
        """Fork worker `number`.

        Signals are blocked across the fork, so the child never runs the parent's handlers:
        it installs its own (through `serve`) before anything can reach it.
        """
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:  # the worker
                _run_worker(self.serve, number, blocked, self.retire_grace)
            self.workers[pid] = number
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self.spawned(pid)

    def start_generation(self) -> None:
        """Fork a full set of workers on the rules this process holds."""
        # Objects made so far (the rules) are never collected: keeping the collector off
        # them keeps their pages shared between the workers.
        gc.freeze()
        for number in range(self.count):
            self.spawn(number)


def _run_worker(serve: Callable[[server.Shutdown], None], number: int, mask: set, retire_grace: float) -> None:
    """The body of a forked worker: its own handlers first, then signals unblocked; never returns.

    SIGUSR1 retires the worker (new rules: drain within `retire_grace`), SIGTERM and
    SIGINT stop it (drain within STOP_GRACE; a second one: at once), SIGHUP is the parent's.
    """

    def work() -> None:
        shutdown = server.Shutdown()
        _stop_on_signals(shutdown)
        signal.signal(signal.SIGUSR1, lambda _s, _f: shutdown.request(retire_grace))
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        serve(shutdown)

    _exit_after(work, f"worker {number}")


def _exit_after(body: Callable[[], None], what: str) -> None:
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


def release_free_memory() -> None:
    """Give the memory the load freed back to the system before forking workers.

    Loading rules leaves the leader's heap with freed pages (the parser's temporaries).
    Workers forked on top of them would share them, and count them in their PSS.
    """
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)  # glibc; elsewhere the attribute is missing
    except (OSError, AttributeError):
        pass


def _runtime_directory() -> str:
    """A directory the parent and its workers share: metrics, and the reload status.

    An operator's own PROMETHEUS_MULTIPROC_DIR is used but emptied first: numbers left
    by an earlier run would otherwise be added to this one's.
    """
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        clear_runtime_files(Path(given))
        return given
    made = tempfile.mkdtemp(prefix="bootrules-")
    os.environ[MULTIPROC_ENV] = made
    return made


def _raise_open_files_limit(wanted: int) -> None:
    """Let the process hold `wanted` descriptors, up to the hard limit the system allows."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
