"""The status page (/ui/) and the same data as JSON (/api/): which machines asked, what each
got, which ones no rule names yet, and the rule to paste for them.

Who booted what is nobody else's business: both answer loopback and --admin-allow networks
only, judged on the real peer address (through trusted proxies, as the `client` selector
is). A request that a proxy bootrules does not trust forwarded is refused: who sent it
cannot be known. Everything a machine sent is shown as text (Jinja escapes it), never in a
link or a script, and the pages allow no script at all (Content-Security-Policy).
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, render_template, request

from ..state import machines
from ..state.machines import Filter, Machine
from ..model import Exact, Glob, Rule
from .proxies import FORWARDING_HEADERS, PROXY_KEY, plain_address
from ..settings import Network, Settings
from .snippet import rule_to_paste
from ..state.store import StateError, Store, open_store
from ..values import TEXT_KEYS
from .boot import current_reloader, plain_text, request_url_root

ui = Blueprint("ui", __name__, url_prefix="/ui", static_folder="static", static_url_path="/static",
               template_folder="templates")
api = Blueprint("api", __name__, url_prefix="/api")

CHART_MINUTES = 60
ACTIONS = ("boot", "chain", "sanboot", "exit", "menu")  # the chart's colours, in stacking order
SECURITY_HEADERS = {
    # No script runs on these pages, whatever a machine managed to put in them.
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


# --------------------------------------------------------------------------- who may look


# This host's own loopback address: where a browser or curl on the server itself comes from.
# (Not all of 127.0.0.0/8: a local service may relay others' requests from 127.0.0.x.)
OWN_ADDRESSES = frozenset({"127.0.0.1", "::1"})


def admin_allowed(peer: str, networks: Iterable[Network]) -> bool:
    """Tell whether `peer` (the real client address) may see the status page."""
    address = plain_address(peer or "")
    if address is None:
        return False
    if address in OWN_ADDRESSES:
        return True
    parsed = ipaddress.ip_address(address)
    return any(parsed in network for network in networks)


def admin_only() -> Response | None:
    environ = request.environ
    if PROXY_KEY not in environ and any(header in environ for header in FORWARDING_HEADERS):
        return plain_text("403 Forbidden: this request came through a proxy bootrules does not trust, so who sent "
                          "it is unknown (start bootrules with --trusted-proxy ADDRESS)\n", 403)
    if not admin_allowed(environ.get("REMOTE_ADDR", ""), _settings().admin_allow):
        return plain_text("403 Forbidden: the status page answers this host (127.0.0.1, ::1) and --admin-allow "
                          "networks only\n", 403)
    return None


def secure(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


for blueprint in (ui, api):
    blueprint.before_request(admin_only)
    blueprint.after_request(secure)


# --------------------------------------------------------------------------- data


def _settings() -> Settings:
    return current_app.config["BOOTRULES_SETTINGS"]


@dataclass(frozen=True)
class Stores:
    """The stores a page reads: the machines seen, and the `once:` state (the same PostgreSQL,
    or two SQLite files)."""

    machines: Store
    once: Store


def reader() -> Stores | None:
    """The stores, opened for this app's reads; None while there are none yet (a page never
    creates a file)."""
    stores = current_app.extensions.get("bootrules.reader")
    if stores is None:
        settings = _settings()
        location = settings.machines_location()
        if "://" not in location and not os.path.exists(location):
            return None
        once = settings.state_location()
        machines_store = open_store(location)
        stores = Stores(machines_store, machines_store if once == location else open_store(once))
        current_app.extensions["bootrules.reader"] = stores
    return stores


def find_page(wanted: Filter, number: int, per_page: int) -> machines.Page | None:
    """One page of machines seen (None: no store yet); StateError if the store fails."""
    stores = reader()
    return None if stores is None else machines.page(stores.machines, wanted, number, per_page, stores.once)


def find_machine(name: str) -> Machine | None:
    """One machine seen, with its once: state (None: not seen); StateError if the store fails."""
    stores = reader()
    return None if stores is None else machines.one(stores.machines, name, stores.once)


def wanted_machines(arguments: Mapping[str, str]) -> tuple[Filter, int, int]:
    """The filter, page number and page size a list request asks for (bad values: defaults)."""
    def number(name: str, default: int) -> int:
        try:
            return max(1, int(arguments.get(name, default)))
        except ValueError:
            return default

    wanted = Filter(unknown=arguments.get("unknown") in ("1", "true", "on"),
                    rule=(arguments.get("rule") or None), text=arguments.get("q", "")[:100])
    return wanted, number("page", 1), min(number("per_page", machines.PAGE_SIZE), machines.MAX_PAGE_SIZE)


def preview_url(base: str, facts: Mapping[str, str]) -> str:
    """The /ipxe URL that asks as this machine did (free text as hex, as the entry script sends it)."""
    parameters = []
    for key, value in sorted(facts.items()):
        if key == "client":
            continue
        if key in TEXT_KEYS:
            parameters.append((f"{key}_hex", value.encode("utf-8").hex()))
        else:
            parameters.append((key, value))
    return f"{base}/ipxe?{urllib.parse.urlencode(parameters, safe=':')}"


def public_base() -> str:
    settings = _settings()
    if settings.base_url:
        return settings.base_url
    try:
        return request_url_root(request.environ)
    except ValueError:
        return f"http://{settings.host}:{settings.port}"


def preview_command(facts: Mapping[str, str], client: str | None) -> str:
    """`python app.py preview …` for this machine (values quoted for a POSIX shell)."""
    words = ["python", "app.py", "preview"]
    for key, value in sorted(facts.items()):
        if key != "client":
            words += [f"--{key}", value]
    if client:
        words += ["--client", client]
    return " ".join(shlex.quote(word) for word in words)


def taken_names() -> set[str]:
    snapshot = current_reloader().snapshot
    return {rule.name for rule in snapshot.ruleset.rules} if snapshot else set()


def machine_detail(machine: Machine) -> dict[str, Any]:
    return {**machine.public(), "rule_to_paste": rule_to_paste(machine.facts, machine.client, taken_names())
            if machine.unknown else None,
            "preview_url": preview_url(public_base(), machine.facts)}


# --------------------------------------------------------------------------- the overview


@dataclass(frozen=True)
class RuleRow:
    line: int
    name: str
    match: str
    action: str
    once: str | None
    hits: int


def match_summary(rule: Rule, shown: int = 3) -> str:
    if not rule.selectors:
        return "everyone (catch-all)"
    parts = []
    for selector in rule.selectors:
        texts = [pattern.value if isinstance(pattern, Exact) else pattern.text if isinstance(pattern, Glob)
                 else str(pattern.network) for pattern in selector.patterns]
        more = f" +{len(texts) - shown} more" if len(texts) > shown else ""
        parts.append(f"{selector.key}: {', '.join(texts[:shown])}{more}")
    return "; ".join(parts)


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    height: float
    action: str
    count: int
    minute: str


def decision_chart(counts: Mapping[tuple[int, str], int], now_minute: int, height: float = 96.0,
                   width: float = 9.0) -> tuple[list[Bar], int]:
    """Stacked bars, one a minute over the last CHART_MINUTES, and the tallest total."""
    first = now_minute - CHART_MINUTES + 1
    by_minute: dict[int, dict[str, int]] = {}
    for (minute, action), count in counts.items():
        if minute >= first:
            by_minute.setdefault(minute, {})[action] = by_minute.get(minute, {}).get(action, 0) + count
    tallest = max((sum(actions.values()) for actions in by_minute.values()), default=0)
    bars: list[Bar] = []
    if not tallest:
        return bars, 0
    order = {action: position for position, action in enumerate(ACTIONS)}
    for minute, actions in by_minute.items():
        x = (minute - first) * (width + 1)
        y = height
        for action, count in sorted(actions.items(), key=lambda item: order.get(item[0], len(order))):
            size = height * count / tallest
            y -= size
            bars.append(Bar(x, round(y, 2), round(size, 2), action if action in order else "other", count,
                            time.strftime("%H:%M", time.gmtime(minute * 60))))
    return bars, tallest


@ui.get("/")
def overview() -> str:
    reloader = current_reloader()
    snapshot = reloader.snapshot
    error, error_at = reloader.reload_status()
    hits: dict[str, float] = {}
    for (rule, _action), count in current_app.extensions["bootrules.metrics"].decision_totals().items():
        hits[rule] = hits.get(rule, 0) + count
    rules = [RuleRow(rule.line, rule.name, match_summary(rule), rule.action_name,
                     rule.once.label if rule.once else None, int(hits.get(rule.name, 0)))
             for rule in (snapshot.ruleset.rules if snapshot else ())]
    now_minute = int(time.time() // 60)
    totals, counts, store_error = None, {}, None
    stores = reader()
    try:
        if stores is not None:
            totals = machines.totals(stores.machines)
            counts = machines.per_minute(stores.machines, now_minute - CHART_MINUTES + 1)
    except StateError as failure:
        store_error = str(failure)
    bars, tallest = decision_chart(counts, now_minute)
    return render_template(
        "ui/overview.html", page="overview", snapshot=snapshot, rules_path=reloader.path, rules=rules,
        unmatched=int(hits.get(machines.NO_RULE, 0)), reload_error=error, reload_error_at=error_at, totals=totals,
        store_error=store_error, bars=bars, tallest=tallest, chart_minutes=CHART_MINUTES,
        actions=[action for action in ACTIONS if action in {row.action for row in rules} | {"exit"}],
        recording=_settings().machines_keep > 0, state_location=_shown_location(), now=time.time())


def _shown_location() -> str:
    location = _settings().machines_location()
    if "://" in location:  # a URL may carry a password
        parts = urllib.parse.urlsplit(location)
        return f"{parts.scheme}://{parts.hostname or ''}{':' + str(parts.port) if parts.port else ''}{parts.path}"
    return location


# --------------------------------------------------------------------------- machines


@ui.get("/machines")
def machine_list() -> str | tuple[str, int]:
    wanted, number, per_page = wanted_machines(request.args)
    found, store_error = None, None
    try:
        found = find_page(wanted, number, per_page)
    except StateError as failure:
        store_error = str(failure)
    snapshot = current_reloader().snapshot
    rule_names = [rule.name for rule in snapshot.ruleset.rules] if snapshot else []
    return render_template("ui/machines.html", page="machines", wanted=wanted, found=found, store_error=store_error,
                           rule_names=[*rule_names, machines.NO_RULE], per_page=per_page, now=time.time(),
                           recording=_settings().machines_keep > 0)


@ui.get("/machines/<machine>")
def machine_page(machine: str) -> str | tuple[str, int]:
    try:
        found = find_machine(machine)
    except StateError as failure:
        return render_template("ui/machine.html", page="machines", machine=None, store_error=str(failure)), 503
    if found is None:
        return render_template("ui/machine.html", page="machines", machine=None, store_error=None), 404
    detail = machine_detail(found)
    return render_template("ui/machine.html", page="machines", machine=found, detail=detail, store_error=None,
                           curl=f"curl -s '{detail['preview_url']}'",
                           preview=preview_command(found.facts, found.client), now=time.time())


@ui.app_template_filter("utc")
def _utc_filter(seconds: float | None) -> str:
    return machines.utc(seconds) or "-"


@ui.app_template_filter("ago")
def _ago_filter(seconds: float | None, now: float) -> str:
    if not seconds:
        return "-"
    delta = max(0, int(now - seconds))
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if delta >= size:
            return f"{delta // size} {unit} ago"
    return f"{delta} s ago"


# --------------------------------------------------------------------------- the API


@api.get("/machines")
def api_machines() -> Response | tuple[Response, int]:
    wanted, number, per_page = wanted_machines(request.args)
    try:
        found = find_page(wanted, number, per_page)
    except StateError as failure:
        return jsonify({"error": f"the state store is unavailable: {failure}"}), 503
    listed = [machine.public() for machine in found.machines] if found else []
    return jsonify({"machines": listed, "page": number, "per_page": per_page, "total": found.total if found else 0,
                    "pages": found.pages if found else 1})


@api.get("/machines/<machine>")
def api_machine(machine: str) -> Response | tuple[Response, int]:
    try:
        found = find_machine(machine)
    except StateError as failure:
        return jsonify({"error": f"the state store is unavailable: {failure}"}), 503
    if found is None:
        return jsonify({"error": "no such machine"}), 404
    return jsonify(machine_detail(found))
