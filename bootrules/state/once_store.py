"""The `once:` rows: one per (machine, rule, label), armed with a live token, done, or re-armed.

A re-armed row is a tombstone: tokens issued before it no longer count. Every operation is
one transaction on a Database (bootrules.state.database); a signed token's row is found by
its primary key, from what the token itself says (bootrules.state.tokens).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Collection, Iterable, Sequence

from ..clock import utc
from ..values import MAX_DURATION
from .database import Database

COLUMNS = "machine, rule, label, state, token, issued_at, expires_at, done_at, done_from, identities"
# Rows of a rule and label no longer in force are forgotten this long after their last change.
FORGET_AFTER = 30 * 86400


@dataclass(frozen=True)
class OnceRow:
    """One machine's state for one rule and label."""

    machine: str
    rule: str
    label: str
    state: str  # "armed", "done" or "rearmed"
    token: str | None
    issued_at: float
    expires_at: float
    done_at: float | None
    done_from: str | None
    identities: tuple[str, ...]

    @classmethod
    def from_record(cls, record: Sequence[Any]) -> "OnceRow":
        values = list(record)
        values[9] = tuple(values[9].split())
        return cls(*values)

    def public(self) -> dict[str, Any]:
        """As JSON for the API and the command line: never the token, which is a credential."""
        return {"machine": self.machine, "rule": self.rule, "label": self.label, "state": self.state,
                "issued_at": utc(self.issued_at), "expires_at": utc(self.expires_at),
                "done_at": utc(self.done_at), "done_from": self.done_from}


# An armed row, new or replacing an expired token or a re-arm made before it was issued; a
# live token, a done row and a later re-arm are left alone.
_ARM = (f"INSERT INTO bootrules_once ({COLUMNS}) VALUES (?, ?, ?, 'armed', ?, ?, ?, NULL, NULL, ?) "
        "ON CONFLICT (machine, rule, label) DO UPDATE SET state = 'armed', token = excluded.token, "
        "issued_at = excluded.issued_at, expires_at = excluded.expires_at, done_at = NULL, done_from = NULL, "
        "identities = excluded.identities "
        "WHERE (bootrules_once.state = 'armed' AND bootrules_once.expires_at <= excluded.issued_at) "
        "OR (bootrules_once.state = 'rearmed' AND bootrules_once.issued_at <= excluded.issued_at)")
_DONE = (f"INSERT INTO bootrules_once ({COLUMNS}) VALUES (?, ?, ?, 'done', ?, ?, ?, ?, ?, ?) "
         "ON CONFLICT (machine, rule, label) DO UPDATE SET state = 'done', token = excluded.token, "
         "issued_at = excluded.issued_at, expires_at = excluded.expires_at, "
         "done_at = excluded.done_at, done_from = excluded.done_from")


def _arm_values(row: OnceRow) -> tuple[Any, ...]:
    return (row.machine, row.rule, row.label, row.token, row.issued_at, row.expires_at, " ".join(row.identities))


class OnceStore:
    """The operations `once:` needs, each one transaction."""

    def __init__(self, database: Database) -> None:
        self.database = database

    @property
    def kind(self) -> str:
        return self.database.kind

    def close(self) -> None:
        self.database.close()

    def check(self) -> None:
        """Open the store (creating or migrating its schema); StateError if it cannot be used."""
        self.database.run(lambda cursor: cursor.execute("SELECT 1 FROM bootrules_once LIMIT 1"))

    def token_key(self) -> str:
        """The key every token of this store is signed with (made with the schema)."""
        if self.database.token_key is None:
            self.check()
        assert self.database.token_key is not None
        return self.database.token_key

    # ------------------------------------------------------------ the boot path

    def lookup(self, identities: Sequence[str], rule: str, label: str, now: float) -> tuple[bool, OnceRow | None]:
        """A machine's state for (rule, label): (done, its armed row with a live token, or None).

        A machine done under any of its names is done. A read only: the common case (a live
        token, or done) writes nothing.
        """
        return self.database.run(lambda cursor: self._peek(cursor, identities, rule, label, now))

    def arm(self, row: OnceRow) -> tuple[bool, OnceRow | None, bool]:
        """Write one armed row now: (done, the machine's armed row, whether it is `row`).

        The write never turns a done row back to armed, nor replaces a live token another
        server issued; then that server's row is read and returned.
        """
        sql = self.database.sql

        def work(cursor: Any) -> tuple[bool, OnceRow | None, bool]:
            cursor.execute(sql(_ARM), _arm_values(row))  # one statement: the lock is held only for it
            if cursor.rowcount == 1:
                return False, row, True
            done, found = self._peek(cursor, row.identities, row.rule, row.label, row.issued_at)
            return done, found, False

        return self.database.run(work, write=True, single=True)

    def write_arms(self, rows: Sequence[OnceRow]) -> None:
        """Write armed rows issued already (bootrules.state.arming's batches), as arm() would."""
        sql = self.database.sql(_ARM)
        self.database.run(lambda cursor: cursor.executemany(sql, [_arm_values(row) for row in rows]), write=True)

    def _rows(self, cursor: Any, identities: Sequence[str], rule: str, label: str) -> list[OnceRow]:
        marks = ", ".join("?" * len(identities))
        cursor.execute(self.database.sql(f"SELECT {COLUMNS} FROM bootrules_once WHERE rule = ? AND label = ? "
                                         f"AND machine IN ({marks})"), (rule, label, *identities))
        return [OnceRow.from_record(record) for record in cursor.fetchall()]

    def _peek(self, cursor: Any, identities: Sequence[str], rule: str, label: str,
              now: float) -> tuple[bool, OnceRow | None]:
        rows = self._rows(cursor, identities, rule, label)
        if any(row.state == "done" for row in rows):
            return True, None
        mine = next((row for row in rows if row.machine == identities[0]), None)
        if mine is not None and mine.state == "armed" and mine.token and mine.expires_at > now:
            return False, mine
        return False, None

    # ------------------------------------------------------------ the callback

    def redeem(self, claimed: OnceRow, token: str, peer: str, now: float) -> tuple[str, OnceRow | None]:
        """Mark done the machine a signed token was issued to; `claimed` is the row the
        token says it belongs to (its tag checked already). ("done" | "already" | "expired"
        | "unknown", row): unknown if a later token or a re-arm supersedes it."""

        def work(cursor: Any) -> tuple[str, OnceRow | None]:
            known = self._rows(cursor, claimed.identities, claimed.rule, claimed.label)
            if any(each.state == "done" for each in known):
                return "already", claimed
            if any(each.issued_at > claimed.issued_at or (each.state == "rearmed" and each.issued_at == claimed.issued_at)
                   for each in known):
                return "unknown", None
            if claimed.expires_at <= now:
                return "expired", claimed
            self._write_done(cursor, claimed, token, peer, now)
            return "done", claimed

        return self.database.run(work, write=True, full=True)

    def redeem_unsigned(self, token: str, peer: str, now: float) -> tuple[str, OnceRow | None]:
        """The same for a token of bootrules before signed ones, found by its row alone."""

        def work(cursor: Any) -> tuple[str, OnceRow | None]:
            cursor.execute(self.database.sql(f"SELECT {COLUMNS} FROM bootrules_once "
                                             "WHERE token = ? AND length(token) = 32"), (token,))
            record = cursor.fetchone()
            if record is None:
                return "unknown", None
            row = OnceRow.from_record(record)
            if row.state == "done":
                return "already", row
            if row.state != "armed":
                return "unknown", None
            if row.expires_at <= now:
                return "expired", row
            self._write_done(cursor, row, token, peer, now)
            return "done", row

        return self.database.run(work, write=True, full=True)

    def _write_done(self, cursor: Any, row: OnceRow, token: str, peer: str, now: float) -> None:
        sql = self.database.sql(_DONE)
        for name in row.identities:  # the machine's other names (its UUID, its MAC) are done too
            cursor.execute(sql, (name, row.rule, row.label, token if name == row.machine else None, row.issued_at,
                                 row.expires_at, now, peer, " ".join(row.identities)))

    # ------------------------------------------------------------ operators

    def rearm(self, identities: Iterable[str], rule: str | None = None) -> int:
        """Re-arm a machine (every rule, or one), under every name it was seen with: its next
        boot gets a new token, and the tokens issued before now no longer count."""
        names = set(identities)
        when = time.time()
        sql = self.database.sql

        def work(cursor: Any) -> int:
            query = "SELECT machine, rule, label, identities FROM bootrules_once WHERE state <> 'rearmed'"
            cursor.execute(sql(query + (" AND rule = ?" if rule is not None else "")),
                           (rule,) if rule is not None else ())
            doomed = [(machine, rule_name, label) for machine, rule_name, label, known in cursor.fetchall()
                      if names & ({machine} | set(known.split()))]
            for key in doomed:
                cursor.execute(sql("UPDATE bootrules_once SET state = 'rearmed', token = NULL, issued_at = ?, "
                                   "done_at = NULL, done_from = NULL WHERE machine = ? AND rule = ? AND label = ?"),
                               (when, *key))
            return len(doomed)

        return self.database.run(work, write=True, full=True)

    def rows(self, limit: int = 100000) -> list[OnceRow]:
        """Every armed or done row, the most recent first."""

        def work(cursor: Any) -> list[OnceRow]:
            cursor.execute(self.database.sql(f"SELECT {COLUMNS} FROM bootrules_once WHERE state <> 'rearmed' "
                                             "ORDER BY COALESCE(done_at, issued_at) DESC, machine LIMIT ?"), (limit,))
            return [OnceRow.from_record(record) for record in cursor.fetchall()]

        return self.database.run(work)

    def rows_of(self, names: Collection[str]) -> list[OnceRow]:
        """The armed and done rows kept under any of `names`."""
        if not names:
            return []
        marks = ", ".join("?" * len(names))

        def work(cursor: Any) -> list[OnceRow]:
            cursor.execute(self.database.sql(f"SELECT {COLUMNS} FROM bootrules_once WHERE machine IN ({marks}) "
                                             "AND state <> 'rearmed' ORDER BY rule, label"), list(names))
            return [OnceRow.from_record(record) for record in cursor.fetchall()]

        return self.database.run(work)

    # ------------------------------------------------------------ upkeep

    def prune(self, now: float, in_force: Collection[tuple[str, str]]) -> int:
        """Forget what can no longer matter, and return how many rows went: armed rows whose
        token has expired, re-arm tombstones older than any token can live, and rows of a
        rule and label no longer in force, FORGET_AFTER their last change."""
        sql = self.database.sql

        def work(cursor: Any) -> int:
            cursor.execute(sql("DELETE FROM bootrules_once WHERE state = 'armed' AND expires_at <= ?"), (now,))
            removed = max(cursor.rowcount, 0)
            cursor.execute(sql("DELETE FROM bootrules_once WHERE state = 'rearmed' AND issued_at <= ?"),
                           (now - MAX_DURATION,))
            removed += max(cursor.rowcount, 0)
            cursor.execute(sql("SELECT DISTINCT rule, label FROM bootrules_once"))
            gone = [pair for pair in cursor.fetchall() if tuple(pair) not in in_force]
            for rule, label in gone:
                cursor.execute(sql("DELETE FROM bootrules_once WHERE rule = ? AND label = ? "
                                   "AND COALESCE(done_at, issued_at) <= ?"), (rule, label, now - FORGET_AFTER))
                removed += max(cursor.rowcount, 0)
            return removed

        return self.database.run(work, write=True)

    def count_armed(self) -> int:
        def work(cursor: Any) -> int:
            cursor.execute("SELECT COUNT(*) FROM bootrules_once WHERE state = 'armed'")
            return int(cursor.fetchone()[0])

        return self.database.run(work)
