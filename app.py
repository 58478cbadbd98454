"""bootrules: tell network-booting machines what to do, from the ordered rules in rules.yaml.

    python app.py serve                   # serve ./rules.yaml on 127.0.0.1:8080
    python app.py check rules.yaml        # validate, listing every problem as file:line
    python app.py preview --mac 00:11:22:33:44:55   # print the script that machine gets

`create_app()` builds the WSGI app, so `waitress-serve --call app:create_app` and
`flask --app app run` work too; they read the settings from BOOTRULES_* variables.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import click
from flask import Flask
from werkzeug.exceptions import HTTPException

from bootrules import matching, values, web
from bootrules.lint import lint
from bootrules.loader import RulesError, load_rules
from bootrules.logs import LOG_FORMATS, configure_logging
from bootrules.metrics import MULTIPROC_ENV, DecisionCounts, Metrics, worker_exited
from bootrules.render import render_rule
from bootrules.store import RuleStore, Snapshot

log = logging.getLogger("bootrules")

DEFAULT_RULES = "rules.yaml"


def poll_interval_from_env() -> float:
    """Seconds between checks of the rules file, from BOOTRULES_POLL_INTERVAL (default 1)."""
    text = os.environ.get("BOOTRULES_POLL_INTERVAL", "1")
    try:
        seconds = float(text)
    except ValueError:
        raise web.ConfigError(f"BOOTRULES_POLL_INTERVAL={text!r} is not a number of seconds") from None
    if not 0 <= seconds <= 3600:
        raise web.ConfigError(f"BOOTRULES_POLL_INTERVAL={text!r} is out of range (0 to 3600 seconds; 0: never)")
    return seconds


def create_app(
    rules_path: str | None = None,
    *,
    base_url: str | None = None,
    trusted_proxies: Iterable[str] | None = None,
    poll_interval: float | None = None,
    store: RuleStore | None = None,
) -> Flask:
    """Build the bootrules WSGI app serving `rules_path` (default $BOOTRULES_RULES, then ./rules.yaml).

    `store` hands over rules loaded already (by `serve`, before it forks its workers).
    """
    env = os.environ
    configure_logging(env.get("BOOTRULES_LOG_FORMAT", "text"))  # a no-op if the host set logging up
    app = Flask(__name__)
    app.config["RULES_PATH"] = rules_path or env.get("BOOTRULES_RULES") or DEFAULT_RULES
    app.config["BASE_URL"] = web.parse_base_url(base_url if base_url is not None else env.get("BOOTRULES_BASE_URL"))
    proxies = web.parse_networks(
        trusted_proxies if trusted_proxies is not None else [env.get("BOOTRULES_TRUSTED_PROXIES", "")]
    )
    interval = poll_interval if poll_interval is not None else poll_interval_from_env()

    if store is None:
        store = RuleStore(app.config["RULES_PATH"], poll_interval=interval)
        store.reload()
    metrics = Metrics()
    if store.snapshot is not None:  # loaded already: report it, without counting a reload
        metrics.rules_loaded.set(len(store.snapshot.ruleset))
        metrics.last_reload.set(store.snapshot.loaded_at.timestamp())
    store.metrics = metrics
    store.start()
    app.extensions["bootrules"] = store
    app.extensions["bootrules.metrics"] = metrics

    app.add_url_rule("/healthz", "healthz", web.healthz)
    app.add_url_rule(web.METRICS_PATH, "metrics", web.metrics_view)
    app.register_error_handler(HTTPException, web.plain_http_error)
    app.register_error_handler(Exception, web.internal_error)
    # Outermost first: proxy headers are settled before /ipxe or Flask see the request.
    boot = web.BootEndpoints(store, app.wsgi_app, metrics, base_url=app.config["BASE_URL"])
    app.wsgi_app = web.TrustedProxies(boot, proxies)  # type: ignore[method-assign]
    return app


# --------------------------------------------------------------------------- command line


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """bootrules: answer iPXE with a boot script chosen by the rules in rules.yaml.

    \b
    Every setting can also come from the environment:
      BOOTRULES_RULES             rules file (default rules.yaml)
      BOOTRULES_HOST, _PORT       listen address (default 127.0.0.1:8080)
      BOOTRULES_BASE_URL          public URL for the entry script
      BOOTRULES_TRUSTED_PROXIES   proxies whose X-Forwarded-* is believed
      BOOTRULES_WORKERS           worker processes (default: one per core)
      BOOTRULES_CONNECTION_LIMIT  connections per worker (default 1000)
      BOOTRULES_CHANNEL_TIMEOUT   seconds before an idle connection closes (default 30)
      BOOTRULES_LOG_FORMAT        text or json (default text)
      BOOTRULES_POLL_INTERVAL     seconds between checks of the rules file (default 1)
    A flag given on the command line wins over the variable.
    """


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
@click.option("--workers", envvar="BOOTRULES_WORKERS", default=0, type=click.IntRange(0, 64),
              help="Worker processes sharing the port; 0 = one per CPU core [env BOOTRULES_WORKERS].")
@click.option("--connection-limit", envvar="BOOTRULES_CONNECTION_LIMIT", default=1000, show_default=True,
              type=click.IntRange(10, 100000), help="Open connections per worker [env BOOTRULES_CONNECTION_LIMIT].")
@click.option("--channel-timeout", envvar="BOOTRULES_CHANNEL_TIMEOUT", default=30, show_default=True,
              type=click.IntRange(1, 3600),
              help="Seconds an idle or stalled connection is kept [env BOOTRULES_CHANNEL_TIMEOUT].")
@click.option("--log-format", envvar="BOOTRULES_LOG_FORMAT", default="text", show_default=True,
              type=click.Choice(LOG_FORMATS), help="Log lines as text or as JSON objects [env BOOTRULES_LOG_FORMAT].")
def serve(rules_path: str, host: str, port: int, base_url: str | None, trusted_proxies: tuple[str, ...],
          workers: int, connection_limit: int, channel_timeout: int, log_format: str) -> None:
    """Serve the rules over HTTP with waitress.

    The rules file is checked first; bootrules does not start on a broken file. Once
    running, edits are picked up within about a second (SIGHUP: at once), and a broken
    edit keeps the last good rules serving. With several workers the parent loads an
    edit once and replaces the workers, which finish what they have in hand first.

    Example:

        python app.py serve --rules /etc/bootrules/rules.yaml --host 0.0.0.0 --port 80
    """
    from bootrules import server
    from bootrules.workers import Supervisor, exit_on_sigterm, listening_socket, retire_on_sigusr1

    configure_logging(log_format)
    # Until a worker installs its handler, SIGHUP (systemctl reload) must not kill us.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    workers = workers or os.cpu_count() or 1
    try:
        store = RuleStore(rules_path, poll_interval=poll_interval_from_env())
    except web.ConfigError as error:
        raise click.ClickException(str(error)) from None
    if not store.reload():
        problems = store.last_error or "cannot load the rules"
        raise click.ClickException(f"{rules_path} is not valid, not starting:\n{problems}")
    settings = {"base_url": base_url, "trusted_proxies": trusted_proxies}
    try:  # checked here, before any worker starts, so a typo is one clear error
        web.parse_base_url(base_url)
        web.parse_networks(trusted_proxies)
    except web.ConfigError as error:
        raise click.ClickException(str(error)) from None
    # waitress would strip X-Forwarded-* before the app sees them; TrustedProxies decides
    # instead, by the peer's address, so that CIDRs and several proxies work.
    # Idle and slow clients: waitress's defaults (100 connections, select(), which stops at
    # 1024 descriptors, and a 120 s idle timeout) let a few hundred silent connections lock
    # every machine out. poll() and a larger limit keep the door open; the timeout closes
    # the silent ones.
    options = {"ident": "bootrules", "clear_untrusted_proxy_headers": False,
               "connection_limit": connection_limit, "channel_timeout": channel_timeout,
               "asyncore_use_poll": True, "cleanup_interval": min(30, channel_timeout),
               "slow_paths": web.SLOW_PATHS}
    _raise_open_files_limit(connection_limit + 100)  # per process: each worker has its own
    try:
        sock = listening_socket(host, port)
    except OSError as error:
        raise click.ClickException(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    log.info("serving %d rules from %s on http://%s:%d/ with %d worker(s)", len(store.snapshot.ruleset),
             rules_path, host, sock.getsockname()[1], workers)

    if workers == 1:  # one process: it follows the file itself
        exit_on_sigterm()
        app = create_app(rules_path, store=store, **settings)
        signal.signal(signal.SIGHUP, lambda _signum, _frame: store.request_reload())
        server.run(server.create(app, sock, **options))
        return

    def serve_one(sock: socket.socket) -> None:
        store.poll_interval = 0  # the parent follows the file and replaces the workers
        app = create_app(rules_path, store=store, **settings)
        waitress_server = server.create(app, sock, **options)
        retire_on_sigusr1(waitress_server, grace=channel_timeout)
        server.run(waitress_server)

    runtime = _runtime_directory()
    try:
        store.status_path = os.path.join(runtime, "status.json")
        store.metrics = Metrics()  # the parent counts the reloads
        # The parent's watcher starts once the first workers are forked (threads and fork
        # do not mix); each successful reload then replaces the workers.
        supervisor = Supervisor(workers, sock, serve_one, started=store.start, exited=worker_exited)
        store.on_loaded = supervisor.request_replace
        signal.signal(signal.SIGHUP, lambda _signum, _frame: store.request_reload())
        status = supervisor.run()
    finally:
        store.stop()
        if runtime.startswith(tempfile.gettempdir()) and os.path.basename(runtime).startswith("bootrules-"):
            shutil.rmtree(runtime, ignore_errors=True)
    raise SystemExit(status)


@cli.command()
@click.argument("path", default=DEFAULT_RULES, type=click.Path(dir_okay=False))
@click.option("--strict", is_flag=True, help="Exit 1 on warnings too, not only on errors.")
def check(path: str, strict: bool) -> None:
    """Check a rules file: list every error as FILE:LINE (exit 1), then warnings.

    Warnings (exit 0 unless --strict) flag rules that can never match because an
    earlier rule always wins (an earlier catch-all, the same MAC twice, a glob or CIDR
    covering a later value), and a file without a catch-all rule at the end.

    Example:

        python app.py check --strict rules.yaml
    """
    try:
        ruleset = load_rules(path)
    except RulesError as error:
        click.echo(str(error), err=True)
        raise SystemExit(1) from None
    warnings = lint(ruleset)
    for warning in warnings:
        click.echo(warning.render(path), err=True)
    click.echo(f"{path}: {len(ruleset)} rules, no errors, {len(warnings)} warning{'s' * (len(warnings) != 1)}")
    if strict and warnings:
        raise SystemExit(1)


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
@click.option("--show-secrets", is_flag=True, help="Print secret settings (CHAP passwords…) instead of ********.")
@click.option("--explain", is_flag=True, help="Also say, for each rule above the answer, why it did not match.")
def preview(rules_path: str, show_secrets: bool, explain: bool, **given: str | None) -> None:
    """Print the script a machine would get, and which rule answered, without a server.

    Secret settings are masked unless --show-secrets is given.

    Example:

        python app.py preview --mac 00:11:22:33:44:55 --platform efi
    """
    try:
        ruleset = load_rules(rules_path)
        client = given.pop("client")
        facts, _ignored = values.facts_from_query({k: [v] for k, v in given.items() if v is not None})
        if client:
            facts["client"] = values.normalize_fact("client", client)
    except RulesError as error:
        click.echo(str(error), err=True)
        raise SystemExit(1) from None
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    rule, script = Snapshot(ruleset=ruleset, loaded_at=datetime.now(timezone.utc)).decide(facts)
    if rule is not None and not show_secrets:
        script = render_rule(rule, reveal_secrets=False)
    if explain:
        for skipped, reason in matching.explain(ruleset.rules, facts):
            click.echo(f"# rule '{skipped.name}' (line {skipped.line}) did not match: {reason}", err=True)
    where = f"rule '{rule.name}' ({ruleset.source}:{rule.line}), action {rule.action_name}" if rule else "no rule matched (exit)"
    click.echo(f"# answered by {where}", err=True)
    click.echo(script, nl=False)




def _runtime_directory() -> str:
    """A directory the parent and its workers share: metrics, and the reload status.

    An operator's own PROMETHEUS_MULTIPROC_DIR is used but emptied first: numbers left
    by an earlier run would otherwise be added to this one's.
    """
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        for pattern in ("*.db", "*" + DecisionCounts.FILE_SUFFIX):
            for stale in Path(given).glob(pattern):
                stale.unlink()
        return given
    made = tempfile.mkdtemp(prefix="bootrules-")
    os.environ[MULTIPROC_ENV] = made
    return made


def _raise_open_files_limit(wanted: int) -> None:
    """Let the process hold `wanted` descriptors, up to the hard limit the system allows."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


if __name__ == "__main__":
    cli()
