"""The Flask views besides the status page: /healthz, /metrics, and one-line error answers."""

from __future__ import annotations

import logging
import os
import time

from flask import Response, current_app, request
from markupsafe import Markup
from werkzeug.exceptions import HTTPException

from ..logs import escaped
from ..services import services
from ..state.database import is_server
from .access import refusal
from .answers import INTERNAL_ERROR, text_headers
from .boot import METRICS_PATH

log = logging.getLogger("bootrules")

__all__ = ["METRICS_PATH", "healthz", "metrics_view", "plain_http_error", "internal_error", "plain_text", "visible"]


def plain_text(body: str, status: int = 200) -> Response:
    """A plain-text Flask response, with the same headers as the boot endpoints'."""
    data = body.encode()
    return Response(data, status=status, headers=text_headers(data))


def healthz() -> Response:
    """GET /healthz: 200 while valid rules are loaded; also shows the last reload error and
    which store is failing. It reads only what the prober and the workers reported, never a
    store, so it answers at once whatever the database does. The stores' error text (it may
    name the database's address) is shown to those who may see the status page only."""
    found = services()
    reloader = found.reloader
    snapshot = reloader.snapshot
    error, error_at = reloader.reload_status()
    if error:  # named as in X-Bootrules-Source: the file's base name, not where it lives
        shown = os.path.basename(reloader.path)
        error = [shown + line[len(reloader.path):] if line.startswith(reloader.path) else line for line in error]
    body = {
        "status": "ok" if snapshot and not error else ("degraded" if snapshot else "no-rules"),
        "rules_file": os.path.basename(reloader.path),
        "rules": len(snapshot.ruleset) if snapshot else 0,
        "loaded_at": snapshot.loaded_at.isoformat(timespec="seconds") if snapshot else None,
        "reload_error": error,
        "reload_error_at": error_at,
    }
    details = refusal(request.environ, found.settings) is None
    now = time.time()
    state = found.board.status("state")
    in_use = snapshot is not None and snapshot.has_once
    if in_use or state.degraded(now):
        failing = state.degraded(now)
        body["state"] = {"store": "postgresql" if is_server(found.settings.state_location()) else "sqlite",
                         "status": "error" if failing else "ok",
                         **({"error": state.shown_error if failing else None} if details else {})}
        if failing and in_use and body["status"] == "ok":
            body["status"] = "degraded"
    seen = found.board.status("machines_seen")
    if found.recorder is not None and seen.degraded(now):  # boots are answered as ever: not "degraded"
        body["machines_seen"] = {"status": "error", **({"error": seen.shown_error} if details else {})}
    response = current_app.json.response(body)
    response.status_code = 200 if snapshot else 503
    response.headers["Cache-Control"] = "no-store"
    return response


def metrics_view() -> Response:
    """GET /metrics: Prometheus text format, summed over all workers."""
    body, content_type = services().metrics.exposition()
    return Response(body, content_type=content_type, headers={"Cache-Control": "no-store"})


def plain_http_error(error: HTTPException) -> Response:
    """404, 405…: one plain line rather than an HTML page iPXE cannot use."""
    return plain_text(f"{error.code} {error.name}\n", error.code or 500)


def internal_error(error: Exception) -> Response:
    """Anything unexpected: logged with its traceback, answered with one line."""
    log.exception("unexpected error on path=%s", escaped(request.path))
    return plain_text(INTERNAL_ERROR, 500)


def visible(value: object) -> object:
    """Jinja's finalize: text shown with its control, format and bidi characters written out
    (`\\x1b`, `\\u202e`), as the command line shows them. HTML escaping alone leaves them
    in: `curl` of a page would drive the terminal, and U+202E turns text around on screen."""
    if isinstance(value, str) and not isinstance(value, Markup) and not value.isprintable():
        return "".join(char if char.isprintable() or char in "\n\t" else _written(char) for char in value)
    return value


def _written(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
