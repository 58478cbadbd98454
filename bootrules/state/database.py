"""One connection per process to SQLite or PostgreSQL, every statement under a deadline, and
the schema both stores share.

Both engines run the same SQL (SQLite 3.24+ has PostgreSQL's upsert); only placeholders,
connecting and aborting differ. Every failure (unreachable, locked past LOCK_TIMEOUT,
read-only, corrupt, frozen, made by a newer bootrules, replaced) is a StateError with a
one-line reason; the stores above decide what it means.

**Deadlines.** A database that stops answering without closing the connection (a frozen
server, a network that drops packets) would hold a thread forever: the server-side
`statement_timeout` cannot fire in a frozen server, and TCP sees nothing wrong while the
kernel still acknowledges. So every transaction is watched: past its deadline a thread of
the process aborts it from outside (SQLite: `interrupt()`; PostgreSQL: the socket is shut
down under psycopg), the caller gets a StateError, and the connection is made again next
time. TCP keepalives and `tcp_user_timeout` catch a dead peer on an idle connection too.

**Identity.** A store carries a random `store_id`, made with its schema. A Database told
which identity to expect refuses any other (a file replaced, a database re-created) and,
with SQLite, never creates a missing file: a silent new store would forget which machines
are installed, and reinstall them.

SQLite runs in WAL mode: readers never wait for the writer, and a process killed in the
middle of a write leaves the last committed state intact. Armed rows and machines seen
are written with synchronous=NORMAL; a `done` or a re-arm, which must survive anything
once answered, with synchronous=FULL. A thread of each process syncs the WAL to disk every
CHECKPOINT_EVERY seconds, so that what NORMAL wrote is as durable as a checkpoint would
make it, copies the WAL into the database once it holds CHECKPOINT_AFTER_BYTES, and
truncates it once it has grown past WAL_LIMIT_BYTES (why not copy it every time: see
`_checkpoint_now_and_then`). A write that holds the write lock for SLOW_WRITE seconds or
more is logged: every other writer waited for it.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import threading
import time
import urllib.parse
import weakref
from typing import Any, Callable, Sequence

from ..errors import StateError
from . import tokens

log = logging.getLogger("bootrules")

SCHEMA_VERSION = 4
LOCK_TIMEOUT = 2.0  # seconds a write waits for another writer before the store counts as failing
DEADLINE = 1.5  # seconds a transaction on the request path may take before it is aborted
PATIENT_DEADLINE = 30.0  # the same, off the request path (batches, pruning, pages, the command line)
WATCH_EVERY = 0.25  # how often the watchdog looks: an abort comes at most this late
CHECKPOINT_EVERY = 2.0  # seconds between two looks at SQLite's WAL (a sync, or a checkpoint)
CHECKPOINT_AFTER_BYTES = 4 * 1024 * 1024  # the WAL is copied into the database once it holds this much
WAL_LIMIT_BYTES = 64 * 1024 * 1024  # past this, the WAL is truncated at the next checkpoint
SLOW_WRITE = 1.0  # seconds; a write that held the write lock this long is logged
SLOW_WRITE_WARN_EVERY = 60.0  # seconds between two such warnings, per store and process

SCHEMA = (
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
        PRIMARY KEY (machine, rule, label))""",  # SQLite: WITHOUT ROWID (Database.table_options)
    # Tokens of bootrules before signed ones (32 characters) are found by this index; a
    # signed token names its row itself (machine, rule, label), so no index on `token` is
    # written for every machine a boot storm arms.
    "CREATE INDEX IF NOT EXISTS bootrules_once_legacy_token ON bootrules_once (token) WHERE length(token) = 32",
    # Machines seen (bootrules.state.machine_store): one row per machine, written in batches.
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
# Later releases add `version: [statements]` here; a store is migrated one step at a time.
# Version 2 added the machines and minutes tables, version 3 the token key and re-armed
# rows, version 4 the store's identity and the index of unsigned tokens (all made by
# SCHEMA's CREATE … IF NOT EXISTS and _ensure_schema's meta rows).
MIGRATIONS: dict[int, Sequence[str]] = {2: (), 3: (), 4: ()}


class StoreStalled(StateError):
    """The store gave no answer within the deadline."""


class StoreReplaced(StateError):
    """The store is not the one this server has been using (deleted, replaced, re-created)."""


REPLACED = ("the state store is not the one this server started with (the file was deleted or replaced, "
            "or the database re-created); once: rules fall through until bootrules is restarted")


class _Watchdog:
    """Aborts the transactions of this process that outlive their deadline."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._due: dict[int, tuple[float, Callable[[], None]]] = {}
        self._pid = 0
        self._next = 0

    def watch(self, seconds: float, abort: Callable[[], None]) -> int:
        with self._lock:
            if self._pid != os.getpid():  # after a fork the parent's thread is not here
                self._pid, self._due = os.getpid(), {}
                threading.Thread(target=self._run, args=(self._pid,), daemon=True,
                                 name="bootrules-state-watchdog").start()
            key = self._next = self._next + 1
            self._due[key] = (time.monotonic() + seconds, abort)
        return key

    def release(self, key: int) -> None:
        with self._lock:
            self._due.pop(key, None)

    def _run(self, pid: int) -> None:
        while os.getpid() == pid:
            time.sleep(WATCH_EVERY)
            now = time.monotonic()
            with self._lock:
                overdue = [key for key, (deadline, _abort) in self._due.items() if deadline <= now]
                aborts = [self._due.pop(key)[1] for key in overdue]
            for abort in aborts:
                try:
                    abort()
                except Exception:  # noqa: BLE001 - a connection closed meanwhile needs nothing
                    pass


WATCHDOG = _Watchdog()
# A fork must not hand a child the watchdog's lock taken by one of the parent's threads.
os.register_at_fork(before=WATCHDOG._lock.acquire, after_in_parent=WATCHDOG._lock.release,
                    after_in_child=WATCHDOG._lock.release)


# Every Database of this process: each closes its connection before the process forks.
_OPENED: "weakref.WeakSet[Database]" = weakref.WeakSet()
_OPENED_LOCK = threading.Lock()


def _close_before_fork() -> None:
    """Close this process's connections, none in the middle of a transaction, before a fork.

    A child must not inherit an open connection. SQLite keeps what each process holds of
    a file's locks in its own memory, shared by all of that process's connections: a
    child inherits that memory but not the locks, so its own connections would count on
    locks it does not have, or meet a parent's transaction that never ends in the child
    (every write "locked", in a worker forked while the parent's prober writes). A
    PostgreSQL connection's socket would be shared, and closing it in the child would end
    the parent's session. Each connection is opened again when next used. A fork waits
    at most for a transaction's deadline (serve forks at start and on new rules only).
    """
    _OPENED_LOCK.acquire()
    databases = sorted(_OPENED, key=id)
    for database in databases:
        database._lock.acquire()  # no transaction in flight, none started until after the fork
    _CHECKPOINT_CONNECTING.acquire()
    for database in databases:
        if database._connection is not None and database._pid == os.getpid():
            database._drop()
    _FORK_HELD[:] = databases


def _release_after_fork() -> None:
    _CHECKPOINT_CONNECTING.release()
    for database in _FORK_HELD:
        database._lock.release()
    _FORK_HELD.clear()
    _OPENED_LOCK.release()


_FORK_HELD: list["Database"] = []
# Held while the checkpoint thread has a connection of its own open.
_CHECKPOINT_CONNECTING = threading.Lock()


class Database:
    """One connection per process (made again after a fork), each transaction under a deadline."""

    kind = "database"
    placeholder = "?"
    table_options = ""
    locks_at_begin = False  # whether a write transaction holds the store's one write lock from its start

    def __init__(self, location: str, *, patient: bool = False, deadline: float | None = None,
                 expected_id: Callable[[], str | None] = lambda: None,
                 found_id: Callable[[str, tuple[int, int] | None], None] = lambda store_id, file: None) -> None:
        self.location = location
        # Off the request path: may wait its turn for the write lock, and take longer.
        self.patient = patient
        self.deadline = deadline if deadline is not None else PATIENT_DEADLINE if patient else DEADLINE
        self.expected_id = expected_id
        self.found_id = found_id  # told the identity of a store met while none was expected
        self._lock = threading.Lock()
        self._connection: Any = None
        self._current: Any = None  # the connection a transaction is using now, for the watchdog
        self._pid = 0
        self.token_key: str | None = None
        self.store_id: str | None = None
        self._aborted = False
        self._slow_warned_at = -SLOW_WRITE_WARN_EVERY
        with _OPENED_LOCK:
            _OPENED.add(self)

    # ------------------------------------------------------------ engine specifics

    def _connect(self) -> Any:
        raise NotImplementedError

    def _abort(self, connection: Any) -> None:
        """Make the statement `connection` is running fail now (from another thread)."""
        raise NotImplementedError

    def _errors(self) -> tuple[type[BaseException], ...]:
        raise NotImplementedError

    def _durable(self, connection: Any, full: bool) -> None:
        """Make the next commit as durable as asked (SQLite only)."""

    def _begin(self, cursor: Any) -> None:
        cursor.execute("BEGIN")

    def _retryable(self, error: BaseException) -> bool:
        """Whether `error` only says another connection is busy (worth trying again at once)."""
        return False

    def _one_schema_maker(self, cursor: Any) -> None:
        """Make the other connections that would make the schema now wait for this one."""

    def _no_answer(self, error: BaseException) -> bool:
        """Whether `error` says the store did not answer in time (as an abort does)."""
        return False

    def file_identity(self) -> tuple[int, int] | None:
        """Which file the store is (SQLite: device and inode); None for a server."""
        return None

    # ------------------------------------------------------------ running work

    def sql(self, text: str) -> str:
        """SQL written with `?` placeholders, in this engine's form."""
        return text.replace("?", self.placeholder)

    def run(self, work: Callable[[Any], Any], write: bool = False, full: bool = False, single: bool = False) -> Any:
        """Run `work(cursor)` in one transaction; any engine error becomes a StateError.

        `single`: the work writes with one statement, which is a transaction of its own (no
        lock is taken beforehand). `full`: the commit survives a power cut (SQLite).
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

    def _run_once(self, work: Callable[[Any], Any], write: bool, full: bool, single: bool) -> Any:
        with self._lock:
            self._aborted = False
            watched = WATCHDOG.watch(self.deadline, self._abort_now)
            try:
                connection = self._connection_now()
                if write:
                    self._durable(connection, full)
                cursor = connection.cursor()
                try:
                    if write and not single:
                        self._begin(cursor)
                    began = time.monotonic()
                    result = work(cursor)
                    connection.commit()
                    if write and not single and self.locks_at_begin:
                        self._held(time.monotonic() - began, full)
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
                if self._aborted or self._no_answer(error):
                    self._drop()
                    raise StoreStalled(f"no answer from the state store within {self.deadline:g} s") from None
                if not self._retryable(error):
                    self._drop()
                raise StateError(one_line(error))  # the engine's error stays as the context
            finally:
                WATCHDOG.release(watched)
                self._current = None

    def _held(self, seconds: float, full: bool) -> None:
        """A write has ended that held the write lock for `seconds` (taken at its start)."""
        if seconds < SLOW_WRITE:
            return
        now = time.monotonic()
        if now - self._slow_warned_at >= SLOW_WRITE_WARN_EVERY:
            self._slow_warned_at = now
            log.warning("state store %s: a write held the write lock for %.1f s (%s); every other writer waited "
                        "for it: a disk slow to sync?", shown_location(self.location), seconds,
                        "a commit synced to disk" if full else "its statements and commit")

    def _abort_now(self) -> None:
        connection = self._current
        if connection is not None:
            self._aborted = True
            self._abort(connection)

    def _connection_now(self) -> Any:
        """This process's connection, made (and its schema checked) if there is none yet."""
        if self._connection is None or self._pid != os.getpid():
            # Kept only once its schema is checked: a first try that met a locked store is
            # made again in full, never used half set up.
            self._connection = None
            fresh = self._current = self._connect()
            try:
                self._ensure_schema(fresh)
            except BaseException:
                try:
                    fresh.close()
                except Exception:  # noqa: BLE001
                    pass
                raise
            self._connection, self._pid = fresh, os.getpid()
        self._current = self._connection
        return self._connection

    def _drop(self) -> None:
        if self._connection is not None and self._pid == os.getpid():
            try:
                self._connection.close()
            except Exception:  # noqa: BLE001
                pass
        self._connection = None

    def close(self) -> None:
        with self._lock:
            self._drop()

    # ------------------------------------------------------------ the schema

    def _read_meta(self, connection: Any) -> dict[str, str] | None:
        """The meta rows, or None if there is no schema yet: a read, so that opening a
        connection to a store in use does not wait for the write lock."""
        cursor = connection.cursor()
        try:
            cursor.execute("SELECT key, value FROM bootrules_meta "
                           "WHERE key IN ('schema_version', 'token_key', 'store_id')")
            found = dict(cursor.fetchall())
            connection.commit()
        except self._errors():
            connection.rollback()
            return None
        return found

    def _ensure_schema(self, connection: Any) -> None:
        found = self._read_meta(connection)
        if found is None or found.get("schema_version") != str(SCHEMA_VERSION) or not found.get("token_key") \
                or not found.get("store_id"):
            found = self._make_schema(connection)
        expected = self.expected_id()
        if expected is not None and found["store_id"] != expected:
            raise StoreReplaced(REPLACED)
        if expected is None:
            self.found_id(found["store_id"], self.file_identity())
        self.token_key, self.store_id = found["token_key"], found["store_id"]

    def _make_schema(self, connection: Any) -> dict[str, str]:
        cursor = connection.cursor()
        try:
            self._begin(cursor)
            self._one_schema_maker(cursor)
            for statement in SCHEMA:
                if statement.startswith("CREATE TABLE IF NOT EXISTS bootrules_once"):
                    statement += self.table_options
                cursor.execute(statement)
            cursor.execute("SELECT value FROM bootrules_meta WHERE key = 'schema_version'")
            row = cursor.fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise StateError(f"the state store has schema version {version}, made by a newer bootrules "
                                 f"(this one knows {SCHEMA_VERSION})")
            for step in range(max(version, 1) + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS.get(step, ()):
                    cursor.execute(statement)
            upsert = self.sql("INSERT INTO bootrules_meta (key, value) VALUES (?, ?) "
                              "ON CONFLICT (key) DO UPDATE SET value = excluded.value")
            keep = self.sql("INSERT INTO bootrules_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING")
            if version != SCHEMA_VERSION:
                cursor.execute(upsert, ("schema_version", str(SCHEMA_VERSION)))
            # Made once; a second server (or worker) finds the first one's.
            cursor.execute(keep, ("token_key", tokens.new_key()))
            cursor.execute(keep, ("store_id", os.urandom(16).hex()))
            cursor.execute("SELECT key, value FROM bootrules_meta")
            found = dict(cursor.fetchall())
            connection.commit()
            return found
        except BaseException:
            try:
                connection.rollback()
            except Exception:  # noqa: BLE001
                pass
            raise


# --------------------------------------------------------------------------- SQLite


_CHECKPOINTING: set[tuple[int, str]] = set()
_CHECKPOINTING_LOCK = threading.Lock()
os.register_at_fork(before=_CHECKPOINTING_LOCK.acquire, after_in_parent=_CHECKPOINTING_LOCK.release,
                    after_in_child=_CHECKPOINTING_LOCK.release)
# Registered after the watchdog's: run before it, so that a transaction in flight, which
# needs the watchdog's lock to end, ends before the fork.
os.register_at_fork(before=_close_before_fork, after_in_parent=_release_after_fork,
                    after_in_child=_release_after_fork)


class SqliteDatabase(Database):
    kind = "sqlite"
    locks_at_begin = True  # BEGIN IMMEDIATE
    # The rows live in the primary key's own tree: one tree to write per armed machine, not two.
    table_options = " WITHOUT ROWID"

    def __init__(self, location: str, **options: Any) -> None:
        super().__init__(location, **options)
        self.path = location
        self._full = False  # the connection's synchronous mode: NORMAL until a FULL commit

    def _errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error, OSError)

    def _connect(self) -> sqlite3.Connection:
        # A store this server has used already must be there: a missing file is not made
        # again (a fresh store would forget every machine installed).
        must_exist = self.expected_id() is not None
        target = f"file:{urllib.parse.quote(os.path.abspath(self.path))}?mode=rw" if must_exist else self.path
        previous = os.umask(0o077)  # the file holds live tokens: owner only
        try:
            # timeout=0 on the request path: a busy database raises at once and run() tries
            # again every 50 µs. SQLite's own busy handler sleeps 1, 2, 5, 10… ms, on the
            # worker's only loop thread: in a boot storm two workers writing at once made
            # every machine on the loser wait milliseconds.
            connection = sqlite3.connect(target, timeout=LOCK_TIMEOUT if self.patient else 0,
                                         isolation_level=None, check_same_thread=False, uri=must_exist)
        except sqlite3.OperationalError as error:
            if must_exist and not os.path.exists(self.path):
                raise StoreReplaced(f"{self.path} is gone; {REPLACED}") from None
            raise StateError(one_line(error)) from None
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
            # A WAL started again is cut to what it holds at its first commit: its size is
            # then what the checkpoint thread has not copied yet (it goes by that size).
            connection.execute("PRAGMA journal_size_limit=0")
            if self.patient:
                # Batches of machines seen touch pages all over the listing index: keep more of them.
                connection.execute("PRAGMA cache_size=-8192")
            self._full = False
            self._start_checkpoints()
        except BaseException:
            connection.close()
            raise
        return connection

    def _abort(self, connection: sqlite3.Connection) -> None:
        connection.interrupt()

    def file_identity(self) -> tuple[int, int] | None:
        try:
            info = os.stat(self.path)
        except OSError:
            return None
        return info.st_dev, info.st_ino

    def _start_checkpoints(self) -> None:
        key = (os.getpid(), os.path.abspath(self.path))
        with _CHECKPOINTING_LOCK:  # one thread per file and process, however many connections use it
            if key in _CHECKPOINTING:
                return
            _CHECKPOINTING.add(key)
        threading.Thread(target=self._checkpoint_now_and_then, args=(os.getpid(),), daemon=True,
                         name="bootrules-state-checkpoint").start()

    def _checkpoint_now_and_then(self, pid: int) -> None:
        """Every CHECKPOINT_EVERY seconds, without blocking anyone: sync the WAL to disk, or,
        once it holds CHECKPOINT_AFTER_BYTES, copy it into the database; once it has grown
        past WAL_LIMIT_BYTES, wait for a moment when nobody writes and truncate it.

        Why not copy it every time: once everything in the WAL is copied, the next write
        starts the WAL again from the beginning, and SQLite syncs its new header to disk
        before going on, while it holds the write lock (power-loss safety). Copied every
        few seconds, nearly every write after a quiet moment (a prober's heartbeat, a
        batch, a new worker's first `once:` row) would make that sync, and on a disk slow
        to sync every other writer would wait behind it: a `once:` decision that waits
        past LOCK_TIMEOUT falls through. Copied once per CHECKPOINT_AFTER_BYTES, the WAL
        starts again that rarely; the sync from here holds no lock (SQLite locks the
        database file and the -shm file, never the WAL, so opening and closing it here
        releases none of its locks).
        """
        wal = self.path + "-wal"
        synced: tuple[int, int, int] | None = None
        while os.getpid() == pid:
            time.sleep(CHECKPOINT_EVERY)
            try:
                info = os.stat(wal)
            except OSError:
                continue  # no WAL: nothing written since the last connection closed
            if info.st_size < min(CHECKPOINT_AFTER_BYTES, WAL_LIMIT_BYTES):
                seen = (info.st_ino, info.st_size, info.st_mtime_ns)
                if seen != synced:
                    synced = seen if _sync_to_disk(wal) else None
                continue
            large = info.st_size > WAL_LIMIT_BYTES
            try:  # mode=rw: a file that is gone is not made again here
                with _CHECKPOINT_CONNECTING:  # never open across a fork (_close_before_fork)
                    with sqlite3.connect(f"file:{urllib.parse.quote(os.path.abspath(self.path))}?mode=rw",
                                         timeout=LOCK_TIMEOUT, uri=True) as connection:
                        connection.execute(f"PRAGMA wal_checkpoint({'TRUNCATE' if large else 'PASSIVE'})")
                    connection.close()
            except sqlite3.Error:
                pass  # the next round tries again; a failing store shows where it is used
            synced = None

    def _retryable(self, error: BaseException) -> bool:
        return isinstance(error, sqlite3.OperationalError) and ("locked" in str(error) or "busy" in str(error))

    def _durable(self, connection: sqlite3.Connection, full: bool) -> None:
        if full != self._full:
            connection.execute(f"PRAGMA synchronous={'FULL' if full else 'NORMAL'}")
            self._full = full

    def _begin(self, cursor: Any) -> None:
        cursor.execute("BEGIN IMMEDIATE")  # take the write lock now, not half-way through (run retries)


# --------------------------------------------------------------------------- PostgreSQL


class PostgresDatabase(Database):
    kind = "postgresql"
    placeholder = "%s"

    def __init__(self, location: str, **options: Any) -> None:
        super().__init__(location, **options)
        try:
            import psycopg
        except ImportError:
            raise StateError("PostgreSQL state needs psycopg 3: pip install -r requirements-postgresql.txt") from None
        self._psycopg = psycopg

    def _errors(self) -> tuple[type[BaseException], ...]:
        return (self._psycopg.Error, OSError)

    def _connect(self) -> Any:
        timeout_ms = int(LOCK_TIMEOUT * 1000)
        # The server's own timeouts, and TCP's: keepalives find a dead peer on an idle
        # connection, tcp_user_timeout one that stopped acknowledging what was sent.
        return self._psycopg.connect(
            self.location, connect_timeout=2, keepalives=1, keepalives_idle=5, keepalives_interval=2,
            keepalives_count=3, tcp_user_timeout=5000,
            options=f"-c lock_timeout={timeout_ms} -c statement_timeout={int(self.deadline * 1000)}")

    def _abort(self, connection: Any) -> None:
        # A frozen server cannot be asked to cancel; shutting the socket down under psycopg
        # makes the statement it waits on fail at once.
        duplicate = socket.socket(fileno=os.dup(connection.pgconn.socket))
        try:
            duplicate.shutdown(socket.SHUT_RDWR)
        finally:
            duplicate.close()

    def _begin(self, cursor: Any) -> None:
        pass  # psycopg opens a transaction with the first statement

    def _no_answer(self, error: BaseException) -> bool:
        return isinstance(error, self._psycopg.errors.ConnectionTimeout)  # connect_timeout: nobody answered

    def _one_schema_maker(self, cursor: Any) -> None:
        # Two connections making the tables at once collide in PostgreSQL's catalog (even
        # with IF NOT EXISTS); a lock held until the transaction ends puts them in turn.
        cursor.execute("SELECT pg_advisory_xact_lock(7301120617)")


def is_server(location: str) -> bool:
    return location.startswith(("postgresql://", "postgres://"))


def open_database(location: str, *, patient: bool = False, deadline: float | None = None,
                  expected_id: Callable[[], str | None] = lambda: None,
                  found_id: Callable[[str, tuple[int, int] | None], None] = lambda store_id, file: None) -> Database:
    """The database at `location`: a postgresql:// URL, or a SQLite file path (connected
    when first used). `expected_id`: the identity it must have (None: any); `found_id` is
    told the identity found when none was expected."""
    kind = PostgresDatabase if is_server(location) else SqliteDatabase
    return kind(location, patient=patient, deadline=deadline, expected_id=expected_id, found_id=found_id)


def _sync_to_disk(path: str) -> bool:
    """fdatasync() the file at `path`; False if it cannot be (gone, or the disk failed)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        os.fdatasync(descriptor)
        return True
    except OSError:
        return False
    finally:
        os.close(descriptor)


def shown_location(location: str) -> str:
    """`location` as it may be shown to an operator: a URL without its password."""
    if not is_server(location):
        return location
    parts = urllib.parse.urlsplit(location)
    return f"{parts.scheme}://{parts.hostname or ''}{':' + str(parts.port) if parts.port else ''}{parts.path}"


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:300]
