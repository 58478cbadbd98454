"""Where `once:` state is kept: SQLite (one file, the default) or PostgreSQL (shared by servers).

One row per (machine, rule, label): armed with a live token, done, or re-armed (a
tombstone: tokens issued before it no longer count). Both engines run the same SQL
(SQLite 3.24+ has PostgreSQL's upsert); only placeholders and connecting differ.
Every failure (unreachable, locked past LOCK_TIMEOUT, read-only, corrupt, made by a newer
bootrules) is a StateError with a one-line reason; bootrules.once decides what that means.

SQLite runs in WAL mode: readers never wait for the writer, and a process killed in the
middle of a write leaves the last committed state intact. Armed rows are written with
synchronous=NORMAL, mostly in batches after their machine was answered (bootrules.arming):
a lost one costs nothing, as its token proves itself (bootrules.tokens). A `done` or a
re-arm, which must survive anything once answered, is committed with synchronous=FULL.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from . import tokens

SCHEMA_VERSION = 3
LOCK_TIMEOUT = 2.0  # seconds a write waits for another before the store counts as failing
CHECKPOINT_EVERY = 2.0  # seconds between two copies of SQLite's WAL into the database

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS bootrules_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS bootrules_once (
        machine TEXT NOT NULL,
        rule TEXT NOT NULL,
        label TEXT NOT NULL,
        state TEXT NOT NULL,
        token TEXT,
        issued_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        done_at DOUBLE PRECISION,
        done_from TEXT,
        identities TEXT NOT NULL,
        PRIMARY KEY (machine, rule, label))""",  # SQLite: WITHOUT ROWID (Store.table_options)
    # Machines seen (bootrules.machines): one row per machine, written in batches.
    """CREATE TABLE IF NOT EXISTS bootrules_machines (
        machine TEXT PRIMARY KEY,
        mac TEXT,
        serial TEXT,
        facts TEXT NOT NULL,
        client TEXT,
        first_seen DOUBLE PRECISION NOT NULL,
        last_seen DOUBLE PRECISION NOT NULL,
        decisions BIGINT NOT NULL,
        last_rule TEXT,
        last_action TEXT,
        unknown SMALLINT NOT NULL,
        recent TEXT NOT NULL)""",
    # Everything the machines page filters and sorts on: a page, its count and a filter
    # (even a substring of MAC or serial) read this index alone, never the wide rows.
    "CREATE INDEX IF NOT EXISTS bootrules_machines_listing ON bootrules_machines "
    "(last_seen, machine, unknown, last_rule, mac, serial)",
    """CREATE TABLE IF NOT EXISTS bootrules_minutes (
        minute BIGINT NOT NULL,
        action TEXT NOT NULL,
        decisions BIGINT NOT NULL,
        PRIMARY KEY (minute, action))""",
)
# No index on `token`: it would be one more page written for every machine a boot storm
# arms, and a token is looked up only when an installer reports done (a scan, rare).
# Later releases add `version: [statements]` here; a store is migrated one step at a time.
# Version 2 added the machines and minutes tables (made by _SCHEMA's CREATE … IF NOT EXISTS);
# version 3 the token key (a bootrules_meta row, made by _ensure_schema) and re-armed rows,
# which an older bootrules would misread.
_MIGRATIONS: dict[int, Sequence[str]] = {2: (), 3: ()}
_COLUMNS = "machine, rule, label, state, token, issued_at, expires_at, done_at, done_from, identities"


class StateError(Exception):
    """The state store cannot be used right now; the message says why in one line."""


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


class Store:
    """The operations `once:` needs, on one connection per process (made again after a fork)."""

    kind = "store"
    placeholder = "?"
    table_options = ""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connection: Any = None
        self._pid = 0
        self._key: str | None = None

    # ------------------------------------------------------------ engine specifics

    def _connect(self) -> Any:
        raise NotImplementedError

    def _durable(self, connection: Any, full: bool) -> None:
        """Make the next commit as durable as asked (SQLite only)."""

    def _errors(self) -> tuple[type[BaseException], ...]:
        raise NotImplementedError

    def _begin(self, cursor: Any) -> None:
        cursor.execute("BEGIN")

    # ------------------------------------------------------------ plumbing

    def _sql(self, text: str) -> str:
        return text.replace("?", self.placeholder)

    def _retryable(self, error: BaseException) -> bool:
        """Whether `error` only says another connection is busy (worth trying again at once)."""
        return False

    def _run(self, work: Any, write: bool = False, full: bool = False, single: bool = False) -> Any:
        """Run `work(cursor)` in one transaction; any engine error becomes a StateError.

        `single`: the work writes with one statement, which is a transaction of its own (no
        lock is taken beforehand).
        """
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                return self._run_once(work, write, full, single)
            except StateError as error:
                cause = error.__context__
                if cause is None or not self._retryable(cause):
                    raise
                if time.monotonic() >= deadline:
                    raise StateError(f"still locked by another writer after {LOCK_TIMEOUT:g} s") from None
                time.sleep(0.00005)

    def _run_once(self, work: Any, write: bool, full: bool, single: bool) -> Any:
        with self._lock:
            try:
                if self._connection is None or self._pid != os.getpid():
                    # Kept only once its schema is checked: a first try that met a locked
                    # store is made again in full, never used half set up.
                    self._connection = None
                    fresh = self._connect()
                    try:
                        self._ensure_schema(fresh)
                    except BaseException:
                        fresh.close()
                        raise
                    self._connection, self._pid = fresh, os.getpid()
                connection = self._connection
                if write:
                    self._durable(connection, full)
                cursor = connection.cursor()
                try:
                    if write and not single:
                        self._begin(cursor)
                    result = work(cursor)
                    connection.commit()
                    return result
                except BaseException:
                    try:
                        connection.rollback()
                    except Exception:  # noqa: BLE001 - the connection is dropped below anyway
                        pass
                    raise
            except StateError:
                self._drop()
                raise
            except self._errors() as error:
                if not self._retryable(error):
                    self._drop()
                raise StateError(_one_line(error))  # the engine's error stays as the context

    def _drop(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except Exception:  # noqa: BLE001
                pass
        self._connection = None

    def _schema_ready(self, connection: Any) -> bool:
        """Whether the schema is current and the key made: a read, so that opening a
        connection to a store in use does not wait for the write lock."""
        cursor = connection.cursor()
        try:
            cursor.execute("SELECT key, value FROM bootrules_meta WHERE key IN ('schema_version', 'token_key')")
            found = dict(cursor.fetchall())
            connection.commit()
        except self._errors():
            connection.rollback()
            return False
        if found.get("schema_version") != str(SCHEMA_VERSION) or not found.get("token_key"):
            return False
        self._key = found["token_key"]
        return True

    def _ensure_schema(self, connection: Any) -> None:
        if self._schema_ready(connection):
            return
        cursor = connection.cursor()
        try:
            self._begin(cursor)
            for statement in _SCHEMA:
                if statement.startswith("CREATE TABLE IF NOT EXISTS bootrules_once"):
                    statement += self.table_options
                cursor.execute(statement)
            cursor.execute(self._sql("SELECT value FROM bootrules_meta WHERE key = 'schema_version'"))
            found = cursor.fetchone()
            version = int(found[0]) if found else 0
            if version > SCHEMA_VERSION:
                raise StateError(f"the state store has schema version {version}, made by a newer bootrules "
                                 f"(this one knows {SCHEMA_VERSION})")
            for step in range(max(version, 1) + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS.get(step, ()):
                    cursor.execute(statement)
            if version != SCHEMA_VERSION:
                cursor.execute(self._sql("INSERT INTO bootrules_meta (key, value) VALUES ('schema_version', ?) "
                                         "ON CONFLICT (key) DO UPDATE SET value = excluded.value"),
                               (str(SCHEMA_VERSION),))
            # The key tokens are signed with: made once; a second server finds the first one's.
            cursor.execute(self._sql("INSERT INTO bootrules_meta (key, value) VALUES ('token_key', ?) "
                                     "ON CONFLICT (key) DO NOTHING"), (tokens.new_key(),))
            cursor.execute("SELECT value FROM bootrules_meta WHERE key = 'token_key'")
            self._key = cursor.fetchone()[0]
            connection.commit()
        except BaseException:
            try:
                connection.rollback()
            except Exception:  # noqa: BLE001
                pass
            raise

    def close(self) -> None:
        with self._lock:
            self._drop()

    # ------------------------------------------------------------ operations

    def transaction(self, work: Callable[[Any], Any], write: bool = False) -> Any:
        """Run `work(cursor)` in one transaction (bootrules.machines' queries); StateError on failure.

        SQL is written with `?` placeholders; `sql()` gives the engine's form.
        """
        return self._run(work, write=write)

    def sql(self, text: str) -> str:
        return self._sql(text)

    def check(self) -> None:
        """Open the store (creating or migrating its schema); raise StateError if it cannot be used."""
        self._run(lambda cursor: cursor.execute("SELECT 1 FROM bootrules_once LIMIT 1"))

    def token_key(self) -> str:
        """The key every token of this store is signed with (made with the schema)."""
        if self._key is None or self._pid != os.getpid():
            self.check()
        if self._key is None:
            raise StateError("the state store has no token key")
        return self._key

    def lookup(self, identities: Sequence[str], rule: str, label: str, now: float) -> tuple[bool, OnceRow | None]:
        """A machine's state for (rule, label): (done, its armed row with a live token, or None).

        A machine done under any of its identities is done. A read only: the common case (a
        live token, or done) writes nothing.
        """
        return self._run(lambda cursor: self._peek(cursor, identities, rule, label, now))

    def arm(self, row: OnceRow) -> tuple[bool, OnceRow | None, bool]:
        """Write one armed row now: (done, the machine's armed row, whether it is `row`).

        The write never turns a done row back to armed, nor replaces a live token another
        server issued; then that server's row is read and returned.
        """

        def work(cursor: Any) -> tuple[bool, OnceRow | None, bool]:
            cursor.execute(self._sql(_ARM), _arm_values(row))  # one statement: the lock is held only for it
            if cursor.rowcount == 1:
                return False, row, True
            done, found = self._peek(cursor, row.identities, row.rule, row.label, row.issued_at)
            return done, found, False

        return self._run(work, write=True, single=True)

    def write_arms(self, rows: Sequence[OnceRow]) -> None:
        """Write armed rows issued already (bootrules.arming's batches), under the same rules as arm()."""
        self._run(lambda cursor: cursor.executemany(self._sql(_ARM), [_arm_values(row) for row in rows]), write=True)

    def _peek(self, cursor: Any, identities: Sequence[str], rule: str, label: str,
              now: float) -> tuple[bool, OnceRow | None]:
        marks = ", ".join("?" * len(identities))
        cursor.execute(self._sql(f"SELECT {_COLUMNS} FROM bootrules_once WHERE rule = ? AND label = ? "
                                 f"AND machine IN ({marks})"), (rule, label, *identities))
        rows = [OnceRow.from_record(record) for record in cursor.fetchall()]
        if any(row.state == "done" for row in rows):
            return True, None
        mine = next((row for row in rows if row.machine == identities[0]), None)
        if mine is not None and mine.state == "armed" and mine.token and mine.expires_at > now:
            return False, mine
        return False, None

    def redeem(self, token: str, peer: str, now: float,
               verify: Callable[[], OnceRow | None] = lambda: None) -> tuple[str, OnceRow | None]:
        """Mark done the machine `token` was issued to: ("done" | "already" | "expired" | "unknown", row).

        The token is looked up in the rows; one that has no row (its batch was lost, or is
        not written yet) counts if `verify()` vouches for it, with the row it would have
        had, unless the machine was re-armed since it was issued.
        """

        def work(cursor: Any) -> tuple[str, OnceRow | None]:
            cursor.execute(self._sql(f"SELECT {_COLUMNS} FROM bootrules_once WHERE token = ?"), (token,))
            record = cursor.fetchone()
            if record is not None:
                row = OnceRow.from_record(record)
                if row.state == "done":
                    return "already", row
            else:
                vouched = verify()
                if vouched is None:
                    return "unknown", None
                row = vouched
                if row.expires_at > now:
                    marks = ", ".join("?" * len(row.identities))
                    cursor.execute(self._sql(f"SELECT {_COLUMNS} FROM bootrules_once WHERE rule = ? AND label = ? "
                                             f"AND machine IN ({marks})"), (row.rule, row.label, *row.identities))
                    known = [OnceRow.from_record(each) for each in cursor.fetchall()]
                    # A later token, or a re-arm since, supersedes this one.
                    if any(each.issued_at > row.issued_at or (each.state == "rearmed" and each.issued_at == row.issued_at)
                           for each in known if each.state != "done"):
                        return "unknown", None
                    if any(each.state == "done" for each in known):
                        return "already", row
            if row.expires_at <= now:
                return "expired", row
            for name in row.identities:  # the machine's other names (its UUID, its MAC) are done too
                cursor.execute(self._sql(
                    f"INSERT INTO bootrules_once ({_COLUMNS}) VALUES (?, ?, ?, 'done', ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (machine, rule, label) DO UPDATE SET state = 'done', token = excluded.token, "
                    "issued_at = excluded.issued_at, expires_at = excluded.expires_at, "
                    "done_at = excluded.done_at, done_from = excluded.done_from"),
                    (name, row.rule, row.label, token if name == row.machine else None, row.issued_at,
                     row.expires_at, now, peer, " ".join(row.identities)))
            return "done", row

        return self._run(work, write=True, full=True)

    def rearm(self, identities: Iterable[str], rule: str | None = None) -> int:
        """Re-arm a machine (every rule, or one), under every name it was seen with: its next
        boot gets a new token, and the tokens issued before now no longer count."""
        names = set(identities)
        when = time.time()

        def work(cursor: Any) -> int:
            query = "SELECT machine, rule, label, identities FROM bootrules_once WHERE state <> 'rearmed'"
            cursor.execute(self._sql(query + (" AND rule = ?" if rule is not None else "")),
                           (rule,) if rule is not None else ())
            doomed = [(machine, rule_name, label) for machine, rule_name, label, known in cursor.fetchall()
                      if names & ({machine} | set(known.split()))]
            for key in doomed:
                cursor.execute(self._sql("UPDATE bootrules_once SET state = 'rearmed', token = NULL, issued_at = ?, "
                                         "done_at = NULL, done_from = NULL "
                                         "WHERE machine = ? AND rule = ? AND label = ?"), (when, *key))
            return len(doomed)

        return self._run(work, write=True, full=True)

    def rows(self, limit: int = 100000) -> list[OnceRow]:
        """Every armed or done row, the most recent first."""

        def work(cursor: Any) -> list[OnceRow]:
            cursor.execute(self._sql(f"SELECT {_COLUMNS} FROM bootrules_once WHERE state <> 'rearmed' "
                                     "ORDER BY COALESCE(done_at, issued_at) DESC, machine LIMIT ?"), (limit,))
            return [OnceRow.from_record(record) for record in cursor.fetchall()]

        return self._run(work)


# An armed row, new or replacing an expired token or a re-arm made before it was issued; a
# live token, a done row and a later re-arm are left alone.
_ARM = (f"INSERT INTO bootrules_once ({_COLUMNS}) VALUES (?, ?, ?, 'armed', ?, ?, ?, NULL, NULL, ?) "
        "ON CONFLICT (machine, rule, label) DO UPDATE SET state = 'armed', token = excluded.token, "
        "issued_at = excluded.issued_at, expires_at = excluded.expires_at, done_at = NULL, done_from = NULL, "
        "identities = excluded.identities "
        "WHERE (bootrules_once.state = 'armed' AND bootrules_once.expires_at <= excluded.issued_at) "
        "OR (bootrules_once.state = 'rearmed' AND bootrules_once.issued_at <= excluded.issued_at)")


def _arm_values(row: OnceRow) -> tuple[Any, ...]:
    return (row.machine, row.rule, row.label, row.token, row.issued_at, row.expires_at, " ".join(row.identities))


_CHECKPOINTING: set[tuple[int, str]] = set()
_CHECKPOINTING_LOCK = threading.Lock()


class SqliteStore(Store):
    kind = "sqlite"
    # The rows live in the primary key's own tree: one tree to write per armed machine, not two.
    table_options = " WITHOUT ROWID"

    def __init__(self, path: str, patient: bool = False) -> None:
        super().__init__()
        self.path = path
        # A store used off the request path (the recorder's thread) lets SQLite wait for the
        # write lock, sleeping without the GIL, rather than trying again every 50 µs.
        self.patient = patient
        self._full = False  # the connection's synchronous mode: NORMAL until a FULL commit

    def _errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error, OSError)

    def _connect(self) -> sqlite3.Connection:
        previous = os.umask(0o077)  # the file holds live tokens: owner only
        try:
            # timeout=0: a busy database raises at once and _run tries again every 50 µs.
            # SQLite's own busy handler sleeps 1, 2, 5, 10… ms, and it sleeps on the
            # worker's only loop thread: in a boot storm on a `once:` rule, two workers
            # writing at once made every machine on the loser wait milliseconds.
            connection = sqlite3.connect(self.path, timeout=LOCK_TIMEOUT if self.patient else 0,
                                         isolation_level=None, check_same_thread=False)
        finally:
            os.umask(previous)
        try:
            mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StateError(f"{self.path}: cannot use write-ahead logging (journal mode {mode})")
            connection.execute("PRAGMA synchronous=NORMAL")
            # SQLite checkpoints the WAL into the database in the commit that crosses 1000
            # pages, fsync included, on the worker's loop thread: a stall for every few
            # hundred machines a storm arms. A thread of this process does it instead.
            connection.execute("PRAGMA wal_autocheckpoint=0")
            if self.patient:
                # Its batches touch pages all over the listing index: keep more of them.
                connection.execute("PRAGMA cache_size=-8192")
            self._full = False
            self._start_checkpoints()
        except BaseException:
            connection.close()
            raise
        return connection

    def _start_checkpoints(self) -> None:
        key = (os.getpid(), os.path.abspath(self.path))
        with _CHECKPOINTING_LOCK:  # one thread per file and process, however many stores use it
            if key in _CHECKPOINTING:
                return
            _CHECKPOINTING.add(key)
        threading.Thread(target=self._checkpoint_now_and_then, args=(os.getpid(),), daemon=True,
                         name="bootrules-state-checkpoint").start()

    def _checkpoint_now_and_then(self, pid: int) -> None:
        """Copy the WAL into the database every CHECKPOINT_EVERY seconds, without blocking anyone."""
        while os.getpid() == pid:
            time.sleep(CHECKPOINT_EVERY)
            try:
                with sqlite3.connect(self.path, timeout=LOCK_TIMEOUT) as connection:
                    connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
                connection.close()
            except sqlite3.Error:
                pass  # the next round tries again; a failing store shows on the boot path

    def _retryable(self, error: BaseException) -> bool:
        return isinstance(error, sqlite3.OperationalError) and ("locked" in str(error) or "busy" in str(error))

    def _durable(self, connection: sqlite3.Connection, full: bool) -> None:
        if full != self._full:
            connection.execute(f"PRAGMA synchronous={'FULL' if full else 'NORMAL'}")
            self._full = full

    def _begin(self, cursor: Any) -> None:
        cursor.execute("BEGIN IMMEDIATE")  # take the write lock now, not half-way through (_run retries)


class PostgresStore(Store):
    kind = "postgresql"
    placeholder = "%s"

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        try:
            import psycopg
        except ImportError:
            raise StateError("PostgreSQL state needs psycopg 3: pip install -r requirements-postgresql.txt") from None
        self._psycopg = psycopg

    def _errors(self) -> tuple[type[BaseException], ...]:
        return (self._psycopg.Error, OSError)

    def _connect(self) -> Any:
        timeout_ms = int(LOCK_TIMEOUT * 1000)
        return self._psycopg.connect(self.url, connect_timeout=max(1, int(LOCK_TIMEOUT)),
                                     options=f"-c lock_timeout={timeout_ms} -c statement_timeout={timeout_ms}")

    def _begin(self, cursor: Any) -> None:
        pass  # psycopg opens a transaction with the first statement


def open_store(location: str, patient: bool = False) -> Store:
    """The store at `location`: a postgresql:// URL, or a SQLite file path. `patient`: for
    work off the request path, which may wait its turn to write."""
    if location.startswith(("postgresql://", "postgres://")):
        return PostgresStore(location)
    return SqliteStore(location, patient)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:300]


def now() -> float:
    return time.time()
