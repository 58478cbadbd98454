"""waitress, answering each request on its I/O loop thread instead of a thread pool.

waitress reads requests on one loop thread and hands each to a pool of worker threads.
That suits apps that wait on databases or disks. bootrules waits on nothing: a request is
answered from rules in memory in about 14 µs, and the handoff cost more than that: waking
a pool thread, then the two threads taking turns holding Python's interpreter lock. With
the pool, two workers served 10,000 /ipxe requests a second; answered on the loop thread,
16,000 to 20,500 (README, performance).

So `LoopDispatcher` takes the place of waitress's ThreadedTaskDispatcher, and `run`
drives waitress's own loop, answering the requests that each pass completes. Parsing,
buffering, timeouts and connection limits are all still waitress's.

One more change: waitress accepts one connection per pass of its loop, and each pass
asks every open connection whether it wants to read or write. iPXE opens a connection
per request, so in a boot storm the passes cost more than the requests. Accepting up to
ACCEPTS_PER_PASS waiting connections per pass cut a worker's CPU time per storm request
from 199-222 to 164-193 µs (interleaved runs, 10,000 machines, 100k rules). 16 at a time
saved a little more, but then one worker could take most of a burst of keep-alive
connections (32 split 26/6 in 2 of 6 tries, which halves throughput); with 4 the split
is as even as with 1.
"""

from __future__ import annotations

import collections
import logging
import queue
import socket
import sys
import threading
from typing import Any, Callable, Iterable

from waitress import wasyncore
from waitress.server import create_server

log = logging.getLogger("bootrules")

# A response is appended to the connection's buffer whole. waitress's task would wait for
# the loop to drain a buffer above this mark, and the loop is the thread that waits: so
# the mark is out of reach. At most one read (recv_bytes) of pipelined requests is
# answered at a time, so a buffer holds at most a few hundred scripts.
NEVER_WAIT_FOR_FLUSH = 1 << 40
ACCEPTS_PER_PASS = 4


class LoopDispatcher:
    """Runs waitress tasks on the loop thread, once the loop pass that queued them ends.

    Requests for `slow_paths` are the exception: they go to one thread of their own, as
    waitress's pool would run them, so that the loop goes on answering machines meanwhile.
    A Prometheus scrape is one: after 100,000 rules have each answered once, /metrics
    takes most of a second to add up, and on the loop thread every boot waits for it.
    """

    def __init__(self, slow_paths: Iterable[str] = ()) -> None:
        self.pending: collections.deque[Any] = collections.deque()
        self.slow_paths = frozenset(slow_paths)
        self._slow: queue.SimpleQueue[Any] | None = None  # made, with its thread, when first needed

    def set_thread_count(self, count: int) -> None:
        """Part of waitress's dispatcher interface; there are no threads to count."""

    def add_task(self, task: Any) -> None:
        # Called by a connection while it holds its own lock, so the task cannot run here.
        # The task is the connection; its first request is the one to answer next.
        if self.slow_paths and getattr(task.requests[0], "path", None) in self.slow_paths:
            self._run_aside(task)
        else:
            self.pending.append(task)

    def _run_aside(self, task: Any) -> None:
        if self._slow is None:
            self._slow = queue.SimpleQueue()
            threading.Thread(target=self._serve_slow, args=(self._slow,), daemon=True,
                             name="bootrules-slow-requests").start()
        self._slow.put(task)

    @staticmethod
    def _serve_slow(tasks: queue.SimpleQueue[Any]) -> None:
        while True:
            task = tasks.get()
            try:
                task.service()  # wakes the loop when done, to send the answer
            except Exception:
                log.exception("unexpected error serving %r", task)

    def run_pending(self) -> None:
        """Answer every request queued so far, and any queued while doing so."""
        pending = self.pending
        while pending:
            task = pending.popleft()
            try:
                task.service()
            except Exception:  # the connection has reported it; keep serving the others
                log.exception("unexpected error serving %r", task)

    def shutdown(self, cancel_pending: bool = True, timeout: float = 5) -> bool:
        self.pending.clear()
        return True


def create(app: Any, sock: socket.socket, slow_paths: Iterable[str] = (), **options: Any) -> Any:
    """A waitress server on the listening socket `sock`, using a LoopDispatcher."""
    options = {**options, "outbuf_high_watermark": NEVER_WAIT_FOR_FLUSH}
    server = create_server(app, sockets=[sock], _dispatcher=LoopDispatcher(slow_paths), **options)
    server.handle_accept = _accept_several(server, ACCEPTS_PER_PASS)
    if sys.platform == "linux":
        # Linux gives each accepted connection the listening socket's TCP options
        # (TCP_NODELAY): set them once here rather than once per connection, which was 1.5%
        # of a worker's time in a boot storm (py-spy).
        server.set_socket_options(sock)
        server.set_socket_options = lambda conn: None
    return server


def _accept_several(server: Any, limit: int) -> Callable[[], None]:
    """A handle_accept for `server` that takes up to `limit` waiting connections at once."""
    accept_one = server.handle_accept  # waitress's: accepts one, or nothing if none waits
    channels = server._map
    connection_limit = server.adj.connection_limit

    def handle_accept() -> None:
        for _ in range(limit):
            if len(channels) >= connection_limit:  # the limit waitress's readable() enforces
                return
            before = len(channels)
            accept_one()
            if len(channels) == before:  # nothing was waiting
                return

    return handle_accept


def run(server: Any) -> None:
    """Serve until SystemExit (SIGTERM) or KeyboardInterrupt, as waitress's own run() does."""
    channels = server._map
    dispatcher = server.task_dispatcher
    timeout = server.adj.asyncore_loop_timeout
    try:
        while channels:
            wasyncore.poll2(timeout, channels)
            dispatcher.run_pending()
    except (SystemExit, KeyboardInterrupt):
        dispatcher.shutdown()
