"""The boot endpoints: GET /boot.ipxe, GET /ipxe, GET /files/<token>/<name> and POST /done/<token>,
as bare WSGI.

/boot.ipxe and /ipxe, the two requests every booting machine makes, are answered by
`BootEndpoints`, a bare WSGI callable in front of Flask: Flask's per-request machinery
(request context, URL map, Response object) cost more than all of bootrules' own work
(docs/performance.md). Everything else goes on to Flask (bootrules.web.views, .status).
No endpoint takes a body: one announced larger than MAX_BODY, or sent in chunks, is
refused with 413 before it is read.
"""

from __future__ import annotations

import logging
import mimetypes
import os
import re
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, NamedTuple

from .. import values
from ..decide.engine import FILES_PATH, NO_MATCH_SCRIPT
from ..decide.render import render_entry
from ..decide.templating import RenderFailure, render_file
from ..errors import FactsError
from ..logs import escaped, log_decision, log_fields
from ..model import Facts, Rule, machine_names
from ..state.once import DONE, DONE_PATH, OnceGate, shown
from .answers import (CONTENT_TYPE, INTERNAL_ERROR, SCRIPT_TYPE, Answer, answer, http_date, request_url_root, respond,
                      send, text_headers)
from .firmware import DECISION_PATH, GRUB_DECISION_PATH, FirmwareFiles
from .proxies import WSGIApp

if TYPE_CHECKING:
    from ..services import Services

log = logging.getLogger("bootrules")

# /boot.ipxe.0: the same script under the name a PXE ROM is given by proxy DHCP.
ENTRY_PATHS = frozenset({"/boot.ipxe", "/boot.ipxe.0"})
METRICS_PATH = "/metrics"
# Answered off the server's loop, so that machines do not wait for them (serve.waitress_loop):
# a scrape of 100,000 rules' counts, pages that read the store, callbacks that write it.
SLOW_PATHS = frozenset({METRICS_PATH, "/ui/", "/api/", DONE_PATH})
# Entry scripts kept rendered, one per public URL. With --base-url there is one; otherwise
# the Host header names it, so the number kept is bounded.
ENTRY_SCRIPTS_KEPT = 64
PREPARED_KEPT = 4096  # rules whose answers are kept prepared; past it, the kept ones are dropped
MAX_BODY = 4096  # bytes; no endpoint needs a body
FILE_FIELDS = ("token", "machine", "file", "status")
TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_HEADER_UNSAFE = re.compile(r"[^A-Za-z0-9 ._:,'()/=-]")
TOO_LARGE = "413 Payload Too Large: bootrules takes no request body\n"
_PARAM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,40}")


class BootEndpoints:
    """The entry script, the decision and the done callback; anything else goes to `fallback`."""

    def __init__(self, services: "Services", fallback: WSGIApp) -> None:
        self.reloader = services.reloader
        self.once: OnceGate = services.once
        self.recorder = services.recorder
        self.metrics = services.metrics
        self.base_url = services.settings.base_url
        self.firmware = FirmwareFiles(services.settings)
        self.fallback = fallback
        self._entry_scripts: dict[tuple[str | None, ...], Answer] = {}
        # Per rule of the rules in force: its headers but Date, and its script's bytes when
        # every machine gets the same (no once:, no templates). Built at its first answer.
        self._prepared: dict[int, Prepared] = {}
        self._prepared_for: object = None
        self._source_name = ""  # the rules file's name, in X-Bootrules-Source

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
        elif path.startswith(FILES_PATH):
            answer = self.file
        elif path == GRUB_DECISION_PATH:
            answer = self.grub_decide
        else:
            found = self.firmware.handler(path)
            if found is None:
                return self.fallback(environ, start_response)
            answer = found
        method = environ.get("REQUEST_METHOD")
        if method not in ("GET", "HEAD"):
            return respond(start_response, "405 Method Not Allowed", "405 Method Not Allowed\n",
                            [("Allow", "GET, HEAD")], method)
        try:
            return answer(environ, start_response, method)
        except Exception:  # never a traceback to the machine; the log has it
            log.exception("unexpected error on %s", path)
            return respond(start_response, "500 Internal Server Error", INTERNAL_ERROR, (), method)

    def direct(self, environ: dict) -> Answer | None:
        """The answer to a plain GET of /ipxe or /boot.ipxe, without WSGI's start_response;
        None for any other request. (granian's worker asks here first: bootrules.serve.granian_worker.)"""
        if environ.get("REQUEST_METHOD") != "GET" or environ.get("CONTENT_LENGTH") not in (None, "", "0") \
                or environ.get("HTTP_TRANSFER_ENCODING"):
            return None
        path = environ.get("PATH_INFO")
        try:
            if path == DECISION_PATH:
                return self.decision(environ)
            if path in ENTRY_PATHS:
                return self.entryanswer(environ)
        except Exception:  # never a traceback to the machine; the log has it
            log.exception("unexpected error on %s", path)
            return answer("500 Internal Server Error", INTERNAL_ERROR)
        return None

    def entry(self, environ: dict, start_response: Callable[..., Any], method: str) -> Iterable[bytes]:
        """GET /boot.ipxe: the script DHCP points iPXE at; it calls /ipxe with the machine's facts."""
        return send(start_response, self.entryanswer(environ), method)

    def entryanswer(self, environ: dict) -> Answer:
        # The script depends on nothing else: a lookup by these spares working out the URL.
        key = (environ.get("HTTP_HOST"), environ.get("SERVER_NAME"), environ.get("SERVER_PORT"),
               environ.get("wsgi.url_scheme"), environ.get("SCRIPT_NAME"))
        found = self._entry_scripts.get(key)
        if found is None:
            try:
                url = (self.base_url or request_url_root(environ)) + DECISION_PATH
            except ValueError as error:
                return answer("400 Bad Request", f"{error}; set --base-url\n")
            if len(self._entry_scripts) >= ENTRY_SCRIPTS_KEPT:
                self._entry_scripts.clear()
            found = self._entry_scripts[key] = answer("200 OK", render_entry(url))
        status, headers, body = found
        return status, [("Date", http_date()), *headers[1:]], body

    def grub_decide(self, environ: dict, start_response: Callable[..., Any], method: str) -> Iterable[bytes]:
        """GET /grub/decide: the decision, in GRUB's language."""
        return self.decide(environ, start_response, method, grub=True)

    def decide(self, environ: dict, start_response: Callable[..., Any], method: str,
               grub: bool = False) -> Iterable[bytes]:
        """GET /ipxe: answer one decision request."""
        return send(start_response, self.decision(environ, grub), method)

    def decision(self, environ: dict, grub: bool = False) -> Answer:
        """One decision: its answer, log line, count and sighting."""
        started = time.perf_counter()
        client = environ.get("REMOTE_ADDR") or "-"
        try:
            facts, ignored = values.facts_from_query_string(environ.get("QUERY_STRING", ""))
        except FactsError as error:
            reason = str(error)
            log.info("client=%s bad request: reason=%s", client, escaped(reason))
            self.metrics.refused(time.perf_counter() - started)
            return answer("400 Bad Request", reason + "\n")
        try:
            facts["client"] = values.normalize_fact("client", client)
        except ValueError:
            pass  # a unix socket or similar: no client address to match on
        snapshot = self.reloader.snapshot
        request = MachineRequest(self, environ, facts, client)
        if snapshot is None:
            rule, script = None, NO_MATCH_SCRIPT
        elif grub:
            rule, script = snapshot.decide(facts, request, grub=True)
        else:
            rule, script = snapshot.decide(facts, request)
        prepared = self._prepare(snapshot, rule, grub)
        if prepared.body is not None and script is prepared.script:
            body, headers = prepared.body, [("Date", http_date()), *prepared.headers]
        else:  # a script of this machine's own: its token, its templates
            body = script.encode()
            headers = [("Date", http_date()), (CONTENT_TYPE, SCRIPT_TYPE), ("Content-Length", str(len(body))),
                       *prepared.headers[2:]]
        if request.failed:
            headers.append(("X-Bootrules-Template-Error", _HEADER_UNSAFE.sub("?", request.failed)[:200]))
        if ignored:
            # Names come from the client: only a safe alphabet is echoed into a header.
            shown = sorted({name if _PARAM_NAME.fullmatch(name) else "(unprintable)" for name in ignored})
            headers.append(("X-Bootrules-Ignored", ", ".join(shown)[:200]))
        rule_name, action = prepared.rule_name, prepared.action
        log_decision(client, facts.get("mac", "-"), rule_name, action)
        if self.recorder is not None:
            # Unknown: a catch-all (no match:) or no rule answered, and no `once:` rule has
            # finished with this machine (one that has knows it).
            self.recorder.saw(facts, client, rule_name, action,
                              (rule is None or not rule.selectors) and not request.done_by)
        self.metrics.decided(rule_name, action, time.perf_counter() - started)
        return "200 OK", headers, body

    def _prepare(self, snapshot: Any, rule: Rule | None, grub: bool) -> "Prepared":
        """What every answer of `rule` has in common (kept per rule of the rules in force)."""
        if snapshot is not self._prepared_for or len(self._prepared) >= PREPARED_KEPT:
            self._prepared, self._prepared_for = {}, snapshot
            # The file's base name: the full path says more about the server than a machine needs.
            self._source_name = os.path.basename(snapshot.ruleset.source) if snapshot is not None else ""
        key = -id(rule) if grub else id(rule)
        found = self._prepared.get(key)
        if found is not None and found.rule is rule:
            return found
        script: str | None = None
        if rule is None:
            named = [("X-Bootrules-Rule", "(none)"), ("X-Bootrules-Action", "exit")]
            if not grub:
                script = NO_MATCH_SCRIPT
        else:
            named = [
                ("X-Bootrules-Rule", rule.name),
                ("X-Bootrules-Action", rule.action_name),
                ("X-Bootrules-Source", f"{self._source_name}:{rule.line}"),
            ]
            if not grub:
                script = snapshot.plain_script(rule)
        body = script.encode() if script is not None else None
        length = str(len(body)) if body is not None else ""
        prepared = Prepared(rule, script, body, [(CONTENT_TYPE, SCRIPT_TYPE), ("Content-Length", length),
                                                 ("Cache-Control", "no-store"), *named], named[0][1], named[1][1])
        self._prepared[key] = prepared
        return prepared

    def file(self, environ: dict, start_response: Callable[..., Any], method: str) -> Iterable[bytes]:
        """GET /files/<token>/<name>: a file a rule serves, rendered for the machine the token
        was issued to. Unknown or forged: 404; expired: 410."""
        token, _, name = environ.get("PATH_INFO", "")[len(FILES_PATH):].partition("/")
        snapshot = self.reloader.snapshot
        served = [rule for rule in snapshot.ruleset.rules if rule.files] if snapshot is not None else []
        found = self.once.files_claim(token, served) if served else None
        if found is None or name not in found[0].files:
            return self._fileanswer(start_response, method, "404 Not Found", "404 Not Found: no such file\n", token,
                                     None, name)
        rule, claims, expired = found
        machine = claims.identities[0]
        if expired:
            return self._fileanswer(start_response, method, "410 Gone", "410 Gone: this files URL has expired; "
                                     "boot the machine again for a new one\n", token, machine, name)
        try:
            base = self.base_url or request_url_root(environ)
        except ValueError as error:
            return respond(start_response, "400 Bad Request", f"{error}; set --base-url\n", (), method)
        facts = {name.split(":", 1)[0]: name.split(":", 1)[1] for name in claims.identities}
        row = snapshot.ruleset.inventory.find(facts) if snapshot.ruleset.inventory is not None else None
        own = {"base": base, "rule": rule.name, "files": f"{base}{FILES_PATH}{token}/"}
        if rule.once is not None:
            own["done"] = f"{base}{DONE_PATH}{token}"
        try:
            body = render_file(snapshot.ruleset.files[name], snapshot.variables_of(rule, facts, row, own))
        except RenderFailure as failure:
            log.warning("files: rule %s file %s cannot be rendered for machine=%s: %s", rule.name, name, machine,
                        failure)
            self.metrics.template_failed()
            return self._fileanswer(start_response, method, "500 Internal Server Error",
                                     "500: this file cannot be rendered for this machine (see the bootrules log)\n",
                                     token, machine, name)
        return self._fileanswer(start_response, method, "200 OK", body, token, machine, name,
                                 mimetypes.guess_type(name)[0])

    def _fileanswer(self, start_response: Callable[..., Any], method: str, status: str, body: str, token: str,
                     machine: str | None, name: str, content_type: str | None = None) -> list[bytes]:
        """The answer to a file fetch, and its one log line (never the body: it may hold secrets)."""
        log_fields("files: token=%s machine=%s file=%s status=%s",
                   (shown(token) if TOKEN_SHAPE.fullmatch(token) else "-", machine or "-", escaped(name[:80]),
                    status.split(" ", 1)[0]), FILE_FIELDS)
        self.metrics.file_served(status.split(" ", 1)[0])
        data = body.encode()
        headers = text_headers(data)
        if content_type and not content_type.startswith("text/"):
            headers[1] = ("Content-Type", content_type)
        start_response(status, headers)
        return [] if method == "HEAD" else [data]

    def done(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        """POST /done/<token>: the installed machine reports done. GET is refused, so a crawler
        or a proxy's prefetch can never disarm a machine."""
        method = environ.get("REQUEST_METHOD")
        if method != "POST":
            return respond(start_response, "405 Method Not Allowed", "405 Method Not Allowed: POST to report done\n",
                            [("Allow", "POST")], method)
        token = environ.get("PATH_INFO", "")[len(DONE_PATH):]
        try:
            outcome = self.once.redeem(token, environ.get("REMOTE_ADDR") or "-")
        except Exception:  # never a traceback to the installer; the log has it
            log.exception("unexpected error on the done callback")
            return respond(start_response, "500 Internal Server Error", INTERNAL_ERROR, (), method)
        return respond(start_response, outcome.status, outcome.message + "\n", (), method)


class MachineRequest:
    """What one decision needs from its request (bootrules.decide.engine.Request): the URL
    machines reach bootrules at, `once:` and files tokens, and where failures are told."""

    __slots__ = ("endpoints", "environ", "facts", "client", "done_by", "failed", "_base")

    def __init__(self, endpoints: BootEndpoints, environ: dict, facts: Facts, client: str) -> None:
        self.endpoints = endpoints
        self.environ = environ
        self.facts = facts
        self.client = client
        self.done_by: list[str] = []  # the once: rules this machine has finished
        self.failed: str | None = None  # why a rule could not be rendered for it
        self._base: str | None | bool = False

    @property
    def base(self) -> str | None:
        if self._base is False:
            try:
                self._base = self.endpoints.base_url or request_url_root(self.environ)
            except ValueError as error:
                log.warning("no URL to give the machine (%s; set --base-url)", error)
                self._base = None
        return self._base  # type: ignore[return-value]

    def once_token(self, rule: Rule) -> str | None:
        if self.base is None:
            log.warning("once: rule %s skipped: no URL to report done to", rule.name)
            return None
        token = self.endpoints.once.token_for(rule, self.facts, self.client)
        if token is DONE:
            self.done_by.append(rule.name)
            return None
        return token

    def files_token(self, rule: Rule) -> str | None:
        return self.endpoints.once.files_token(rule, self.facts)

    def template_failed(self, rule: Rule, reason: str) -> None:
        self.failed = reason
        log.warning("template: rule %s cannot be rendered for machine=%s client=%s: %s", rule.name,
                    escaped(next(iter(machine_names(self.facts)), "-")), self.client, reason)
        self.endpoints.metrics.template_failed()


def _body_refused(environ: dict, start_response: Callable[..., Any]) -> list[bytes] | None:
    """413 for a body larger than MAX_BODY or of unknown length; None to go on."""
    length = environ.get("CONTENT_LENGTH") or "0"
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    if not chunked and length.isdigit() and int(length) <= MAX_BODY:
        return None
    return respond(start_response, "413 Payload Too Large", TOO_LARGE, [("Connection", "close")],
                    environ.get("REQUEST_METHOD"))


class Prepared(NamedTuple):
    """What every answer of one rule has in common: its headers but Date, and, when every
    machine gets the same script, that script and its bytes."""

    rule: Rule | None
    script: str | None
    body: bytes | None
    headers: list[tuple[str, str]]
    rule_name: str
    action: str
