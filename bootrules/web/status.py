"""The status page (/ui/) and the same data as JSON (/api/): which machines asked, what each
got, which ones no rule names yet, and the rule to paste for them.

Who may look is bootrules.web.access's call. Everything a machine sent is shown as text
(Jinja escapes it, and writes out control and bidi characters), never in a link or a
script, and the pages allow no script at all (Content-Security-Policy).
"""

from __future__ import annotations

import shlex
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, jsonify, render_template, request

from ..clock import utc
from ..decide.preview import preview
from ..errors import StateError
from ..model import Exact, Glob, Rule
from ..services import services
from ..state.database import shown_location
from ..state.machine_store import MAX_PAGE_SIZE, NO_RULE, PAGE_SIZE, Filter, Machine, Page
from ..values import TEXT_KEYS
from .access import refusal
from .answers import request_url_root
from .snippet import rule_to_paste
from .views import plain_text

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


MAX_PAGE = 1_000_000


class BadQuery(ValueError):
    """A list request's page or page size is not a number bootrules can use."""


def admin_only() -> Response | None:
    refused = refusal(request.environ, services().settings)
    return None if refused is None else plain_text(refused[1] + "\n", refused[0])


def secure(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


for blueprint in (ui, api):
    blueprint.before_request(admin_only)
    blueprint.after_request(secure)


# --------------------------------------------------------------------------- data


def find_page(wanted: Filter, number: int, per_page: int) -> Page | None:
    """One page of machines seen (None: no store yet); StateError if the store fails."""
    stores = services().page_stores()
    return None if stores is None else stores.machines.page(wanted, number, per_page, stores.once)


def find_machine(name: str) -> Machine | None:
    """One machine seen, with its once: state (None: not seen); StateError if the store fails."""
    stores = services().page_stores()
    return None if stores is None else stores.machines.one(name, stores.once)


def wanted_machines(arguments: Mapping[str, str]) -> tuple[Filter, int, int]:
    """The filter, page number and page size a list request asks for. A value that is not a
    number takes its default and a page size is capped, but a page beyond MAX_PAGE is
    BadQuery (no listing has that many; the database would be asked for an absurd offset)."""
    def number(name: str, default: int) -> int:
        try:
            return max(1, int(arguments.get(name, default)))
        except ValueError:
            return default

    wanted = Filter(unknown=arguments.get("unknown") in ("1", "true", "on"),
                    rule=(arguments.get("rule") or None), text=arguments.get("q", "")[:100])
    page = number("page", 1)
    if page > MAX_PAGE:
        raise BadQuery(f"page must be at most {MAX_PAGE}")
    return wanted, page, min(number("per_page", PAGE_SIZE), MAX_PAGE_SIZE)


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
    settings = services().settings
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
    snapshot = services().reloader.snapshot
    return {rule.name for rule in snapshot.ruleset.rules} if snapshot else set()


def machine_detail(machine: Machine) -> dict[str, Any]:
    snapshot = services().reloader.snapshot
    inventory = snapshot.ruleset.inventory if snapshot is not None else None
    row = inventory.find(machine.facts) if inventory is not None else None
    return {**machine.public(), "rule_to_paste": rule_to_paste(machine.facts, machine.client, taken_names())
            if machine.unknown else None,
            "preview_url": preview_url(public_base(), machine.facts),
            "inventory": {"where": row.where, "columns": row.shown()} if row is not None else None}


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
    found = services()
    reloader = found.reloader
    snapshot = reloader.snapshot
    error, error_at = reloader.reload_status()
    hits: dict[str, float] = {}
    for (rule, _action), count in found.metrics.decision_totals().items():
        hits[rule] = hits.get(rule, 0) + count
    rules = [RuleRow(rule.line, rule.name, match_summary(rule), rule.action_name,
                     rule.once.label if rule.once else None, int(hits.get(rule.name, 0)))
             for rule in (snapshot.ruleset.rules if snapshot else ())]
    now_minute = int(time.time() // 60)
    totals, counts, store_error = None, {}, None
    stores = found.page_stores()
    try:
        if stores is not None:
            totals = stores.machines.totals()
            counts = stores.machines.per_minute(now_minute - CHART_MINUTES + 1)
    except StateError as failure:
        store_error = str(failure)
    health = {part: found.board.status(part) for part in ("state", "machines_seen")}
    bars, tallest = decision_chart(counts, now_minute)
    return render_template(
        "ui/overview.html", page="overview", snapshot=snapshot, rules_path=reloader.path, rules=rules,
        unmatched=int(hits.get(NO_RULE, 0)), reload_error=error, reload_error_at=error_at, totals=totals,
        store_error=store_error, bars=bars, tallest=tallest, chart_minutes=CHART_MINUTES,
        actions=[action for action in ACTIONS if action in {row.action for row in rules} | {"exit"}],
        recording=found.settings.machines_keep > 0, state_location=shown_location(found.settings.machines_location()),
        health={part: status.shown_error for part, status in health.items() if status.degraded(time.time())},
        now=time.time())


# --------------------------------------------------------------------------- machines


@ui.get("/machines")
def machine_list() -> str | tuple[str, int] | Response:
    try:
        wanted, number, per_page = wanted_machines(request.args)
    except BadQuery as error:
        return plain_text(f"400 Bad Request: {error}\n", 400)
    found, store_error = None, None
    try:
        found = find_page(wanted, number, per_page)
    except StateError as failure:
        store_error = str(failure)
    snapshot = services().reloader.snapshot
    rule_names = [rule.name for rule in snapshot.ruleset.rules] if snapshot else []
    return render_template("ui/machines.html", page="machines", wanted=wanted, found=found, store_error=store_error,
                           rule_names=[*rule_names, NO_RULE], per_page=per_page, now=time.time(),
                           recording=services().settings.machines_keep > 0)


@ui.get("/machines/<machine>")
def machine_page(machine: str) -> str | tuple[str, int]:
    try:
        found = find_machine(machine)
    except StateError as failure:
        return render_template("ui/machine.html", page="machines", machine=None, store_error=str(failure)), 503
    if found is None:
        return render_template("ui/machine.html", page="machines", machine=None, store_error=None), 404
    detail = machine_detail(found)
    snapshot = services().reloader.snapshot
    rendered = None
    if snapshot is not None:
        facts = {**found.facts, **({"client": found.client} if found.client else {})}
        rendered = preview(snapshot, facts)
    return render_template("ui/machine.html", page="machines", machine=found, detail=detail, store_error=None,
                           curl=f"curl -s '{detail['preview_url']}'", rendered=rendered,
                           inventory=rendered.row if rendered else None,
                           preview=preview_command(found.facts, found.client), now=time.time())


MAX_EXPECTED_SHOWN = 1000


def expected_not_seen() -> tuple[list, int]:
    """The inventory rows of machines that never asked, and how many rows the inventory has;
    StateError if the store fails."""
    snapshot = services().reloader.snapshot
    inventory = snapshot.ruleset.inventory if snapshot is not None else None
    if inventory is None or not len(inventory):
        return [], 0
    stores = services().page_stores()
    seen = stores.machines.seen_names() if stores is not None else set()
    return [row for row in inventory.rows if seen.isdisjoint(row.names)], len(inventory)


@ui.get("/expected")
def expected() -> str:
    """Machines of the inventory that never asked: the first thing to look at after powering on a rack."""
    missing, rows, store_error = [], 0, None
    try:
        missing, rows = expected_not_seen()
    except StateError as failure:
        store_error = str(failure)
    return render_template("ui/expected.html", page="expected", missing=missing, inventory_rows=rows,
                           shown=MAX_EXPECTED_SHOWN, store_error=store_error, now=time.time(),
                           recording=services().settings.machines_keep > 0)


@ui.app_template_filter("utc")
def _utc_filter(seconds: float | None) -> str:
    return utc(seconds) or "-"


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
    try:
        wanted, number, per_page = wanted_machines(request.args)
    except BadQuery as error:
        return jsonify({"error": str(error)}), 400
    try:
        found = find_page(wanted, number, per_page)
    except StateError as failure:
        return jsonify({"error": f"the state store is unavailable: {failure}"}), 503
    listed = [machine.public() for machine in found.machines] if found else []
    return jsonify({"machines": listed, "page": number, "per_page": per_page, "total": found.total if found else 0,
                    "pages": found.pages if found else 1})


@api.get("/expected")
def api_expected() -> Response | tuple[Response, int]:
    try:
        missing, rows = expected_not_seen()
    except StateError as failure:
        return jsonify({"error": f"the state store is unavailable: {failure}"}), 503
    return jsonify({"inventory": rows, "not_seen": [{"names": list(row.names), "where": row.where,
                                                      "columns": row.shown()} for row in missing]})


@api.get("/machines/<machine>")
def api_machine(machine: str) -> Response | tuple[Response, int]:
    try:
        found = find_machine(machine)
    except StateError as failure:
        return jsonify({"error": f"the state store is unavailable: {failure}"}), 503
    if found is None:
        return jsonify({"error": "no such machine"}), 404
    return jsonify(machine_detail(found))
