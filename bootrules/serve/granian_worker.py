"""granian (Rust, hyper) answering in a worker bootrules forked: every use of granian's internals is here.

`serve --server granian` keeps bootrules' own supervision: a leader per version of the
rules loads them and forks the workers onto the one listening socket, a new generation
replaces them when the rules change, and their metrics are summed. Only the HTTP server inside each worker changes: granian's Rust
worker, started on the inherited socket, calls the same WSGI app on a few Python threads.

granian's public API (`Granian(...).serve()`) would bring its own supervisor, in which
every worker loads the rules itself (no shared pages) and a reload restarts workers on
sockets of their own, dropping the connections queued on them. So this module starts
granian's worker class directly, as granian's own `_spawn_wsgi_worker` does, with a WSGI
callback of its own (`WsgiCallback`). The names it uses are not granian's public API:
`missing()` checks that they are all there. Without them, or without granian,
`serve --server granian` refuses to start with one line that says why.

Retiring (new rules, SIGTERM): the worker stops accepting (the other workers take the new
connections), and every answer from then on carries `Connection: close`, so a client on
a kept-alive connection moves on after its next answer. CLOSING_FOR seconds later granian
is told to stop: it finishes the requests in hand and closes what is left.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterable

log = logging.getLogger("bootrules")

INSTALL = "pip install -r requirements-granian.txt (or: pip install '.[granian]')"
# How long a retiring worker, no longer accepting, answers its connections with
# `Connection: close` before granian stops it: long enough for clients on kept-alive
# connections to make their next request and move on, and for a request half sent to
# arrive. granian then closes every connection without a whole request in hand (an idle
# pool's connection, as its idle timeout would).
CLOSING_FOR = 0.5
WATCH_EVERY = 0.05  # seconds between two looks at the stop request
# Python threads granian runs the app on, per worker. A decision holds the GIL from start
# to end, so a second thread only makes the two hand the GIL to each other on every
# request (docs/performance.md). Slow requests (a scrape, a page, a callback waiting for
# the store) are answered on a thread of their own instead: WsgiCallback.
PYTHON_THREADS = 1


def missing() -> str | None:
    """Why granian cannot serve here (not installed, or its internals moved); None if it can."""
    try:
        import granian  # noqa: F401
    except ImportError:
        return f"--server granian needs granian, which is not installed: {INSTALL}"
    try:
        _internals()
    except (ImportError, AttributeError) as error:
        return (f"--server granian: the installed granian {_version()} lacks what bootrules uses ({error}); "
                f"{INSTALL} installs a version it was tested with")
    return None


def _internals() -> dict[str, Any]:
    from granian._futures import _new_cbscheduler
    from granian._granian import SocketHolder, WorkerSignal, WSGIWorker
    from granian._loops import loops
    from granian.http import HTTP1Settings
    from granian.wsgi import ResponseIterWrap

    for cls, method in ((WSGIWorker, "serve_mtr"), (WorkerSignal, "add_cb"), (WorkerSignal, "set")):
        getattr(cls, method)
    return {"scheduler": _new_cbscheduler, "SocketHolder": SocketHolder, "WorkerSignal": WorkerSignal,
            "WSGIWorker": WSGIWorker, "loops": loops, "HTTP1Settings": HTTP1Settings, "IterWrap": ResponseIterWrap}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("granian")
    except PackageNotFoundError:  # pragma: no cover
        return "(unknown version)"


class WsgiCallback:
    """What granian's worker calls for each request: the app under WSGI, its answer handed back.

    granian's own wrapper (granian.wsgi._callback_wrapper) starts every request's environ
    from a copy of the whole process environment: a `BOOTRULES_STATE` URL with its password
    would be in every request's environ. This one starts from WSGI's own keys only. Once
    `retiring`, every answer carries `Connection: close`.

    A plain GET of /ipxe or /boot.ipxe is first offered to the app's `direct` (its WSGI
    middleware's, bootrules.web.proxies): the same answer, built from granian's own scope and
    handed to granian whole, without WSGI's environ and start_response around it.

    Requests for `slow_paths` go to a thread of their own, which answers them through
    their `proto` once done: granian's thread returns at once to answer machines. (granian
    waits for the answer on a channel the `proto` holds, not for this call to return.)
    """

    def __init__(self, app: Callable[..., Any], iter_wrap: Callable[[Any], Any], slow_paths: Iterable[str] = ()) -> None:
        self.app = app
        self.iter_wrap = iter_wrap
        self.retiring = False
        self.direct = getattr(getattr(app, "wsgi_app", None), "direct", None)
        slow_paths = tuple(slow_paths)
        # A path ending in "/" stands for everything under it.
        self.slow_paths = frozenset(path for path in slow_paths if not path.endswith("/"))
        self.slow_prefixes = tuple(path for path in slow_paths if path.endswith("/"))
        self._aside: queue.SimpleQueue[Any] | None = None  # made, with its thread, when first needed
        self.base = {
            "GATEWAY_INTERFACE": "CGI/1.1", "SCRIPT_NAME": "", "wsgi.errors": sys.stderr,
            "wsgi.input_terminated": True, "wsgi.multiprocess": True, "wsgi.multithread": True,
            "wsgi.run_once": False, "wsgi.version": (1, 0),
        }

    def __call__(self, proto: Any, scope: dict) -> int:
        if self.direct is not None:
            found = self.direct(scope)
            if found is not None:
                status, headers, body = found
                if self.retiring:
                    headers = [*headers, ("Connection", "close")]
                code = int(status[:3])
                proto.response_bytes(code, headers, body)
                return code
        path = scope.get("PATH_INFO") or ""
        if path in self.slow_paths or (self.slow_prefixes and path.startswith(self.slow_prefixes)):
            self._put_aside(proto, scope)
            return 0
        return self._answer(proto, scope)

    def _put_aside(self, proto: Any, scope: dict) -> None:
        if self._aside is None:
            self._aside = queue.SimpleQueue()
            threading.Thread(target=self._serve_aside, args=(self._aside,), daemon=True,
                             name="bootrules-slow-requests").start()
        self._aside.put((proto, scope))

    def _serve_aside(self, requests: queue.SimpleQueue[Any]) -> None:
        while True:
            proto, scope = requests.get()
            try:
                self._answer(proto, scope)
            except Exception:  # granian would log it and answer 500: so does this thread
                log.exception("unexpected error on %s", scope.get("PATH_INFO"))
                try:
                    proto.response_bytes(500, [("Content-Type", "text/plain; charset=utf-8")],
                                         b"500 internal error (see the bootrules log)\n")
                except Exception:  # noqa: BLE001 - answered already: nothing more to send
                    pass

    def _answer(self, proto: Any, scope: dict) -> int:
        """The app under WSGI, its answer handed to granian."""
        answer: list[Any] = [500, []]

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            if self.retiring:
                headers = [(name, value) for name, value in headers if name.lower() != "connection"]
                headers.append(("Connection", "close"))
            answer[0], answer[1] = int(status.split(" ", 1)[0]), headers

        body = self.app(self.base | scope, start_response)
        if isinstance(body, list):
            proto.response_bytes(answer[0], answer[1], b"".join(body))
        else:
            proto.response_iter(answer[0], answer[1], self.iter_wrap(body))
        return answer[0]


class GranianServer:
    """granian's Rust WSGI worker on the listening socket `sock`, until `shutdown` is requested."""

    def __init__(self, app: Any, sock: socket.socket, shutdown: Any, options: dict[str, Any]) -> None:
        self.parts = _internals()
        self.callback = WsgiCallback(app, self.parts["IterWrap"], options.get("slow_paths", ()))
        self.sock = sock
        self.shutdown = shutdown
        self.options = options
        self._listening = -1

    def run(self) -> None:
        parts = self.parts
        options = self.options
        stopped = threading.Event()
        signal = parts["WorkerSignal"]()
        signal.add_cb(stopped.set)
        loop = parts["loops"].get("auto")
        # granian's own descriptor of the socket: a duplicate, so that what it closes is its
        # own, and so that _stop_accepting can point it elsewhere.
        self._listening = os.dup(self.sock.fileno())
        holder = parts["SocketHolder"](self._listening, False, 1024)
        # hyper's header read timeout covers a kept-alive connection waiting for its next
        # request as well as a slow one: the closest to waitress's channel timeout.
        http1 = parts["HTTP1Settings"](header_read_timeout=int(options["channel_timeout"] * 1000))
        worker = parts["WSGIWorker"](
            1, (None, holder), None,  # worker id, socket, no IPC (granian's metrics are not used)
            1, 512,  # Rust runtime threads, blocking threads of that runtime
            PYTHON_THREADS, 30,  # Python threads for the app, and their idle timeout
            options["connection_limit"],  # backpressure: requests in hand at most, per worker
            "1", http1, None,  # HTTP/1.1 only (iPXE speaks nothing else), no HTTP/2
            None,  # no static files
            False, None, None, None, "tls1.3", None, [], False,  # no TLS (a proxy's job)
            (None, None),  # granian's metrics: off
        )
        scheduler = parts["scheduler"](loop, self.callback, impl_asyncio=True)
        worker.serve_mtr(scheduler, loop, signal)
        try:
            self._until_stopped(signal, stopped)
        finally:
            signal.set()
            stopped.wait(5.0)

    def _until_stopped(self, signal: Any, stopped: threading.Event) -> None:
        shutdown = self.shutdown
        while not shutdown.requested:
            if stopped.wait(WATCH_EVERY):
                log.error("granian stopped on its own")
                return
        log.info("stopping: answering with Connection: close, then closing (at most %.0f s)", shutdown.grace)
        self.callback.retiring = True
        self._stop_accepting()
        closing_ends = time.monotonic() + CLOSING_FOR
        deadline = time.monotonic() + (shutdown.grace or 0.0)
        while True:
            now = time.monotonic()
            deadline = min(deadline, now + (shutdown.grace or 0.0))  # a second SIGTERM: at once
            if now >= min(deadline, closing_ends):
                break
            time.sleep(WATCH_EVERY)
        signal.set()  # granian finishes what it has in hand and closes the rest
        stopped.wait(max(0.0, deadline - time.monotonic()) + 2.0)

    def _stop_accepting(self) -> None:
        """Leave new connections to the other workers, answering those accepted already.

        granian's worker has no way to stop accepting but stopping, and stopping closes at
        once each connection accepted whose request it has not read yet: a failed request
        for every machine that connected in that instant. So its listening descriptor is
        made to name a listening socket no client knows (dup2): its poller still wakes for
        the shared socket, finds nothing to accept on the decoy, and the other workers take
        the connection.
        """
        decoy = socket.socket(self.sock.family, socket.SOCK_STREAM)
        try:
            decoy.bind(("::1" if self.sock.family == socket.AF_INET6 else "127.0.0.1", 0))
            decoy.listen(1)
            decoy.setblocking(False)
            os.dup2(decoy.fileno(), self._listening)
        except OSError as error:
            log.warning("granian: could not stop accepting before stopping (%s)", error)
        finally:
            decoy.close()
