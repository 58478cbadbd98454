"""The WSGI app: `create_app` wires the settings, the rules, the metrics and the HTTP layer."""

from __future__ import annotations

from typing import Any, Iterable

from flask import Flask, redirect
from werkzeug.exceptions import HTTPException

from .web import boot as web
from .logs import configure_logging
from .metrics import Metrics
from .state.once import OnceGate
from .web.proxies import TrustedProxies
from .state.recorder import Recorder
from .decide.reloader import Reloader
from .settings import Settings


def create_app(
    rules_path: str | None = None,
    *,
    base_url: str | None = None,
    trusted_proxies: Iterable[str] | None = None,
    poll_interval: float | None = None,
    settings: Settings | None = None,
    reloader: Reloader | None = None,
    metrics: Metrics | None = None,
) -> Flask:
    """Build the bootrules WSGI app.

    Settings come from `settings`, or else from the arguments given and BOOTRULES_*
    variables (so `waitress-serve --call app:create_app` and `flask --app app run` work).
    `reloader` and `metrics` hand over rules loaded already (by `serve`, before it forks);
    whoever hands a reloader over decides whether it follows the file.
    Raises SettingsError for a wrong setting.
    """
    if settings is None:
        given: dict[str, Any] = {"rules": rules_path, "base_url": base_url, "poll_interval": poll_interval,
                                 "trusted_proxies": tuple(trusted_proxies) if trusted_proxies is not None else None}
        settings = Settings.load(given)
    configure_logging(settings.log_format)  # a no-op if the host set logging up
    app = Flask("bootrules")
    app.config["BOOTRULES_SETTINGS"] = settings

    if metrics is None:
        metrics = Metrics()
    if reloader is None:  # this app follows the file itself
        reloader = Reloader(settings.rules, settings.poll_interval, metrics=metrics)
        reloader.reload()
        reloader.start()
    elif reloader.snapshot is not None:  # loaded (and followed) by the caller: report it, not a reload
        metrics.rules_loaded.set(len(reloader.snapshot.ruleset))
        metrics.last_reload.set(reloader.snapshot.loaded_at.timestamp())
    # Opened in the process that first needs it, and only if a rule has `once:`.
    once = OnceGate(settings.state_location(), settings.once_expires, metrics)
    app.extensions["bootrules"] = reloader
    app.extensions["bootrules.metrics"] = metrics
    app.extensions["bootrules.once"] = once
    # Machines seen, written in batches by a thread of the process that answers them.
    recorder = None
    if settings.machines_keep:
        recorder = Recorder(settings.machines_location(), settings.machines_keep, settings.machines_max, metrics)
    app.extensions["bootrules.recorder"] = recorder

    app.add_url_rule("/healthz", "healthz", web.healthz)
    app.add_url_rule(web.METRICS_PATH, "metrics", web.metrics_view)
    from .web.status import api, ui

    app.register_blueprint(ui)
    app.register_blueprint(api)
    app.add_url_rule("/ui", "ui_root", lambda: redirect("ui/"))  # relative: kept under a proxy's prefix
    app.register_error_handler(HTTPException, web.plain_http_error)
    app.register_error_handler(Exception, web.internal_error)
    # Outermost first: proxy headers are settled before /ipxe or Flask see the request.
    boot = web.BootEndpoints(reloader, app.wsgi_app, metrics, base_url=settings.base_url, once=once,
                             recorder=recorder)
    app.wsgi_app = TrustedProxies(boot, settings.trusted_proxies)  # type: ignore[method-assign]
    return app
