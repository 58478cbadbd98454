"""`serve`: one process, or a parent, a leader per version of the rules, and its workers.

waitress runs in one process, and Python runs one thread at a time, so one process uses
one core. With several workers the parent binds the socket and follows the rules file;
for each version of it, a leader process loads the rules once and forks the workers,
which share its copy (copy-on-write pages), so no worker ever holds two copies or spends
its time loading them. A new version's leader retires the old one once its workers run
(bootrules.serve.generations). A worker that dies is started again by its leader
(bootrules.serve.supervisor); SIGTERM or SIGINT stops them all.

The parent also probes the state stores for every worker and keeps their health where
all of them read it (bootrules.state.health), in a runtime directory it shares with them
(with the metrics). A runtime directory left by a bootrules killed with SIGKILL is removed
at the next start.

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
from pathlib import Path

from ..application import probed_stores, state_store_ahead
from ..decide.reloader import Reloader
from ..errors import StartError
from ..logs import configure_logging
from ..metrics import Metrics
from ..metrics_files import MULTIPROC_ENV, clear_runtime_files, missing_internals, worker_exited
from ..settings import Settings
from ..state.health import HealthBoard, Prober
from .forking import exit_after, watch_parents
from .generations import Generations, report
from .supervisor import Supervisor
from .worker import WorkerPlan

log = logging.getLogger("bootrules")

RUNTIME_PREFIX = "bootrules-"
OWNER_FILE = "owner.pid"


def serve(settings: Settings) -> int:
    """Serve until stopped; return the exit status."""
    configure_logging(settings.log_format)
    missing = settings.missing_binaries()
    if missing:
        raise StartError("boot programs to serve are not there:\n" + "\n".join(missing))
    # Until the handlers are in place, SIGHUP (systemctl reload) must not kill us.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    workers = settings.resolved_workers()
    runtime = _runtime_directory() if workers > 1 else None
    prober = None
    try:
        # prometheus_client decides on its multiprocess mode when it is first imported:
        # only once the runtime directory is set.
        lacking = missing_internals() if runtime else None
        if lacking:
            raise StartError(f"several workers add up their metrics with prometheus_client internals this "
                             f"installed version lacks ({lacking}); pip install -r requirements.txt installs one "
                             "that has them, or run with --workers 1")
        metrics = Metrics()
        if settings.server == "granian":
            from .granian_worker import missing

            reason = missing()
            if reason:
                raise StartError(reason)
        _raise_open_files_limit(settings.connection_limit + 100)  # per process: each worker has its own
        board = HealthBoard(os.path.join(runtime, "health.json") if runtime else None)
        prober = Prober(board, probed_stores(settings))
        prober.probe_all()  # learns the store's identity before any worker uses it
        prober.start()
        if runtime is None:
            return _serve_alone(settings, metrics, board)
        return _serve_generations(settings, metrics, board, workers, os.path.join(runtime, "status.json"))
    finally:
        if prober is not None:
            prober.stop()
        if runtime and runtime.startswith(tempfile.gettempdir()) and os.path.basename(runtime).startswith(RUNTIME_PREFIX):
            shutil.rmtree(runtime, ignore_errors=True)


def _serve_alone(settings: Settings, metrics: Metrics, board: HealthBoard) -> int:
    """One process: it loads and follows the file itself, and serves."""
    reloader = Reloader(settings.rules, settings.poll_interval, metrics=metrics,
                        on_loaded=state_store_ahead(settings, board))
    if not reloader.reload():
        raise StartError(f"{settings.rules} is not valid, not starting:\n{reloader.last_error or 'cannot load the rules'}")
    sock = _listen(settings)
    _log_serving(settings, len(reloader.snapshot.ruleset), sock, 1)
    return WorkerPlan(settings, reloader, metrics, sock, board).serve_alone()


def _serve_generations(settings: Settings, metrics: Metrics, board: HealthBoard, workers: int,
                       status_path: str) -> int:
    """Several workers: this process follows the file, and a leader per version loads it
    and forks the workers (bootrules.serve.generations says why)."""
    sock = _listen(settings)
    root = os.getpid()

    def lead(generation: int, report_fd: int, mask: set) -> None:
        _lead(settings, metrics, board, sock, workers, status_path, generation, report_fd, mask, root)

    generations = Generations(lead, exited=worker_exited)
    reloader = Reloader(settings.rules, settings.poll_interval, on_changed=generations.request_new)
    generations.retry = reloader.retry
    generations.watch = reloader.watch
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


def _lead(settings: Settings, metrics: Metrics, board: HealthBoard, sock: socket.socket, workers: int,
          status_path: str, generation: int, report_fd: int, mask: set, root: int) -> None:
    """The body of a generation's leader: load the rules, fork the workers and watch them
    until retired (SIGUSR1) or stopped (SIGTERM, or its parent gone); never returns."""

    def lead() -> None:
        supervisor = Supervisor(workers, retire_grace=float(settings.channel_timeout), exited=worker_exited,
                                spawned=lambda pid: report(report_fd, "worker", pid=pid), parents=frozenset({root}))
        supervisor.install_signal_handlers()  # before the load: a stop then forks nothing
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the parent's
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        watch_parents({root}, supervisor.request_stop, f"the leader of generation {generation}")
        # The workers are forked once the rules have loaded, and whatever they need made ahead.
        reloader = Reloader(settings.rules, 0, metrics=metrics, status_path=status_path,
                            counts_as_reload=generation > 1, on_loaded=state_store_ahead(settings, board))
        if not reloader.reload():
            if reloader.last_error is not None:
                report(report_fd, "failed", problems=str(reloader.last_error), watched=list(reloader.watched))
            else:
                report(report_fd, "retry")
            return
        release_free_memory()
        plan = WorkerPlan(settings, reloader, metrics, sock, board)
        supervisor.run(plan.serve_as_worker, started=lambda: report(
            report_fd, "ready", rules=len(reloader.snapshot.ruleset), watched=list(reloader.watched)))

    exit_after(lead, f"the leader of generation {generation}")


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
    """A directory the parent and its workers share: metrics, health and the reload status.

    An operator's own PROMETHEUS_MULTIPROC_DIR is used but emptied first: numbers left
    by an earlier run would otherwise be added to this one's.
    """
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        clear_runtime_files(Path(given))
        return given
    _remove_abandoned_runtime_directories()
    made = tempfile.mkdtemp(prefix=RUNTIME_PREFIX)
    Path(made, OWNER_FILE).write_text(str(os.getpid()))
    os.environ[MULTIPROC_ENV] = made
    return made


def _remove_abandoned_runtime_directories() -> None:
    """Remove the runtime directories of bootrules processes that are gone (killed with SIGKILL)."""
    for directory in Path(tempfile.gettempdir()).glob(RUNTIME_PREFIX + "*"):
        try:
            owner = int((directory / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not one of ours, or still being made
        if owner != os.getpid() and not Path(f"/proc/{owner}").exists():
            shutil.rmtree(directory, ignore_errors=True)


def _raise_open_files_limit(wanted: int) -> None:
    """Let the process hold `wanted` descriptors, up to the hard limit the system allows."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
