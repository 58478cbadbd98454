"""bootrules: tell network-booting machines what to do, from the ordered rules in rules.yaml.

    python app.py serve                   # serve ./rules.yaml on 127.0.0.1:8080
    python app.py check rules.yaml        # validate, listing every problem as file:line
    python app.py preview --mac 00:11:22:33:44:55   # print the script that machine gets

`create_app()` builds the WSGI app, so `waitress-serve --call app:create_app` and
`flask --app app run` work too; they read the settings from BOOTRULES_* variables.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import signal
import sys
import urllib.parse
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Sequence

import click
from flask import Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException

from bootrules import values
from bootrules.loader import RulesError, load_rules
from bootrules.render import render_entry
from bootrules.store import NO_MATCH_SCRIPT, RuleStore, Snapshot

log = logging.getLogger("bootrules")

DEFAULT_RULES = "rules.yaml"
SCRIPT_MIMETYPE = "text/plain; charset=utf-8"
# The peer names itself in the Host header; only this alphabet reaches the entry script.
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9-]{1,63})*\.?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_PREFIX = re.compile(r"(?:/[A-Za-z0-9._~-]+)*")


class ConfigError(Exception):
    """A setting given on the command line or in the environment is wrong."""


# --------------------------------------------------------------------------- configuration


def parse_networks(texts: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
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
    if parts.scheme not in ("http", "https") or not _HOST.fullmatch(parts.netloc or "") or not _PREFIX.fullmatch(
        parts.path.rstrip("/")
    ) or parts.query or parts.fragment:
        raise ConfigError(f"base URL {text!r} must look like http://host[:port][/path]")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


# --------------------------------------------------------------------------- proxies


class TrustedProxies:
    """WSGI middleware honouring X-Forwarded-* only when the peer is a trusted proxy.

    Anyone can send X-Forwarded-For; believing it from an untrusted peer would let a
    machine pick its own `client` address and so its own rules.
    """

    def __init__(self, app: Callable[..., Any], networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        self.app = app
        self.networks = tuple(networks)

    def trusted(self, address: str) -> bool:
        """Tell whether `address` belongs to a trusted proxy."""
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(parsed in network for network in self.networks)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        peer = environ.get("REMOTE_ADDR", "")
        if self.networks and self.trusted(peer):
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


# --------------------------------------------------------------------------- HTTP


def create_app(
    rules_path: str | None = None,
    *,
    base_url: str | None = None,
    trusted_proxies: Iterable[str] | None = None,
    poll_interval: float | None = None,
) -> Flask:
    """Build the bootrules WSGI app serving `rules_path` (default $BOOTRULES_RULES, then ./rules.yaml)."""
    env = os.environ
    _configure_logging()  # a no-op when the hosting server has set up logging already
    app = Flask(__name__)
    app.config["RULES_PATH"] = rules_path or env.get("BOOTRULES_RULES") or DEFAULT_RULES
    app.config["BASE_URL"] = parse_base_url(base_url if base_url is not None else env.get("BOOTRULES_BASE_URL"))
    proxies = parse_networks(
        trusted_proxies if trusted_proxies is not None else [env.get("BOOTRULES_TRUSTED_PROXIES", "")]
    )
    interval = poll_interval if poll_interval is not None else float(env.get("BOOTRULES_POLL_INTERVAL", "1"))

    store = RuleStore(app.config["RULES_PATH"], poll_interval=interval)
    store.reload()
    store.start()
    app.extensions["bootrules"] = store
    app.wsgi_app = TrustedProxies(app.wsgi_app, proxies)  # type: ignore[method-assign]

    app.add_url_rule("/boot.ipxe", "entry", entry_script)
    app.add_url_rule("/boot.ipxe.0", "entry_pxe", entry_script)
    app.add_url_rule("/ipxe", "decision", decision)
    app.add_url_rule("/healthz", "healthz", healthz)
    app.register_error_handler(HTTPException, plain_http_error)
    app.register_error_handler(Exception, internal_error)
    return app


def rule_store() -> RuleStore:
    """The RuleStore of the app handling this request."""
    return current_app.extensions["bootrules"]


def plain_text(body: str, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A text/plain response that no cache keeps (decisions change when rules.yaml does)."""
    response = Response(body, status=status, mimetype="text/plain")
    response.headers["Content-Type"] = SCRIPT_MIMETYPE
    response.headers["Cache-Control"] = "no-store"
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def public_url() -> str:
    """The URL machines reach this server at: configured, or as the request (via trusted proxies) names it."""
    configured = current_app.config["BASE_URL"]
    if configured:
        return configured
    host = request.host
    if not _HOST.fullmatch(host):
        raise ValueError("the Host header is not a host name")
    prefix = request.script_root
    if not _PREFIX.fullmatch(prefix):
        raise ValueError("the forwarded path prefix is not a plain path")
    return f"{request.scheme}://{host}{prefix}"


def entry_script() -> Response:
    """GET /boot.ipxe: the script DHCP points iPXE at; it calls /ipxe with the machine's facts."""
    try:
        url = public_url() + "/ipxe"
    except ValueError as error:
        return plain_text(f"{error}; set --base-url\n", 400)
    return plain_text(render_entry(url))


def decision() -> Response:
    """GET /ipxe?mac=…: the script the first matching rule gives this machine."""
    try:
        facts, ignored = values.facts_from_query(request.args.to_dict(flat=False))
    except values.FactsError as error:
        log.info("client=%s bad request: %s", request.remote_addr, error)
        return plain_text(f"{error}\n", 400)
    client = request.remote_addr
    if client:
        try:
            facts["client"] = values.normalize_address(client)
        except ValueError:
            pass  # a unix socket or similar: no client address to match on
    store = rule_store()
    snapshot: Snapshot | None = store.snapshot
    if snapshot is None:
        rule, script = None, NO_MATCH_SCRIPT
    else:
        rule, script = snapshot.decide(facts)
    headers = {
        "X-Bootrules-Rule": rule.name if rule else "(none)",
        "X-Bootrules-Action": rule.action_name if rule else "exit",
    }
    if rule is not None and snapshot is not None:
        headers["X-Bootrules-Source"] = f"{snapshot.ruleset.source}:{rule.line}"
    if ignored:
        headers["X-Bootrules-Ignored"] = ", ".join(sorted(ignored))[:200]
    log.info(
        "client=%s mac=%s rule=%s action=%s",
        client or "-",
        facts.get("mac", "-"),
        headers["X-Bootrules-Rule"],
        headers["X-Bootrules-Action"],
    )
    return plain_text(script, headers=headers)


def healthz() -> Response:
    """GET /healthz: 200 while valid rules are loaded; also shows the last reload error."""
    store = rule_store()
    snapshot = store.snapshot
    body: dict[str, Any] = {
        "status": "ok" if snapshot and not store.last_error else ("degraded" if snapshot else "no-rules"),
        "rules_file": store.path,
        "rules": len(snapshot.ruleset) if snapshot else 0,
        "loaded_at": snapshot.loaded_at.isoformat(timespec="seconds") if snapshot else None,
        "reload_error": list(store.last_error.problems) if store.last_error else None,
        "reload_error_at": store.last_error_at.isoformat(timespec="seconds") if store.last_error_at else None,
    }
    response = current_app.json.response(body)
    response.status_code = 200 if snapshot else 503
    response.headers["Cache-Control"] = "no-store"
    return response


def plain_http_error(error: HTTPException) -> Response:
    """404, 405…: one plain line rather than an HTML page iPXE cannot use."""
    return plain_text(f"{error.code} {error.name}\n", error.code or 500)


def internal_error(error: Exception) -> Response:
    """Anything unexpected: logged with its traceback, answered with one line."""
    log.exception("unexpected error on %s", request.path)
    return plain_text("500 internal error (see the bootrules log)\n", 500)


# --------------------------------------------------------------------------- command line


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """bootrules: answer iPXE with a boot script chosen by the rules in rules.yaml."""


@cli.command()
@click.option("--rules", "rules_path", envvar="BOOTRULES_RULES", default=DEFAULT_RULES, show_default=True,
              help="Rules file to serve [env BOOTRULES_RULES].")
@click.option("--host", envvar="BOOTRULES_HOST", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 for every interface [env BOOTRULES_HOST].")
@click.option("--port", envvar="BOOTRULES_PORT", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="TCP port [env BOOTRULES_PORT].")
@click.option("--base-url", envvar="BOOTRULES_BASE_URL", default=None,
              help="Public URL machines use, e.g. http://boot.example.com [env BOOTRULES_BASE_URL]. "
                   "Default: taken from each request (via trusted proxies).")
@click.option("--trusted-proxy", "trusted_proxies", envvar="BOOTRULES_TRUSTED_PROXIES", multiple=True,
              help="Address or CIDR of a reverse proxy whose X-Forwarded-* headers are believed; "
                   "repeat or separate with commas [env BOOTRULES_TRUSTED_PROXIES].")
@click.option("--threads", default=8, show_default=True, type=click.IntRange(1, 256), help="Waitress worker threads.")
def serve(rules_path: str, host: str, port: int, base_url: str | None, trusted_proxies: tuple[str, ...], threads: int) -> None:
    """Serve the rules over HTTP with waitress.

    The rules file is checked first; bootrules does not start on a broken file. Once
    running, edits are picked up within about a second (SIGHUP: at once), and a broken
    edit keeps the last good rules serving.

    Example:

        python app.py serve --rules /etc/bootrules/rules.yaml --host 0.0.0.0 --port 80
    """
    import waitress

    _configure_logging()
    try:
        load_rules(rules_path)
        app = create_app(rules_path, base_url=base_url, trusted_proxies=trusted_proxies)
    except RulesError as error:
        raise click.ClickException(f"{rules_path} is not valid, not starting:\n{error}") from None
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    store: RuleStore = app.extensions["bootrules"]
    signal.signal(signal.SIGHUP, lambda _signum, _frame: store.request_reload())
    log.info("serving %d rules from %s on http://%s:%d/", len(store.snapshot.ruleset) if store.snapshot else 0,
             rules_path, host, port)
    # waitress would strip X-Forwarded-* before the app sees them; TrustedProxies decides
    # instead, by the peer's address, so that CIDRs and several proxies work.
    waitress.serve(app, host=host, port=port, threads=threads, ident="bootrules", clear_untrusted_proxy_headers=False)


@cli.command()
@click.argument("path", default=DEFAULT_RULES, type=click.Path(dir_okay=False))
def check(path: str) -> None:
    """Check a rules file; list every problem as FILE:LINE and exit 1 if there is any.

    Example:

        python app.py check rules.yaml
    """
    try:
        ruleset = load_rules(path)
    except RulesError as error:
        click.echo(str(error), err=True)
        raise SystemExit(1) from None
    click.echo(f"{path}: {len(ruleset)} rules, no problems")


@cli.command()
@click.option("--rules", "rules_path", envvar="BOOTRULES_RULES", default=DEFAULT_RULES, show_default=True,
              help="Rules file [env BOOTRULES_RULES].")
@click.option("--mac")
@click.option("--uuid")
@click.option("--serial")
@click.option("--product")
@click.option("--manufacturer")
@click.option("--asset")
@click.option("--hostname")
@click.option("--platform", help="pcbios or efi")
@click.option("--buildarch", help="i386, x86_64, arm64…")
@click.option("--ip", help="The address iPXE reports for itself.")
@click.option("--client", help="The address the request comes from.")
def preview(rules_path: str, **given: str | None) -> None:
    """Print the script a machine would get, and which rule answered, without a server.

    Example:

        python app.py preview --mac 00:11:22:33:44:55 --platform efi
    """
    try:
        ruleset = load_rules(rules_path)
        client = given.pop("client")
        facts, _ignored = values.facts_from_query({k: [v] for k, v in given.items() if v is not None})
        if client:
            facts["client"] = values.normalize_address(client)
    except RulesError as error:
        click.echo(str(error), err=True)
        raise SystemExit(1) from None
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    rule, script = Snapshot(ruleset=ruleset, loaded_at=datetime.now(timezone.utc)).decide(facts)
    where = f"rule '{rule.name}' ({ruleset.source}:{rule.line}), action {rule.action_name}" if rule else "no rule matched (exit)"
    click.echo(f"# answered by {where}", err=True)
    click.echo(script, nl=False)


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


if __name__ == "__main__":
    cli()
