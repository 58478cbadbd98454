"""The HTTP layer: the boot endpoints, the Flask views, and the trusted-proxy check.

GET /boot.ipxe and GET /ipxe, the two requests every booting machine makes, are answered
by `BootEndpoints`, a bare WSGI callable in front of Flask. Flask's per-request machinery
(request context, URL map, Response object) cost more than all of bootrules' own work:
an entry script took 50 µs through Flask and a decision about 20 µs without it, and with
Flask two workers served 6,300 decisions a second where waitress alone manages about
15,000 (README, performance). Everything else (/healthz, /metrics, errors) goes through
Flask as usual.
"""

from __future__ import annotations

import email.utils
import ipaddress
import logging
import re
import time
import urllib.parse
from typing import Any, Callable, Iterable, Sequence

from flask import Response, current_app, request
from werkzeug.exceptions import HTTPException
from werkzeug.wsgi import get_host

from . import values
from .logs import log_decision
from .metrics import Metrics
from .render import render_entry
from .store import NO_MATCH_SCRIPT, RuleStore

log = logging.getLogger("bootrules")

WSGIApp = Callable[[dict, Callable[..., Any]], Iterable[bytes]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

SCRIPT_TYPE = "text/plain; charset=utf-8"
DECISION_PATH = "/ipxe"
# /boot.ipxe.0: the same script under the name a PXE ROM is given by proxy DHCP.
ENTRY_PATHS = frozenset({"/boot.ipxe", "/boot.ipxe.0"})
METRICS_PATH = "/metrics"
# Answered off the server's loop, so that machines do not wait for them (server.py).
SLOW_PATHS = frozenset({METRICS_PATH})
# Entry scripts kept rendered, one per public URL. With --base-url there is one; otherwise
# the Host header names it, so the number kept is bounded.
ENTRY_SCRIPTS_KEPT = 64
# The peer names itself in the Host header; only this alphabet reaches the entry script.
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9-]{1,63})*\.?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_PREFIX = re.compile(r"(?:/[A-Za-z0-9._~-]+)*")
_PARAM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,40}")


class ConfigError(Exception):
    """A setting given on the command line or in the environment is wrong."""


def parse_networks(texts: Iterable[str]) -> tuple[Network, ...]:
    """Parse trusted proxy addresses or CIDRs (commas or spaces between them)."""
    networks = []
    for text in texts:
        for item in re.split(r"[,\s]+", text.strip()):
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ConfigError(f"trusted proxy {item!r} is not an address or CIDR range") from None
    return tuple(networks)


def parse_base_url(text: str | None) -> str | None:
    """Check the public URL machines reach bootrules at (e.g. http://boot.example.com/pxe)."""
    if not text:
        return None
    parts = urllib.parse.urlsplit(text.strip())
    path = parts.path.rstrip("/")
    if (
        parts.scheme not in ("http", "https")
        or not _HOST.fullmatch(parts.netloc or "")
        or not _PREFIX.fullmatch(path)
        or parts.query
        or parts.fragment
    ):
        raise ConfigError(f"base URL {text!r} must look like http://host[:port][/path]")
    return f"{parts.scheme}://{parts.netloc}{path}"


# --------------------------------------------------------------------------- proxies


class TrustedProxies:
    """WSGI middleware honouring X-Forwarded-* only when the peer is a trusted proxy.

    Anyone can send X-Forwarded-For; believing it from an untrusted peer would let a
    machine pick its own `client` address and so its own rules.
    """

    def __init__(self, app: WSGIApp, networks: Sequence[Network]) -> None:
        self.app = app
        self.networks = tuple(networks)

    def trusted(self, address: str) -> bool:
        """Tell whether `address` belongs to a trusted proxy."""
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(parsed in network for network in self.networks)

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        if self.networks and self.trusted(environ.get("REMOTE_ADDR", "")):
            hops = [hop.strip() for hop in environ.get("HTTP_X_FORWARDED_FOR", "").split(",") if hop.strip()]
            # The client is the last address not added by one of our own proxies.
            while hops and self.trusted(hops[-1]):
                hops.pop()
            if hops:
                environ["REMOTE_ADDR"] = hops[-1]
            proto = environ.get("HTTP_X_FORWARDED_PROTO", "").split(",")[0].strip().lower()
            if proto in ("http", "https"):
                environ["wsgi.url_scheme"] = proto
            host = environ.get("HTTP_X_FORWARDED_HOST", "").split(",")[0].strip()
            if host:
                environ["HTTP_HOST"] = host
            prefix = environ.get("HTTP_X_FORWARDED_PREFIX", "").split(",")[0].strip().rstrip("/")
            if prefix:
                environ["SCRIPT_NAME"] = prefix
        return self.app(environ, start_response)


# --------------------------------------------------------------------------- GET /boot.ipxe, GET /ipxe


class BootEndpoints:
    """The entry script and the decision, as bare WSGI; anything else goes to `fallback`."""

    def __init__(self, store: RuleStore, fallback: WSGIApp, metrics: Metrics, base_url: str | None = None) -> None:
        self.store = store
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
            return _respond(start_response, "500 Internal Server Error",
                            "500 internal error (see the bootrules log)\n", (), method)

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
        snapshot = self.store.snapshot
        rule, script = snapshot.decide(facts) if snapshot is not None else (None, NO_MATCH_SCRIPT)
        if rule is None:
            headers = [("X-Bootrules-Rule", "(none)"), ("X-Bootrules-Action", "exit")]
        else:
            headers = [
                ("X-Bootrules-Rule", rule.name),
                ("X-Bootrules-Action", rule.action_name),
                ("X-Bootrules-Source", f"{snapshot.ruleset.source}:{rule.line}"),
            ]
        if ignored:
            # Names come from the client: only a safe alphabet is echoed into a header.
            shown = sorted({name if _PARAM_NAME.fullmatch(name) else "(unprintable)" for name in ignored})
            headers.append(("X-Bootrules-Ignored", ", ".join(shown)[:200]))
        mac, rule_name, action = facts.get("mac", "-"), headers[0][1], headers[1][1]
        log_decision(client, mac, rule_name, action)
        self.metrics.decided(rule_name, action, time.perf_counter() - started)
        return _respond(start_response, "200 OK", script, headers, method)


def request_url_root(environ: dict) -> str:
    """The URL this request reached bootrules at (as trusted proxies name it), without a path."""
    host = get_host(environ)
    if not _HOST.fullmatch(host):
        raise ValueError("the Host header is not a host name")
    prefix = environ.get("SCRIPT_NAME", "").rstrip("/")
    if not _PREFIX.fullmatch(prefix):
        raise ValueError("the forwarded path prefix is not a plain path")
    return f"{environ['wsgi.url_scheme']}://{host}{prefix}"


_date: tuple[int, str] = (0, "")


def http_date() -> str:
    """The Date header for now, formatted once a second.

    Given by the app, it spares waitress formatting one per response (5% of a worker's
    time in a boot storm, measured with py-spy).
    """
    global _date
    second = int(time.time())
    if _date[0] != second:
        _date = (second, email.utils.formatdate(second, usegmt=True))
    return _date[1]


def _respond(start_response: Callable[..., Any], status: str, body: str, headers: Iterable[tuple[str, str]],
             method: str | None) -> list[bytes]:
    data = body.encode()
    start_response(status, [
        ("Date", http_date()),
        ("Content-Type", SCRIPT_TYPE),
        ("Content-Length", str(len(data))),
        ("Cache-Control", "no-store"),
        *headers,
    ])
    return [] if method == "HEAD" else [data]


# --------------------------------------------------------------------------- Flask views


def rule_store() -> RuleStore:
    """The RuleStore of the app handling this request."""
    return current_app.extensions["bootrules"]


def plain_text(body: str, status: int = 200) -> Response:
    """A text/plain response that no cache keeps (scripts change when rules.yaml does)."""
    response = Response(body, status=status)
    response.headers["Content-Type"] = SCRIPT_TYPE
    response.headers["Cache-Control"] = "no-store"
    return response


def healthz() -> Response:
    """GET /healthz: 200 while valid rules are loaded; also shows the last reload error."""
    store = rule_store()
    snapshot = store.snapshot
    error, error_at = store.reload_status()
    body = {
        "status": "ok" if snapshot and not error else ("degraded" if snapshot else "no-rules"),
        "rules_file": store.path,
        "rules": len(snapshot.ruleset) if snapshot else 0,
        "loaded_at": snapshot.loaded_at.isoformat(timespec="seconds") if snapshot else None,
        "reload_error": error,
        "reload_error_at": error_at,
    }
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
    return plain_text("500 internal error (see the bootrules log)\n", 500)
