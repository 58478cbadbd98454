"""The WSGI app: `create_app` wires the settings, the rules, the metrics, the stores and the HTTP layer."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from flask import Flask, redirect
from werkzeug.exceptions import HTTPException

from .decide.engine import Snapshot
from .decide.reloader import Reloader
from .logs import configure_logging
from .metrics import Metrics
from .services import EXTENSION, Services
from .settings import Settings
from .state import open_stores
from .state.database import is_server
from .state.health import HealthBoard, ProbedStore, Prober
from .state.once import OnceGate, make_store_ahead
from .state.recorder import Recorder
from .web import views
from .web.boot import BootEndpoints
from .web.proxies import TrustedProxies


def create_app(
    rules_path: str | None = None,
    *,
    base_url: str | None = None,
    trusted_proxies: Iterable[str] | None = None,
    poll_interval: float | None = None,
    settings: Settings | None = None,
    reloader: Reloader | None = None,
    metrics: Metrics | None = None,
    board: HealthBoard | None = None,
) -> Flask:
    """Build the bootrules WSGI app.

    Settings come from `settings`, or else from the arguments given and BOOTRULES_*
    variables (so `waitress-serve --call app:create_app` and `flask --app app run` work).
    `reloader`, `metrics` and `board` are handed over by `serve`, which loaded the rules
    already and probes the stores for all its workers; an app given none of them follows
    the file and probes the stores itself. Raises SettingsError for a wrong setting.
    """
    if settings is None:
        given: dict[str, Any] = {"rules": rules_path, "base_url": base_url, "poll_interval": poll_interval,
                                 "trusted_proxies": tuple(trusted_proxies) if trusted_proxies is not None else None}
        settings = Settings.load(given)
    configure_logging(settings.log_format)  # a no-op if the host set logging up
    app = Flask("bootrules")

    if metrics is None:
        metrics = Metrics()
    prober = None
    if board is None:
        board = HealthBoard()
        prober = Prober(board, probed_stores(settings))
    if reloader is None:  # this app follows the file itself
        reloader = Reloader(settings.rules, settings.poll_interval, metrics=metrics,
                            on_loaded=state_store_ahead(settings, board))
        reloader.reload()
        reloader.start()
    elif reloader.snapshot is not None:  # loaded (and followed) by the caller: report it, not a reload
        metrics.rules_loaded.set(len(reloader.snapshot.ruleset))
        metrics.last_reload.set(reloader.snapshot.loaded_at.timestamp())
    if prober is not None:
        prober.start()

    def rules_in_force() -> tuple:
        snapshot = reloader.snapshot
        return snapshot.ruleset.rules if snapshot is not None and snapshot.has_once else ()

    # Opened in the process that first needs it, and only if a rule has `once:`.
    once = OnceGate(settings, board, metrics, rules_in_force)
    # Machines seen, written in batches by a thread of the process that answers them.
    recorder = None
    if settings.machines_keep:
        location = settings.machines_location()
        recorder = Recorder(lambda: open_stores(settings, "background").machines, settings.machines_keep,
                            settings.machines_max, metrics, board,
                            directory=None if is_server(location) else _directory_of(location))
    app.extensions[EXTENSION] = Services(settings, reloader, metrics, board, once, recorder, prober)

    app.add_url_rule("/healthz", "healthz", views.healthz)
    app.add_url_rule(views.METRICS_PATH, "metrics", views.metrics_view)
    from .web.status import api, ui

    app.register_blueprint(ui)
    app.register_blueprint(api)
    app.add_url_rule("/ui", "ui_root", lambda: redirect("ui/"))  # relative: kept under a proxy's prefix
    app.register_error_handler(HTTPException, views.plain_http_error)
    app.register_error_handler(Exception, views.internal_error)
    app.jinja_env.finalize = views.visible  # what a machine sent never drives a terminal or turns text around
    # Outermost first: proxy headers are settled before /ipxe or Flask see the request.
    boot = BootEndpoints(app.extensions[EXTENSION], app.wsgi_app)
    app.wsgi_app = TrustedProxies(boot, settings.trusted_proxies)  # type: ignore[method-assign]
    return app


def state_store_ahead(settings: Settings, board: HealthBoard) -> Callable[[Snapshot], None]:
    """What a Reloader does with each version it loads: rules with `once:` get their state
    store made then, if it is not there yet (bootrules.state.once.make_store_ahead)."""

    def prepare(snapshot: Snapshot) -> None:
        if snapshot.has_once:
            make_store_ahead(settings, board)

    return prepare


def probed_stores(settings: Settings) -> list[ProbedStore]:
    """The stores a prober tries for these settings: the `once:` state (whose identity must
    not change), and the machines seen if they are recorded (and live apart)."""
    stores = [ProbedStore("state", settings.state_location(), sticky_identity=True)]
    if settings.machines_keep:
        stores.append(ProbedStore("machines_seen", settings.machines_location(), sticky_identity=False))
    return stores


def _directory_of(path: str) -> str:
    import os

    return os.path.dirname(os.path.abspath(path))
