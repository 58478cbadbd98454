"""The HTTP layer: the boot endpoints, the Flask views, and the trusted-proxy check.

GET /boot.ipxe and GET /ipxe, the two requests every booting machine makes, are answered
by `BootEndpoints`, a bare WSGI callable in front of Flask. Flask's per-request machinery
(request context, URL map, Response object) cost more than all of bootrules' own work
(README, performance). Everything else (/healthz, /metrics, /done, errors) goes through
Flask or small handlers here.
"""

from __future__ import annotations

import email.utils
import logging
import os
import re
import time
from typing import Any, Callable, Iterable

from flask import Response, current_app, request
from werkzeug.exceptions import HTTPException
from werkzeug.wsgi import get_host

from .. import values
from ..clock import PerSecond
from ..decide.engine import NO_MATCH_SCRIPT
from ..logs import log_decision
from ..metrics import Metrics
from ..model import Rule
from ..state.once import DONE_PATH, OnceGate
from .proxies import WSGIApp
from ..state.recorder import Recorder
from ..decide.reloader import Reloader
from ..decide.render import render_entry
from ..settings import HOST_PATTERN, PREFIX_PATTERN

log = logging.getLogger("bootrules")

SCRIPT_TYPE = "text/plain; charset=utf-8"
DECISION_PATH = "/ipxe"
# /boot.ipxe.0: the same script under the name a PXE ROM is given by proxy DHCP.
ENTRY_PATHS = frozenset({"/boot.ipxe", "/boot.ipxe.0"})
METRICS_PATH = "/metrics"
# Answered off the server's loop, so that machines do not wait for them (server.py).
# (The status page and the API read the state store, which may take a while at 100,000 machines.)
SLOW_PATHS = frozenset({METRICS_PATH, "/ui/", "/api/"})
# Entry scripts kept rendered, one per public URL. With --base-url there is one; otherwise
# the Host header names it, so the number kept is bounded.
ENTRY_SCRIPTS_KEPT = 64
INTERNAL_ERROR = "500 internal error (see the bootrules log)\n"
_PARAM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,40}")


# --------------------------------------------------------------------------- GET /boot.ipxe, GET /ipxe


class BootEndpoints:
    """The entry script and the decision, as bare WSGI; anything else goes to `fallback`."""

    def __init__(self, reloader: Reloader, fallback: WSGIApp, metrics: Metrics, base_url: str | None = None,
                 once: OnceGate | None = None, recorder: Recorder | None = None) -> None:
        self.reloader = reloader
        self.once = once
        self.recorder = recorder
        self.fallback = fallback
        self.metrics = metrics
        self.base_url = base_url
        self._entry_scripts: dict[tuple[str | None, ...], str] = {}

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO")
        if path == DECISION_PATH:
            answer = self.decide
        elif path in ENTRY_PATHS:
            answer = self.entry
        elif path.startswith(DONE_PATH) and self.once is not None:
            return self.done(environ, start_response)
        else:
            return self.fallback(environ, start_response)
        method = environ.get("REQUEST_METHOD")
        if method not in ("GET", "HEAD"):
            return _respond(start_response, "405 Method Not Allowed", "405 Method Not Allowed\n",
                            [("Allow", "GET, HEAD")], method)
        try:
            return answer(environ, start_response, method)
        except Exception:  # never a traceback to the machine; the log has it
            log.exception("unexpected error on %s", path)
            return _respond(start_response, "500 Internal Server Error", INTERNAL_ERROR, (), method)

    def entry(self, environ: dict, start_response: Callable[..., Any], method: str) -> Iterable[bytes]:
        """GET /boot.ipxe: the script DHCP points iPXE at; it calls /ipxe with the machine's facts."""
        # The script depends on nothing else: a lookup by these spares working out the URL.
        key = (environ.get("HTTP_HOST"), environ.get("SERVER_NAME"), environ.get("SERVER_PORT"),
               environ.get("wsgi.url_scheme"), environ.get("SCRIPT_NAME"))
        script = self._entry_scripts.get(key)
        if script is None:
            try:
                url = (self.base_url or request_url_root(environ)) + DECISION_PATH
            except ValueError as error:
                return _respond(start_response, "400 Bad Request", f"{error}; set --base-url\n", (), method)
            if len(self._entry_scripts) >= ENTRY_SCRIPTS_KEPT:
                self._entry_scripts.clear()
            script = self._entry_scripts[key] = render_entry(url)
        return _respond(start_response, "200 OK", script, (), method)

    def decide(self, environ: dict, start_response: Callable[..., Any], method: str) -> Iterable[bytes]:
        """Answer one decision request."""
        started = time.perf_counter()
        client = environ.get("REMOTE_ADDR") or "-"
        try:
            facts, ignored = values.facts_from_query(values.parse_query(environ.get("QUERY_STRING", "")))
        except values.FactsError as error:
            reason = str(error)
            log.info("client=%s bad request: %s", client, reason)
            self.metrics.refused(time.perf_counter() - started)
            return _respond(start_response, "400 Bad Request", reason + "\n", (), method)
        try:
            facts["client"] = values.normalize_fact("client", client)
        except ValueError:
            pass  # a unix socket or similar: no client address to match on
        snapshot = self.reloader.snapshot
        if snapshot is None:
            rule, script = None, NO_MATCH_SCRIPT
        elif snapshot.has_once and self.once is not None:
            rule, script = snapshot.decide(facts, self._once_answer(environ, facts, client))
        else:
            rule, script = snapshot.decide(facts)
        if rule is None:
            headers = [("X-Bootrules-Rule", "(none)"), ("X-Bootrules-Action", "exit")]
        else:
            headers = [
                ("X-Bootrules-Rule", rule.name),
                ("X-Bootrules-Action", rule.action_name),
                # The file's base name: the full path says more about the server than a machine needs.
                ("X-Bootrules-Source", f"{os.path.basename(snapshot.ruleset.source)}:{rule.line}"),
            ]
        if ignored:
            # Names come from the client: only a safe alphabet is echoed into a header.
            shown = sorted({name if _PARAM_NAME.fullmatch(name) else "(unprintable)" for name in ignored})
            headers.append(("X-Bootrules-Ignored", ", ".join(shown)[:200]))
        mac, rule_name, action = facts.get("mac", "-"), headers[0][1], headers[1][1]
        log_decision(client, mac, rule_name, action)
        if self.recorder is not None:
            # A catch-all (no match:) or no rule at all: a machine the rules do not name yet.
            self.recorder.saw(facts, client, rule_name, action, rule is None or not rule.selectors)
        self.metrics.decided(rule_name, action, time.perf_counter() - started)
        return _respond(start_response, "200 OK", script, headers, method)


    def _once_answer(self, environ: dict, facts: dict, client: str) -> Callable[[Rule], str | None]:
        """For Snapshot.decide: the done URL for a `once:` rule that still answers this machine."""
        assert self.once is not None
        gate = self.once

        def done_url(rule: Rule) -> str | None:
            try:
                base = self.base_url or request_url_root(environ)
            except ValueError as error:
                log.warning("once: rule %s skipped: no URL to report done to (%s; set --base-url)", rule.name, error)
                return None
            token = gate.token_for(rule, facts, client)
            return None if token is None else f"{base}{DONE_PATH}{token}"

        return done_url

    def done(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        """POST /done/<token>: the installed machine reports done. GET is refused, so a crawler
        or a proxy's prefetch can never disarm a machine."""
        assert self.once is not None
        method = environ.get("REQUEST_METHOD")
        if method != "POST":
            return _respond(start_response, "405 Method Not Allowed", "405 Method Not Allowed: POST to report done\n",
                            [("Allow", "POST")], method)
        token = environ.get("PATH_INFO", "")[len(DONE_PATH):]
        try:
            snapshot = self.reloader.snapshot
            rules = snapshot.ruleset.rules if snapshot is not None and snapshot.has_once else ()
            outcome = self.once.redeem(token, environ.get("REMOTE_ADDR") or "-", rules)
        except Exception:  # never a traceback to the installer; the log has it
            log.exception("unexpected error on the done callback")
            return _respond(start_response, "500 Internal Server Error", INTERNAL_ERROR, (), method)
        return _respond(start_response, outcome.status, outcome.message + "\n", (), method)


def request_url_root(environ: dict) -> str:
    """The URL this request reached bootrules at (as trusted proxies name it), without a path."""
    if not environ.get("HTTP_HOST"):
        # The server would name itself instead (waitress: "waitress.invalid"), which no machine can reach.
        raise ValueError("the request has no Host header")
    host = get_host(environ)
    if not HOST_PATTERN.fullmatch(host):
        raise ValueError("the Host header is not a host name")
    prefix = environ.get("SCRIPT_NAME", "").rstrip("/")
    if not PREFIX_PATTERN.fullmatch(prefix):
        raise ValueError("the forwarded path prefix is not a plain path")
    return f"{environ['wsgi.url_scheme']}://{host}{prefix}"


# Given by the app, the Date header spares waitress formatting one per response.
http_date = PerSecond(lambda second: email.utils.formatdate(second, usegmt=True))


def text_headers(data: bytes, headers: Iterable[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """The headers of a plain-text answer that no cache keeps (scripts change with rules.yaml)."""
    return [("Date", http_date()), ("Content-Type", SCRIPT_TYPE), ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"), *headers]


def _respond(start_response: Callable[..., Any], status: str, body: str, headers: Iterable[tuple[str, str]],
             method: str | None) -> list[bytes]:
    data = body.encode()
    start_response(status, text_headers(data, headers))
    return [] if method == "HEAD" else [data]


# --------------------------------------------------------------------------- Flask views


def current_reloader() -> Reloader:
    """The Reloader of the app handling this request."""
    return current_app.extensions["bootrules"]


def plain_text(body: str, status: int = 200) -> Response:
    """A plain-text Flask response, with the same headers as the boot endpoints'."""
    data = body.encode()
    return Response(data, status=status, headers=text_headers(data))


def healthz() -> Response:
    """GET /healthz: 200 while valid rules are loaded; also shows the last reload error."""
    reloader = current_reloader()
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
    once = current_app.extensions.get("bootrules.once")
    in_use = snapshot is not None and snapshot.has_once
    if once is not None and (once.last_error or in_use):
        body["state"] = once.health(probe=in_use)
        if body["state"]["error"] and body["status"] == "ok":
            body["status"] = "degraded"
    recorder = current_app.extensions.get("bootrules.recorder")
    if recorder is not None and recorder.last_error:  # boots are answered as ever: not "degraded"
        body["machines_seen"] = {"status": "error", "error": recorder.last_error}
    response = current_app.json.response(body)
    response.status_code = 200 if snapshot else 503
    response.headers["Cache-Control"] = "no-store"
    return response


def metrics_view() -> Response:
    """GET /metrics: Prometheus text format, summed over all workers."""
    body, content_type = current_app.extensions["bootrules.metrics"].exposition()
    return Response(body, content_type=content_type, headers={"Cache-Control": "no-store"})


def plain_http_error(error: HTTPException) -> Response:
    """404, 405…: one plain line rather than an HTML page iPXE cannot use."""
    return plain_text(f"{error.code} {error.name}\n", error.code or 500)


def internal_error(error: Exception) -> Response:
    """Anything unexpected: logged with its traceback, answered with one line."""
    log.exception("unexpected error on %s", request.path)
    return plain_text(INTERNAL_ERROR, 500)
