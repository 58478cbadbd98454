"""The machines seen: what bootrules keeps of each machine that asked, and how it is read.

One row per machine (its identity as `once:` names it: the SMBIOS UUID when real, else the
MAC; a request with neither is kept under its client address). A row holds the facts of
the machine's last request, first and last seen, how many decisions, the last rule and
action, whether that answer came from a catch-all or from no rule ("unknown"), and its
recent decisions. Rows are written in batches by bootrules.state.recorder, never by a request.

A row's recent decisions are kept as text, newest first, one JSON array a line, cut at
RECENT_CHARS: the database appends a batch's lines in the same statement that updates the
row, so two workers (or two servers) recording one machine never lose each other's lines.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..clock import utc
from ..logs import JSON_AS_IS
from ..model import Facts, machine_names
from .database import Database
from .once_store import OnceRow, OnceStore

RECENT_CHARS = 1200  # about 20 decisions a machine
MINUTES_KEPT = 24 * 60  # rows of the decisions-per-minute chart
PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
NO_RULE = "(none)"  # the rule name recorded when no rule matched (as X-Bootrules-Rule says)

_encode = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode
_COLUMNS = ("machine, mac, serial, facts, client, first_seen, last_seen, decisions, last_rule, last_action, "
            "unknown, recent")


class Sighting:
    """What one worker saw of one machine since its last batch was written (coalesced).

    Made and updated on the request path, so it only keeps references; formatting waits
    for the batch to be written.
    """

    __slots__ = ("facts", "client", "first_seen", "last_seen", "decisions", "rule", "action", "unknown", "recent")
    RECENT_KEPT = 20

    def __init__(self, facts: Facts, client: str, when: float, rule: str, action: str, unknown: bool) -> None:
        self.facts, self.client, self.first_seen, self.last_seen = facts, client, when, when
        self.decisions = 1
        self.rule, self.action, self.unknown = rule, action, unknown
        self.recent = [(when, rule, action, client)]  # oldest first

    def add(self, facts: Facts, client: str, when: float, rule: str, action: str, unknown: bool) -> None:
        self.facts, self.client, self.last_seen = facts, client, when
        self.decisions += 1
        self.rule, self.action, self.unknown = rule, action, unknown
        self.recent.append((when, rule, action, client))
        if len(self.recent) > self.RECENT_KEPT:
            del self.recent[0]

    def merge_older(self, older: "Sighting") -> None:
        """Take in what `older` saw before this (a batch the store refused)."""
        self.first_seen = older.first_seen
        self.decisions += older.decisions
        self.recent[:0] = older.recent
        del self.recent[:-self.RECENT_KEPT]


def recent_line(when: float, rule: str, action: str, client: str) -> str:
    """One decision as a line of the `recent` column (a JSON array)."""
    if JSON_AS_IS.fullmatch(rule) and JSON_AS_IS.fullmatch(client):
        return f'[{when:.3f},"{rule}","{action}","{client}"]\n'
    return json.dumps([round(when, 3), rule, action, client]) + "\n"


@dataclass(frozen=True)
class Decision:
    at: float
    rule: str
    action: str
    client: str


@dataclass(frozen=True)
class Machine:
    """One machine as the status page and the API show it."""

    machine: str
    facts: Mapping[str, str]
    client: str | None
    first_seen: float
    last_seen: float
    decisions: int
    last_rule: str | None
    last_action: str | None
    unknown: bool
    recent: tuple[Decision, ...]
    once: tuple[OnceRow, ...] = ()

    @classmethod
    def from_record(cls, record: Sequence[Any]) -> Machine:
        (machine, _mac, _serial, facts, client, first_seen, last_seen, decisions, last_rule, last_action, unknown,
         recent) = record
        facts = json.loads(facts)
        facts.pop("client", None)  # kept beside the facts
        return cls(machine, facts, client, first_seen, last_seen, int(decisions), last_rule, last_action,
                   bool(unknown), tuple(_parse_recent(recent)))

    def public(self) -> dict[str, Any]:
        """As JSON for the API and `machines --json` (no token: it is a credential)."""
        return {
            "machine": self.machine, "facts": dict(self.facts), "client": self.client,
            "first_seen": utc(self.first_seen), "last_seen": utc(self.last_seen), "decisions": self.decisions,
            "last_rule": self.last_rule, "last_action": self.last_action, "unknown": self.unknown,
            "once": [{key: value for key, value in row.public().items() if key != "machine"} for row in self.once],
        }

    @property
    def done_by(self) -> tuple[str, ...]:
        """The rules whose `once:` this machine has finished."""
        return tuple(sorted({row.rule for row in self.once if row.state == "done"}))


def _parse_recent(text: str) -> Iterable[Decision]:
    for line in text.splitlines():
        try:
            at, rule, action, client = json.loads(line)
        except (ValueError, TypeError):
            continue  # the line cut at RECENT_CHARS
        yield Decision(float(at), str(rule), str(action), str(client))


@dataclass(frozen=True)
class Filter:
    """Which machines a list shows: `unknown` only, answered last by `rule`, or whose MAC,
    serial or identity contains `text`."""

    unknown: bool = False
    rule: str | None = None
    text: str = ""

    def where(self) -> tuple[str, list[Any]]:
        clauses, parameters = [], []
        if self.unknown:
            clauses.append("unknown = 1")
        if self.rule:
            clauses.append("last_rule = ?")
            parameters.append(self.rule)
        text = self.text.strip().casefold()
        if text:
            like = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            clauses.append("(mac LIKE ? ESCAPE '\\' OR serial LIKE ? ESCAPE '\\' OR machine LIKE ? ESCAPE '\\')")
            parameters += [like, like, like]
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", parameters


@dataclass(frozen=True)
class Page:
    machines: tuple[Machine, ...]
    total: int
    page: int
    per_page: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))


@dataclass(frozen=True)
class Totals:
    machines: int
    unknown: int


_UPSERT = (
    f"INSERT INTO bootrules_machines ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (machine) DO UPDATE SET mac = excluded.mac, serial = excluded.serial, facts = excluded.facts, "
    "client = excluded.client, last_seen = excluded.last_seen, "
    "decisions = bootrules_machines.decisions + excluded.decisions, last_rule = excluded.last_rule, "
    "last_action = excluded.last_action, unknown = excluded.unknown, "
    f"recent = substr(excluded.recent || bootrules_machines.recent, 1, {RECENT_CHARS})")
_COUNT_MINUTE = ("INSERT INTO bootrules_minutes (minute, action, decisions) VALUES (?, ?, ?) "
                 "ON CONFLICT (minute, action) DO UPDATE SET decisions = bootrules_minutes.decisions + excluded.decisions")


class MachineStore:
    """The machines seen and the decisions per minute: written in batches, read by pages."""

    def __init__(self, database: Database) -> None:
        self.database = database

    @property
    def kind(self) -> str:
        return self.database.kind

    def close(self) -> None:
        self.database.close()

    # ------------------------------------------------------------ writing (bootrules.state.recorder)

    def write(self, batch: Mapping[str, Sighting], minutes: Mapping[tuple[int, str], int]) -> None:
        """Write one batch of sightings and per-minute counts, in one transaction."""
        rows = []
        for machine, seen in batch.items():
            facts = seen.facts
            rows.append((machine, facts.get("mac"), facts.get("serial"), _encode(facts), seen.client,
                         seen.first_seen, seen.last_seen, seen.decisions, seen.rule, seen.action, int(seen.unknown),
                         "".join(recent_line(*decision) for decision in reversed(seen.recent))[:RECENT_CHARS]))
        upsert, count = self.database.sql(_UPSERT), self.database.sql(_COUNT_MINUTE)

        def work(cursor: Any) -> None:
            if rows:
                cursor.executemany(upsert, rows)
            if minutes:
                cursor.executemany(count, [(minute, action, n) for (minute, action), n in minutes.items()])

        self.database.run(work, write=True)

    def prune(self, keep_seconds: float, max_machines: int, now: float) -> int:
        """Forget machines not seen for `keep_seconds`, then the oldest beyond `max_machines`."""
        sql = self.database.sql

        def work(cursor: Any) -> int:
            cursor.execute(sql("DELETE FROM bootrules_machines WHERE last_seen < ?"), (now - keep_seconds,))
            removed = max(cursor.rowcount, 0)
            cursor.execute("SELECT COUNT(*) FROM bootrules_machines")
            excess = cursor.fetchone()[0] - max_machines
            if excess > 0:
                cursor.execute(sql("DELETE FROM bootrules_machines WHERE machine IN "
                                   "(SELECT machine FROM bootrules_machines ORDER BY last_seen LIMIT ?)"), (excess,))
                removed += max(cursor.rowcount, 0)
            cursor.execute(sql("DELETE FROM bootrules_minutes WHERE minute < ?"), (int(now // 60) - MINUTES_KEPT,))
            return removed

        return self.database.run(work, write=True)

    def seen_names(self) -> set[str]:
        """Every name a machine seen is known by: its key, its MAC and its serial (`mac:…`, `serial:…`)."""

        def work(cursor: Any) -> set[str]:
            cursor.execute("SELECT machine, mac, serial FROM bootrules_machines")
            found: set[str] = set()
            for machine, mac, serial in cursor.fetchall():
                found.add(machine)
                if mac:
                    found.add(f"mac:{mac}")
                if serial:
                    found.add(f"serial:{serial}")
            return found

        return self.database.run(work)

    def count(self) -> int:
        def work(cursor: Any) -> int:
            cursor.execute("SELECT COUNT(*) FROM bootrules_machines")
            return int(cursor.fetchone()[0])

        return self.database.run(work)

    # ------------------------------------------------------------ reading

    def page(self, wanted: Filter, number: int = 1, per_page: int = PAGE_SIZE,
             once: OnceStore | None = None) -> Page:
        """One page of machines, newest first, each with its `once:` state (from `once`)."""
        number, per_page = max(1, number), max(1, min(per_page, MAX_PAGE_SIZE))
        where, parameters = wanted.where()
        sql = self.database.sql

        def work(cursor: Any) -> Page:
            cursor.execute(sql(f"SELECT COUNT(*) FROM bootrules_machines{where}"), parameters)
            total = cursor.fetchone()[0]
            # The page's names first (from the listing index alone, however deep the page), then
            # only those rows.
            cursor.execute(sql(f"SELECT machine FROM bootrules_machines{where} "
                               "ORDER BY last_seen DESC, machine DESC LIMIT ? OFFSET ?"),
                           [*parameters, per_page, (number - 1) * per_page])
            names = [name for (name,) in cursor.fetchall()]
            found = []
            if names:
                marks = ", ".join("?" * len(names))
                cursor.execute(sql(f"SELECT {_COLUMNS} FROM bootrules_machines WHERE machine IN ({marks})"), names)
                by_name = {record[0]: Machine.from_record(record) for record in cursor.fetchall()}
                found = [by_name[name] for name in names if name in by_name]
            return Page(tuple(found), total, number, per_page)

        found = self.database.run(work)
        machines = with_once(once, list(found.machines)) if once is not None else list(found.machines)
        return Page(tuple(machines), found.total, found.page, per_page)

    def one(self, machine: str, once: OnceStore | None = None) -> Machine | None:
        def work(cursor: Any) -> Machine | None:
            cursor.execute(self.database.sql(f"SELECT {_COLUMNS} FROM bootrules_machines WHERE machine = ?"),
                           (machine,))
            record = cursor.fetchone()
            return None if record is None else Machine.from_record(record)

        found = self.database.run(work)
        if found is None or once is None:
            return found
        return with_once(once, [found])[0]

    def totals(self) -> Totals:
        def work(cursor: Any) -> Totals:
            cursor.execute("SELECT COUNT(*), COALESCE(SUM(unknown), 0) FROM bootrules_machines")
            machines, unknown = cursor.fetchone()
            return Totals(int(machines), int(unknown))

        return self.database.run(work)

    def per_minute(self, since_minute: int) -> dict[tuple[int, str], int]:
        """Decisions per (minute since the epoch, action) from `since_minute` on."""

        def work(cursor: Any) -> dict[tuple[int, str], int]:
            cursor.execute(self.database.sql("SELECT minute, action, decisions FROM bootrules_minutes "
                                             "WHERE minute >= ?"), (since_minute,))
            return {(int(minute), action): int(count) for minute, action, count in cursor.fetchall()}

        return self.database.run(work)


def with_once(store: OnceStore, found: list[Machine]) -> list[Machine]:
    """The machines, each with the `once:` rows `store` keeps under its UUID or its MAC."""
    names: dict[str, list[int]] = {}
    for position, machine in enumerate(found):
        for name in machine_names(machine.facts):
            names.setdefault(name, []).append(position)
    if not names:
        return found
    rows: dict[int, dict[tuple[str, str], OnceRow]] = {}
    for row in store.rows_of(list(names)):
        for position in names[row.machine]:
            mine = rows.setdefault(position, {})
            # One machine may have a row under each name; `done` under either is what counts.
            if (row.rule, row.label) not in mine or row.state == "done":
                mine[(row.rule, row.label)] = row
    return [replace(machine, once=tuple(rows.get(position, {}).values())) for position, machine in enumerate(found)]
