"""One serving process: how it is built from the settings, the rules, the socket and the
stores' health board, and how it serves until asked to stop."""

from __future__ import annotations

import logging
import signal
import socket
from dataclasses import dataclass, field
from typing import Any

from ..application import create_app
from ..decide.reloader import Reloader
from ..metrics import Metrics
from ..services import services
from ..settings import Settings
from ..state.health import HealthBoard
from ..web.boot import MAX_BODY, SLOW_PATHS
from . import waitress_loop as server

log = logging.getLogger("bootrules")

# How long a stopping server (SIGTERM) may take to answer what it has in hand; a second
# SIGTERM stops it at once. A retiring worker (new rules) has the channel timeout.
STOP_GRACE = 10.0


@dataclass
class WorkerPlan:
    """How one serving process is built from the settings, the rules and the socket."""

    settings: Settings
    reloader: Reloader
    metrics: Metrics
    sock: socket.socket
    board: HealthBoard
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
                # No endpoint takes a body: waitress refuses a larger one (413) before reading it,
                # where the app would only see it once spooled to disk.
                "max_request_body_size": MAX_BODY, "slow_paths": SLOW_PATHS}

    def build(self, shutdown: server.Shutdown) -> Any:
        self.app = create_app(settings=self.settings, reloader=self.reloader, metrics=self.metrics, board=self.board)
        if self.settings.server == "granian":
            from .granian_worker import GranianServer

            return GranianServer(self.app, self.sock, shutdown, self.server_options())
        return server.create(self.app, self.sock, shutdown, **self.server_options())

    def run(self, shutdown: server.Shutdown) -> None:
        """Serve until stopped, then write the armed rows and machines seen not written yet."""
        try:
            self.build(shutdown).run()
        finally:
            if self.app is not None:  # what is not written yet
                found = services(self.app)
                found.once.close()
                if found.recorder is not None:
                    found.recorder.close()

    def serve_alone(self) -> int:
        """One process: it follows the file itself; SIGHUP reloads, SIGTERM drains and stops."""
        shutdown = server.Shutdown()
        stop_on_signals(shutdown)
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


def stop_on_signals(shutdown: server.Shutdown) -> None:
    """SIGTERM and SIGINT: drain and stop within STOP_GRACE; the second one: stop now."""

    def stop(_signum: int, _frame: object) -> None:
        shutdown.request(0.0 if shutdown.requested else STOP_GRACE)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


