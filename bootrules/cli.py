"""The command line: serve, check, preview, machines, rearm. Commands only; the work is done elsewhere.

Every option that is a setting (`--rules`, `--state`, …) comes from bootrules.settings'
one list, with its variable and default, whichever command takes it.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Callable

import click

from . import values
from .clock import utc
from .decide import matching
from .decide.engine import Snapshot
from .decide.lint import lint
from .errors import RulesError, SettingsError, StartError, StateError
from .rules.loader import load_rules
from .settings import BY_NAME, SETTINGS, Settings, environment_help

if TYPE_CHECKING:
    from .state import Stores

DEFAULT_RULES = BY_NAME["rules"].default


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """bootrules: answer iPXE with a boot script chosen by the rules in rules.yaml."""


cli.help = (
    f"{cli.help}\n\n\b\nEvery setting can also come from the environment:\n"
    f"{environment_help()}\nA flag given on the command line wins over the variable."
)


def settings_options(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add an option for each setting named (every setting if none is) to a command; the
    command turns what it was given into Settings with `load_settings`."""
    chosen = [BY_NAME[name] for name in names] if names else list(SETTINGS)

    def add(command: Callable[..., Any]) -> Callable[..., Any]:
        for setting in reversed(chosen):
            command = click.option(
                setting.flag, setting.name, default=None, multiple=setting.many,
                help=f"{setting.meaning.replace('`', '')} [env {setting.env}; default "
                     f"{setting.shown_default.replace('`', '')}]"
                     + ("; repeat, or separate with commas" if setting.many else ""),
            )(command)
        return command

    return add


def load_settings(given: dict[str, Any]) -> Settings:
    """Settings from a command's options and BOOTRULES_*; every wrong one in one clean error."""
    try:
        return Settings.load(given)
    except SettingsError as error:
        raise click.ClickException(f"invalid settings:\n{error}") from None


@cli.command()
@settings_options()
def serve(**given: Any) -> None:
    """Serve the rules over HTTP with waitress.

    The rules file is checked first; bootrules does not start on a broken file. Once
    running, edits are picked up within about a second (SIGHUP: at once), and a broken
    edit keeps the last good rules serving. With several workers a new process loads an
    edit once and forks new workers; the old ones finish what they have in hand first.

    Example:

        python app.py serve --rules /etc/bootrules/rules.yaml --host 0.0.0.0 --port 80
    """
    from .serve.launch import serve as run_server

    settings = load_settings(given)
    try:
        status = run_server(settings)
    except StartError as error:
        raise click.ClickException(str(error)) from None
    raise SystemExit(status)


@cli.command()
@click.argument("path", default=DEFAULT_RULES, type=click.Path(dir_okay=False))
@click.option("--strict", is_flag=True, help="Exit 1 on warnings too, not only on errors.")
@settings_options("ipxe_dir", "shim_file", "grub_file")
def check(path: str, strict: bool, **served: str | None) -> None:
    """Check a rules file: list every error as FILE:LINE (exit 1), then warnings.

    Warnings (exit 0 unless --strict) flag rules that can never match because an
    earlier rule always wins (an earlier catch-all, the same MAC twice, a glob or CIDR
    covering a later value), a file without a catch-all rule at the end, and a
    template's variable that some machines lack, or whose value (in their inventory
    row, or a default in the rule's vars:) the script cannot take.

    Example:

        python app.py check --strict rules.yaml
    """
    missing = load_settings(served).missing_binaries()
    if missing:
        click.echo("\n".join(f"{line}" for line in missing), err=True)
        raise SystemExit(1)
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
@settings_options("rules")
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
@click.option("--show-secrets", is_flag=True, help="Print secrets (CHAP passwords, secret inventory columns…) "
              "instead of ********.")
@click.option("--explain", is_flag=True, help="Also say why each rule above the answer did not match, and where "
              "each variable of its templates comes from.")
@click.option("--file", "file_name", metavar="NAME", help="Print this file of the rule's files: instead of the script.")
def preview(rules: str | None, show_secrets: bool, explain: bool, file_name: str | None, **given: str | None) -> None:
    """Print the script a machine would get, and which rule answered, without a server.

    The machine's inventory row counts as the server's would. Secrets are masked unless
    --show-secrets is given; URLs only a server knows read http://BASE and TOKEN.

    Examples:

        python app.py preview --mac 00:11:22:33:44:55 --platform efi

        python app.py preview --mac 52:54:00:12:34:56 --explain --file preseed.cfg
    """
    from .decide.preview import preview as preview_of
    from .decide.preview import preview_file
    from .decide.templating import RenderFailure

    rules_path = load_settings({"rules": rules}).rules
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
    snapshot = Snapshot(ruleset=ruleset, loaded_at=datetime.now(UTC))
    shown = preview_of(snapshot, facts, reveal=show_secrets)
    rule = shown.rule
    if shown.row is not None:
        row = shown.row.values if show_secrets else shown.row.shown()
        click.echo(f"# inventory ({shown.row.where}): " + " ".join(f"{key}={_quoted(value)}" for key, value in row.items()),
                   err=True)
    if rule is not None and rule.once is not None:
        click.echo(f"# rule '{rule.name}' has once: {rule.once.label}: it answers until the machine reports done "
                   "(python app.py machines shows which have)", err=True)
    if explain:
        for skipped, reason in matching.explain(ruleset.rules, shown.matching):
            if rule is not None and skipped is rule:
                break
            click.echo(f"# rule '{skipped.name}' (line {skipped.line}) did not match: {reason}", err=True)
        for name, value, source in shown.sources:
            click.echo(f"# variable {name} = {_quoted(value)}: {source}", err=True)
    where = f"rule '{rule.name}' ({ruleset.source}:{rule.line}), action {rule.action_name}" if rule else "no rule matched (exit)"
    click.echo(f"# answered by {where}", err=True)
    if shown.failed:
        click.echo(f"# the rule cannot be rendered for this machine: {shown.failed}", err=True)
    if file_name is None:
        click.echo(shown.script, nl=False)
        return
    try:
        _rule, text = preview_file(snapshot, facts, file_name, reveal=show_secrets)
    except (LookupError, RenderFailure) as error:
        raise click.ClickException(str(error)) from None
    click.echo(text, nl=False)


def _quoted(value: str) -> str:
    """A value as a terminal may show it: printable ASCII, escapes written out, quoted if it has spaces."""
    text = ascii(value)[1:-1]
    return f'"{text}"' if " " in text or not text else text


def _stores(rules: str | None, state: str | None) -> "Stores | None":
    """The stores the server uses; None if they are SQLite files that do not exist yet (a
    command that only looks must not create one)."""
    from .state import open_stores

    settings = load_settings({"rules": rules, "state": state})
    location = settings.state_location()
    if "://" not in location and not os.path.exists(location) and not os.path.exists(settings.machines_location()):
        click.echo(f"{location}: no state yet (no machine has booted)", err=True)
        return None
    return open_stores(settings, "command")


@cli.command()
@settings_options("rules", "state")
@click.option("--unknown", is_flag=True, help="Only machines no rule names: answered by a catch-all, or by no rule.")
@click.option("--once", "once_rows", is_flag=True, help="List the state of once: rules instead: one line per "
              "machine, rule and label, armed (installing) or done.")
@click.option("--expected", is_flag=True, help="List the machines of the inventory that never asked instead.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, for scripts.")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1, 10_000_000),
              help="At most this many machines, newest first.")
def machines(rules: str | None, state: str | None, unknown: bool, once_rows: bool, expected: bool, as_json: bool,
             limit: int) -> None:
    """List the machines that asked, newest first: what they sent, what they got, their
    once: state. Unknown machines (a catch-all or no rule answered them) are marked `?`.

    Examples:

        python app.py machines --unknown

        python app.py machines --once --state /var/lib/bootrules/state.db

        python app.py machines --expected
    """
    from .state.machine_store import Filter

    if expected:
        _list_expected(rules, state, as_json, limit)
        return
    stores = _stores(rules, state)
    if stores is None:
        return
    try:
        if once_rows:
            _list_once_rows(stores.once.rows(limit), as_json)
            return
        found = stores.machines.page(Filter(unknown=unknown), 1, limit, stores.once).machines
    except StateError as error:
        raise click.ClickException(f"cannot read the state store: {error}") from None
    finally:
        stores.close()
    if as_json:
        for machine in found:
            click.echo(json.dumps(machine.public(), sort_keys=True))
        return
    click.echo(f"  {'last seen':<20} {'machine':<44} {'serial':<16} {'product':<20} {'last answer':<28} once")
    for machine in found:
        facts = machine.facts
        answer = f"{machine.last_rule} ({machine.last_action})"
        once = " ".join(f"{row.rule}/{row.label}:{row.state}" for row in machine.once) or "-"
        click.echo(f"{'?' if machine.unknown else ' '} {utc(machine.last_seen):<20} {machine.machine:<44} "
                   f"{_cell(facts.get('serial'), 16)} {_cell(facts.get('product'), 20)} {_cell(answer, 28)} {once}")


def _list_expected(rules: str | None, state: str | None, as_json: bool, limit: int) -> None:
    """The machines of the inventory that never asked (the server's machines seen as the record)."""
    settings = load_settings({"rules": rules, "state": state})
    try:
        ruleset = load_rules(settings.rules)
    except RulesError as error:
        click.echo(str(error), err=True)
        raise SystemExit(1) from None
    inventory = ruleset.inventory
    if inventory is None or not len(inventory):
        raise click.ClickException(f"{settings.rules} names no inventory (inventory:)")
    stores = _stores(rules, state)
    try:
        seen = stores.machines.seen_names() if stores is not None else set()
    except StateError as error:
        raise click.ClickException(f"cannot read the state store: {error}") from None
    finally:
        if stores is not None:
            stores.close()
    missing = [row for row in inventory.rows if seen.isdisjoint(row.names)]
    for row in missing[:limit]:
        if as_json:
            click.echo(json.dumps({"names": list(row.names), "where": row.where, "columns": row.shown()}))
        else:
            click.echo(f"{' '.join(row.names):<60} {row.where}")
    if not as_json:
        click.echo(f"{len(missing)} of {len(inventory)} machines of the inventory never asked", err=True)


def _cell(value: str | None, width: int) -> str:
    """A machine's value in a fixed-width column: printable ASCII only (escapes shown), cut to fit."""
    text = ascii(value)[1:-1] if value else "-"
    return (text if len(text) <= width else text[:width - 1] + "…").ljust(width)


def _list_once_rows(rows: list, as_json: bool) -> None:
    if as_json:
        for row in rows:  # the token is a credential: never listed
            click.echo(json.dumps(row.public()))
        return
    click.echo(f"{'machine':<46} {'rule':<24} {'label':<20} {'state':<6} {'when':<20} from")
    for row in rows:
        moment = utc(row.done_at) if row.state == "done" else utc(row.issued_at)
        click.echo(f"{row.machine:<46} {row.rule:<24} {row.label:<20} {row.state:<6} {moment or '-':<20} "
                   f"{row.done_from or '-'}")


@cli.command()
@settings_options("rules", "state")
@click.option("--mac", help="The machine's MAC.")
@click.option("--uuid", help="The machine's SMBIOS UUID.")
@click.option("--rule", "rule", help="Only this rule (default: every rule).")
def rearm(rules: str | None, state: str | None, mac: str | None, uuid: str | None, rule: str | None) -> None:
    """Re-arm a machine: its next boot gets its `once:` rule again (to re-arm every machine of
    a rule, change the rule's `once:` label instead).

    Example:

        python app.py rearm --mac 52:54:00:12:34:56 --rule install-debian
    """
    from .logs import configure_logging

    if not mac and not uuid:
        raise click.UsageError("give --mac or --uuid (or both)")
    try:
        names = ([f"mac:{values.normalize_mac(mac)}"] if mac else []) + (
            [f"uuid:{values.normalize_uuid(uuid)}"] if uuid else [])
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    stores = _stores(rules, state)
    if stores is None:
        return
    try:
        rearmed = stores.once.rearm(names, rule)
    except StateError as error:
        raise click.ClickException(f"cannot write the state store: {error}") from None
    finally:
        stores.close()
    configure_logging()
    logging.getLogger("bootrules").info("once: rearm machine=%s rule=%s: %d row(s) re-armed", " ".join(names),
                                        rule or "(every rule)", rearmed)
    logging.shutdown()
    click.echo(f"re-armed {' '.join(names)} ({rearmed} row{'s' * (rearmed != 1)} re-armed): "
               "its next boot is answered by its once: rules again")


def main() -> None:
    """The `bootrules` console script."""
    cli()
