"""The boot endpoints: GET /boot.ipxe, GET /ipxe and POST /done/<token>, as bare WSGI.

/boot.ipxe and /ipxe, the two requests every booting machine makes, are answered by
`BootEndpoints`, a bare WSGI callable in front of Flask: Flask's per-request machinery
(request context, URL map, Response object) cost more than all of bootrules' own work
(docs/performance.md). Everything else goes on to Flask (bootrules.web.views, .status).
No endpoint takes a body: one announced larger than MAX_BODY, or sent in chunks, is
refused with 413 before it is read.
"""

from __future__ import annotations

import email.utils
import logging
import os
import re
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

from werkzeug.wsgi import get_host

from .. import values
from ..clock import PerSecond
from ..decide.engine import NO_MATCH_SCRIPT
from ..decide.render import render_entry
from ..errors import FactsError
from ..logs import escaped, log_decision
from ..model import Rule
from ..settings import HOST_PATTERN, PREFIX_PATTERN
from ..state.once import DONE, DONE_PATH
from .proxies import WSGIApp

if TYPE_CHECKING:
    from ..services import Services

log = logging.getLogger("bootrules")

SCRIPT_TYPE = "text/plain; charset=utf-8"
DECISION_PATH = "/ipxe"
# /boot.ipxe.0: the same script under the name a PXE ROM is given by proxy DHCP.
ENTRY_PATHS = frozenset({"/boot.ipxe", "/boot.ipxe.0"})
METRICS_PATH = "/metrics"
# Answered off the server's loop, so that machines do not wait for them (serve.waitress_loop):
# a scrape of 100,000 rules' counts, pages that read the store, callbacks that write it.
SLOW_PATHS = frozenset({METRICS_PATH, "/ui/", "/api/", DONE_PATH})
# Entry scripts kept rendered, one per public URL. With --base-url there is one; otherwise
# the Host header names it, so the number kept is bounded.
ENTRY_SCRIPTS_KEPT = 64
MAX_BODY = 4096  # bytes; no endpoint needs a body
INTERNAL_ERROR = "500 internal error (see the bootrules log)\n"
TOO_LARGE = "413 Payload Too Large: bootrules takes no request body\n"
_PARAM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,40}")


class BootEndpoints:
    """The entry script, the decision and the done callback; anything else goes to `fallback`."""

    def __init__(self, services: "Services", fallback: WSGIApp) -> None:
        self.reloader = services.reloader
        self.once = services.once
        self.recorder = services.recorder
        self.metrics = services.metrics
        self.base_url = services.settings.base_url
        self.fallback = fallback
        self._entry_scripts: dict[tuple[str | None, ...], str] = {}

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("CONTENT_LENGTH") or environ.get("HTTP_TRANSFER_ENCODING"):
            refused = _body_refused(environ, start_response)
            if refused is not None:
                return refused
        path = environ.get("PATH_INFO")
        if path == DECISION_PATH:
            answer = self.decide
        elif path in ENTRY_PATHS:
            answer = self.entry
        elif path.startswith(DONE_PATH):
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
        """GET /ipxe: answer one decision request."""
        started = time.perf_counter()
        client = environ.get("REMOTE_ADDR") or "-"
        try:
            facts, ignored = values.facts_from_query(values.parse_query(environ.get("QUERY_STRING", "")))
        except FactsError as error:
            reason = str(error)
            log.info("client=%s bad request: reason=%s", client, escaped(reason))
            self.metrics.refused(time.perf_counter() - started)
            return _respond(start_response, "400 Bad Request", reason + "\n", (), method)
        try:
            facts["client"] = values.normalize_fact("client", client)
        except ValueError:
            pass  # a unix socket or similar: no client address to match on
        snapshot = self.reloader.snapshot
        done_by: list[str] = []
        if snapshot is None:
            rule, script = None, NO_MATCH_SCRIPT
        elif snapshot.has_once:
            rule, script = snapshot.decide(facts, self._once_answer(environ, facts, client, done_by))
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
            # Unknown: a catch-all (no match:) or no rule answered, and no `once:` rule has
            # finished with this machine (one that has knows it).
            self.recorder.saw(facts, client, rule_name, action,
                              (rule is None or not rule.selectors) and not done_by)
        self.metrics.decided(rule_name, action, time.perf_counter() - started)
        return _respond(start_response, "200 OK", script, headers, method)

    def _once_answer(self, environ: dict, facts: dict, client: str,
                     done_by: list[str]) -> Callable[[Rule], str | None]:
        """For Snapshot.decide: the done URL for a `once:` rule that still answers this machine
        (a rule it has finished is added to `done_by`)."""
        gate = self.once

        def done_url(rule: Rule) -> str | None:
            try:
                base = self.base_url or request_url_root(environ)
            except ValueError as error:
                log.warning("once: rule %s skipped: no URL to report done to (%s; set --base-url)", rule.name, error)
                return None
            token = gate.token_for(rule, facts, client)
            if token is DONE:
                done_by.append(rule.name)
                return None
            return None if token is None else f"{base}{DONE_PATH}{token}"

        return done_url

    def done(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        """POST /done/<token>: the installed machine reports done. GET is refused, so a crawler
        or a proxy's prefetch can never disarm a machine."""
        method = environ.get("REQUEST_METHOD")
        if method != "POST":
            return _respond(start_response, "405 Method Not Allowed", "405 Method Not Allowed: POST to report done\n",
                            [("Allow", "POST")], method)
        token = environ.get("PATH_INFO", "")[len(DONE_PATH):]
        try:
            outcome = self.once.redeem(token, environ.get("REMOTE_ADDR") or "-")
        except Exception:  # never a traceback to the installer; the log has it
            log.exception("unexpected error on the done callback")
            return _respond(start_response, "500 Internal Server Error", INTERNAL_ERROR, (), method)
        return _respond(start_response, outcome.status, outcome.message + "\n", (), method)


def _body_refused(environ: dict, start_response: Callable[..., Any]) -> list[bytes] | None:
    """413 for a body larger than MAX_BODY or of unknown length; None to go on."""
    length = environ.get("CONTENT_LENGTH") or "0"
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    if not chunked and length.isdigit() and int(length) <= MAX_BODY:
        return None
    return _respond(start_response, "413 Payload Too Large", TOO_LARGE, [("Connection", "close")],
                    environ.get("REQUEST_METHOD"))


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
