"""What one app runs on, typed: the settings, the rules in force, the metrics, the stores' health,
the `once:` gate and the recorder. Built by `create_app`; views reach it through `services()`."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flask import Flask, current_app

from .settings import Settings

if TYPE_CHECKING:
    from .decide.reloader import Reloader
    from .metrics import Metrics
    from .state import Stores
    from .state.health import HealthBoard, Prober
    from .state.once import OnceGate
    from .state.recorder import Recorder

EXTENSION = "bootrules"


@dataclass
class Services:
    """Everything an app's requests use; one per app."""

    settings: Settings
    reloader: "Reloader"
    metrics: "Metrics"
    board: "HealthBoard"
    once: "OnceGate"
    recorder: "Recorder | None" = None
    prober: "Prober | None" = None  # this app's own (none when `serve` probes for all its workers)
    _pages: "Stores | None" = field(default=None, repr=False)
    _pages_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def page_stores(self) -> "Stores | None":
        """The stores the status page reads, opened on first use; None while a SQLite file
        does not exist yet (a page never creates one)."""
        from .state import open_stores

        with self._pages_lock:
            if self._pages is None:
                location = self.settings.machines_location()
                if "://" not in location and not os.path.exists(location):
                    return None
                self._pages = open_stores(self.settings, "pages")
            return self._pages

    def stop(self) -> None:
        """Stop what this app runs in the background (tests build many apps in one process)."""
        self.reloader.stop()
        if self.prober is not None:
            self.prober.stop()
        if self.recorder is not None:
            self.recorder.stop()


def services(app: Flask | None = None) -> Services:
    """The services of `app`, or of the app handling this request."""
    return (app or current_app).extensions[EXTENSION]
