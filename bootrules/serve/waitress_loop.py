"""waitress, driven by bootrules: every use of waitress's internals is in this module.

waitress reads requests on one loop thread and hands each to a pool of worker threads.
That suits apps that wait on databases or disks. bootrules waits on nothing: a request is
answered from rules in memory in microseconds, and the handoff to a thread cost more than
the answer (README, performance). So `LoopServer` answers each request on the loop thread,
after the pass that read it, accepts several waiting connections per pass (iPXE opens a
connection per request), and drains gracefully: a retiring server answers every request
it has or will read, marks the last answer on each connection `Connection: close`, and
closes a connection only once it has been quiet for QUIET_BEFORE_CLOSE seconds with
nothing unread.

None of that is waitress's public API (`_dispatcher` is a test shim upstream, and the
channel's fields are its own). `create` checks that everything used is there; if the
installed waitress lacks any of it, it logs one warning and returns a `ThreadedServer`:
waitress's stock server with its thread pool, still correct, only slower, and without
the keep-alive guarantee on reload (a retiring worker then stops after a short grace).
"""

from __future__ import annotations

import collections
import errno
import inspect
import logging
import queue
import socket
import sys
import threading
import time
import warnings
from typing import Any, Callable, Iterable

import waitress.adjustments
import waitress.server

log = logging.getLogger("bootrules")

# A response is appended to the connection's buffer whole. waitress's task would wait for
# the loop to drain a buffer above this mark, and the loop is the thread that waits: so
# the mark is out of reach. At most one read (recv_bytes) of pipelined requests is
# answered at a time, so a buffer holds at most a few hundred scripts.
NEVER_WAIT_FOR_FLUSH = 1 << 40
# More than one, so that a boot storm's connections cost fewer loop passes; few enough
# that one worker does not take most of a burst of keep-alive connections (README).
ACCEPTS_PER_PASS = 4
# How long a connection must have been silent before a retiring server closes it. A
# client that is using its connection (a proxy's pool, iPXE fetching kernel and initrd, a
# monitoring probe) sends its next request well within this, and that request is answered
# with `Connection: close`, so the client itself moves on. A connection silent for this
# long is idle in a pool: closing it is what the idle timeout does anyway, and the socket
# is checked for unread bytes first, so a request that has arrived is never dropped.
QUIET_BEFORE_CLOSE = 2.0
# waitress sends each write the moment it is made (its send_bytes adjustment, 1 since
# waitress 1.3): an answer's headers and its body leave in two send() calls, two TCP
# segments for the machine and two trips through the kernel for the server. Buffered up
# to this many bytes, an answer leaves whole in one send() when the loop next writes (a
# pass that answers several connections writes to each once); a larger answer (a scrape,
# a page) still leaves as it is written. send_bytes is public, documented and deprecated:
# if a waitress drops it, answers go out in two sends again, as correct as before.
SEND_AFTER_BYTES = 18000
LOOP_TIMEOUT = 0.25  # seconds; how soon a signal's request to stop is noticed when idle


class Shutdown:
    """A request to stop serving, within `grace` seconds. Set from signal handlers: no locks."""

    def __init__(self) -> None:
        self.grace: float | None = None

    def request(self, grace: float) -> None:
        """Ask the server to drain and stop within `grace` seconds (a shorter grace wins)."""
        if self.grace is None or grace < self.grace:
            self.grace = grace

    @property
    def requested(self) -> bool:
        return self.grace is not None


# --------------------------------------------------------------------------- the check


def missing_internals() -> list[str]:
    """The waitress internals LoopServer needs that the installed waitress lacks."""
    missing = []
    try:
        from waitress import wasyncore
        from waitress.channel import HTTPChannel
    except ImportError as error:  # pragma: no cover - depends on the waitress installed
        return [str(error)]
    if "_dispatcher" not in inspect.signature(waitress.server.create_server).parameters:
        missing.append("create_server(_dispatcher=)")
    if not callable(getattr(wasyncore, "poll2", None)):
        missing.append("wasyncore.poll2")
    for name in ("request", "last_activity", "will_close", "close_when_flushed", "total_outbufs_len",
                 "service", "handle_close", "received"):
        if not hasattr(HTTPChannel, name):
            missing.append(f"HTTPChannel.{name}")
    server_class = waitress.server.BaseWSGIServer
    for name in ("handle_accept", "set_socket_options", "maintenance"):
        if not hasattr(server_class, name):
            missing.append(f"BaseWSGIServer.{name}")
    return missing


def create(app: Any, sock: socket.socket, shutdown: Shutdown, slow_paths: Iterable[str] = (),
           **options: Any) -> "LoopServer | ThreadedServer":
    """A server for `app` on the listening socket `sock`: LoopServer, or the stock one if it must."""
    missing = missing_internals()
    if not missing:
        try:
            return LoopServer(app, sock, shutdown, slow_paths, options)
        except (AttributeError, TypeError) as error:  # an internal changed shape
            missing = [str(error)]
    log.warning("the installed waitress %s lacks what bootrules' fast server uses (%s); serving with "
                "waitress's stock threaded server instead: correct, but slower", _waitress_version(),
                ", ".join(missing))
    return ThreadedServer(app, sock, shutdown, options)


def _waitress_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("waitress")
    except PackageNotFoundError:  # pragma: no cover
        return "(unknown version)"


# --------------------------------------------------------------------------- the loop server


class LoopDispatcher:
    """Runs waitress tasks on the loop thread, once the loop pass that queued them ends.

    Requests for `slow_paths` are the exception: they go to one thread of their own, as
    waitress's pool would run them, so that the loop goes on answering machines meanwhile
    (a Prometheus scrape of 100,000 rules' counts takes most of a second).
    """

    def __init__(self, slow_paths: Iterable[str] = ()) -> None:
        self.pending: collections.deque[Any] = collections.deque()
        # A path ending in "/" stands for everything under it.
        slow_paths = tuple(slow_paths)
        self.slow_paths = frozenset(path for path in slow_paths if not path.endswith("/"))
        self.slow_prefixes = tuple(path for path in slow_paths if path.endswith("/"))
        self.retiring = False
        self._slow: queue.SimpleQueue[Any] | None = None  # made, with its thread, when first needed

    def set_thread_count(self, count: int) -> None:
        """Part of waitress's dispatcher interface; there are no threads to count."""

    def add_task(self, task: Any) -> None:
        # Called by a connection while it holds its own lock, so the task cannot run here.
        # The task is the connection; its first request is the one to answer next.
        path = getattr(task.requests[0], "path", None) or ""
        if path in self.slow_paths or (self.slow_prefixes and path.startswith(self.slow_prefixes)):
            self._run_aside(task)
        else:
            self.pending.append(task)

    def _run_aside(self, task: Any) -> None:
        if self._slow is None:
            self._slow = queue.SimpleQueue()
            threading.Thread(target=self._serve_slow, args=(self._slow,), daemon=True,
                             name="bootrules-slow-requests").start()
        self._slow.put(task)

    def _serve_slow(self, tasks: queue.SimpleQueue[Any]) -> None:
        while True:
            task = tasks.get()
            if self.retiring:
                _close_if_last(task)
            try:
                task.service()  # wakes the loop when done, to send the answer
            except Exception:
                log.exception("unexpected error serving %r", task)

    def run_pending(self) -> None:
        """Answer every request queued so far, and any queued while doing so."""
        pending = self.pending
        while pending:
            task = pending.popleft()
            if self.retiring:
                _close_if_last(task)
            try:
                task.service()
            except Exception:  # the connection has reported it; keep serving the others
                log.exception("unexpected error serving %r", task)

    def shutdown(self, cancel_pending: bool = True, timeout: float = 5) -> bool:
        self.pending.clear()
        return True


def _close_if_last(channel: Any) -> None:
    """While retiring: answer the connection's request with `Connection: close` if it is the last.

    It is the last when no other request is parsed or half-read and nothing is unread in
    the socket; otherwise it is answered as usual and the next one is looked at in turn.
    """
    if len(channel.requests) == 1 and channel.request is None and not _has_unread(channel.socket):
        channel.requests[0].headers["CONNECTION"] = "close"


def _has_unread(sock: socket.socket | None) -> bool:
    if sock is None:
        return False
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False
    except OSError as error:
        return error.errno not in (errno.ENOTCONN, errno.EBADF, errno.ECONNRESET)


class LoopServer:
    """waitress answering on its I/O loop thread, draining gracefully when asked to stop."""

    def __init__(self, app: Any, sock: socket.socket, shutdown: Shutdown, slow_paths: Iterable[str],
                 options: dict[str, Any]) -> None:
        from waitress import wasyncore
        from waitress.channel import HTTPChannel

        self._poll = wasyncore.poll2
        self._channel_class = HTTPChannel
        self.shutdown = shutdown
        self.dispatcher = LoopDispatcher(slow_paths)
        options = {**options, "outbuf_high_watermark": NEVER_WAIT_FOR_FLUSH}
        with warnings.catch_warnings():
            if hasattr(waitress.adjustments.Adjustments, "send_bytes"):
                options["send_bytes"] = SEND_AFTER_BYTES
                warnings.filterwarnings("ignore", "send_bytes", DeprecationWarning)
            self.waitress = waitress.server.create_server(app, sockets=[sock], _dispatcher=self.dispatcher, **options)
        self.channels: dict[int, Any] = self.waitress._map
        self.waitress.handle_accept = self._accept_several(ACCEPTS_PER_PASS)
        if sys.platform == "linux":
            # Linux gives each accepted connection the listening socket's TCP options
            # (TCP_NODELAY): set them once here rather than once per connection.
            self.waitress.set_socket_options(sock)
            self.waitress.set_socket_options = lambda conn: None

    def _accept_several(self, limit: int) -> Callable[[], None]:
        """A handle_accept that takes up to `limit` waiting connections at once."""
        accept_one = self.waitress.handle_accept  # waitress's: accepts one, or nothing if none waits
        channels = self.channels
        connection_limit = self.waitress.adj.connection_limit

        def handle_accept() -> None:
            for _ in range(limit):
                if len(channels) >= connection_limit:  # the limit waitress's readable() enforces
                    return
                before = len(channels)
                accept_one()
                if len(channels) == before:  # nothing was waiting
                    return

        return handle_accept

    def serve_pass(self, timeout: float) -> None:
        """One pass of the loop: wait up to `timeout` for sockets, read, answer, write."""
        self._poll(timeout, self.channels)
        self.dispatcher.run_pending()

    def connections(self) -> list[Any]:
        """The open client connections (waitress channels)."""
        return [channel for channel in self.channels.values() if isinstance(channel, self._channel_class)]

    def close(self) -> None:
        """Close every connection and the listener (tests that drive `serve_pass` themselves)."""
        for channel in self.connections():
            channel.handle_close()
        self.waitress.close()

    def run(self) -> None:
        """Serve until asked to stop, then drain: answer what comes, close what is quiet."""
        dispatcher = self.dispatcher
        deadline: float | None = None
        try:
            while True:
                if self.shutdown.requested:
                    grace_ends = time.monotonic() + (self.shutdown.grace or 0.0)
                    if deadline is None:
                        self.waitress.accepting = False  # the listening socket is left to the others
                        dispatcher.retiring = True
                        log.info("stopping: answering what is in hand, then closing (at most %.0f s)",
                                 self.shutdown.grace)
                    deadline = grace_ends if deadline is None else min(deadline, grace_ends)
                self.serve_pass(LOOP_TIMEOUT)
                if deadline is not None:
                    if not self._close_quiet() or time.monotonic() >= deadline:
                        break
        except KeyboardInterrupt:
            pass
        finally:
            dispatcher.shutdown()
            for channel in self.connections():
                channel.handle_close()

    def _close_quiet(self) -> int:
        """Close the connections that are quiet and hold nothing; return how many are left."""
        now = time.time()
        left = 0
        for channel in self.connections():
            busy = (channel.requests or channel.request is not None or channel.total_outbufs_len
                    or channel.will_close or channel.close_when_flushed)
            if not busy and now - channel.last_activity >= QUIET_BEFORE_CLOSE and not _has_unread(channel.socket):
                channel.handle_close()
            else:
                left += 1
        return left


# --------------------------------------------------------------------------- the fallback


class ThreadedServer:
    """waitress's stock server (public API only), for a waitress whose internals moved."""

    STOP_DELAY = 1.0  # what a request in hand gets before the process stops

    def __init__(self, app: Any, sock: socket.socket, shutdown: Shutdown, options: dict[str, Any]) -> None:
        options = {key: value for key, value in options.items() if key != "slow_paths"}
        self.shutdown = shutdown
        self.waitress = waitress.server.create_server(app, sockets=[sock], **options)

    def run(self) -> None:
        """Serve on a thread of waitress's own until asked to stop; then give what is in hand
        a moment and return (the serving threads end with the process)."""
        threading.Thread(target=self.waitress.run, daemon=True, name="bootrules-waitress").start()
        while not self.shutdown.requested:
            time.sleep(LOOP_TIMEOUT)
        time.sleep(min(self.STOP_DELAY, self.shutdown.grace or 0.0))
