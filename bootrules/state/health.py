"""How the state stores are doing, as every worker sees it, and the prober that finds out.

/healthz must answer at once whatever the database does, and the same from every worker.
So no request reads a store to say how it is. Every failure a process meets (a lookup, a
callback, a batch) is written to the board, and a prober thread tries each store every
PROBE_EVERY seconds with a read and a small write. With several workers the board is a
file in the runtime directory, shared by all of them and read at most twice a second; a
single process keeps it in memory.

A part is degraded while its writes fail: from a failure until a probe that started after
it succeeds, and for at least HOLD seconds. It is *blocked* (a `once:` lookup falls through
at once, without waiting for the store) after the store gave no answer within its
deadline, until a probe succeeds again, and for good once the store was replaced: a new
store would forget which machines are installed, so only a restart accepts it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterator

from ..errors import StateError
from .database import REPLACED, Database, StoreReplaced, StoreStalled, open_database

log = logging.getLogger("bootrules")

PARTS = ("state", "machines_seen")
PROBE_EVERY = 2.0
HOLD = 10.0  # seconds a failure keeps its part degraded, whatever the probes say
READ_EVERY = 0.5  # seconds a worker reuses what it read of a shared board

# Held while a board is changed (its file locked and rewritten). A fork waits for it: a child
# must not inherit it taken, nor a copy of the locked file's descriptor.
_CHANGING = threading.Lock()
os.register_at_fork(before=_CHANGING.acquire, after_in_parent=_CHANGING.release,
                    after_in_child=_CHANGING.release)


@dataclass(frozen=True)
class PartStatus:
    """One store's health: its last failure, the last probe that succeeded, what it is."""

    error: str | None = None
    failed_at: float = 0.0
    stalled_at: float = 0.0
    ok_at: float = 0.0  # when the last successful probe started
    replaced: str | None = None  # sticky: why this store is no longer the one in use
    store_id: str | None = None  # the store's identity, once a probe has read it
    file: tuple[int, int] | None = None  # SQLite: the file's device and inode

    def degraded(self, now: float) -> bool:
        if self.replaced:
            return True
        return bool(self.failed_at) and (self.failed_at >= self.ok_at or now - self.failed_at < HOLD)

    @property
    def blocked(self) -> bool:
        return bool(self.replaced) or (bool(self.stalled_at) and self.stalled_at >= self.ok_at)

    @property
    def shown_error(self) -> str | None:
        return self.replaced or self.error


class HealthBoard:
    """The stores' health: in memory, or in a file every worker of a server shares."""

    def __init__(self, path: str | None = None, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._parts: dict[str, PartStatus] = {part: PartStatus() for part in PARTS}
        self._read_at = -READ_EVERY

    # ------------------------------------------------------------ reading

    def status(self, part: str) -> PartStatus:
        if self.path is not None and time.monotonic() - self._read_at >= READ_EVERY:
            self._parts = self._load()
            self._read_at = time.monotonic()
        return self._parts[part]

    def blocked(self, part: str) -> str | None:
        """Why `part` must not be waited for now (None: go ahead)."""
        found = self.status(part)
        if not found.blocked:
            return None
        return found.replaced or f"it gave no answer in time ({found.error})"

    def expected_id(self, part: str) -> Callable[[], str | None]:
        """For a Database: the identity the store must have (None until a probe has read it)."""
        return lambda: self.status(part).store_id

    # ------------------------------------------------------------ writing

    def failed(self, part: str, error: StateError | str) -> None:
        """Something this process tried on the store failed (a StateError says how)."""
        now, text = self.clock(), str(error)
        stalled = isinstance(error, StoreStalled)
        replaced = text if isinstance(error, StoreReplaced) and part == "state" else None

        def change(status: PartStatus) -> PartStatus:
            if replaced and not status.replaced:
                log.error("%s: %s", part, replaced)
            return replace(status, error=text, failed_at=now, stalled_at=now if stalled else status.stalled_at,
                           replaced=status.replaced or replaced)

        self._update(part, change)

    def learned(self, part: str, store_id: str, file: tuple[int, int] | None) -> None:
        """A process met the store with this identity while none was known: it is the one."""
        if self.status(part).store_id is None:
            self._update(part, lambda status: status if status.store_id is not None
                         else replace(status, store_id=store_id, file=file))

    def probed(self, part: str, started: float, store_id: str | None, file: tuple[int, int] | None,
               sticky_identity: bool) -> None:
        """A probe that started at `started` succeeded on a store with this identity."""

        def change(status: PartStatus) -> PartStatus:
            if status.store_id is not None and (store_id != status.store_id or (status.file and file != status.file)):
                if sticky_identity:
                    if not status.replaced:
                        log.error("%s: %s", part, REPLACED)
                    return replace(status, replaced=REPLACED, error=REPLACED, failed_at=self.clock())
                log.warning("%s: the store was replaced; recording into the new one", part)
            return replace(status, ok_at=max(status.ok_at, started), store_id=store_id, file=file)

        self._update(part, change)

    def _update(self, part: str, change: Callable[[PartStatus], PartStatus]) -> None:
        with _CHANGING, self._file_locked():
            parts = self._load() if self.path is not None else self._parts
            parts = {**parts, part: change(parts[part])}
            self._parts = parts
            if self.path is not None:
                self._store(parts)
                self._read_at = time.monotonic()

    @contextlib.contextmanager
    def _file_locked(self) -> Iterator[None]:
        if self.path is None:
            yield
            return
        try:
            lock = open(self.path + ".lock", "a")
        except OSError:  # the runtime directory is gone or full: keep what this process knows
            yield
            return
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _load(self) -> dict[str, PartStatus]:
        assert self.path is not None
        try:
            with open(self.path) as stream:
                saved = json.load(stream)
            return {part: PartStatus(**{**saved.get(part, {}), "file": tuple(saved[part]["file"])
                                        if saved.get(part, {}).get("file") else None}) for part in PARTS}
        except (OSError, ValueError, TypeError, KeyError):
            return dict(self._parts)

    def _store(self, parts: dict[str, PartStatus]) -> None:
        assert self.path is not None
        temporary = f"{self.path}.{os.getpid()}"
        try:
            with open(temporary, "w") as stream:
                json.dump({part: asdict(status) for part, status in parts.items()}, stream)
            os.replace(temporary, self.path)
        except OSError:
            pass  # the board in memory still holds it, for this process


@dataclass(frozen=True)
class ProbedStore:
    """A store the prober tries: its board part, where it is, and whether its identity is sticky."""

    part: str
    location: str
    sticky_identity: bool


class Prober:
    """A thread that tries each store with a read and a write every PROBE_EVERY seconds."""

    def __init__(self, board: HealthBoard, stores: list[ProbedStore], interval: float = PROBE_EVERY) -> None:
        self.board = board
        self.stores = stores
        self.interval = interval
        self._databases: dict[str, Database] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None and self.stores:
            self._thread = threading.Thread(target=self._run, daemon=True, name="bootrules-state-prober")
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for database in self._databases.values():
            database.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.probe_all()
            self._stop.wait(self.interval)

    def probe_all(self) -> None:
        for store in self.stores:
            self.probe(store)

    def probe(self, store: ProbedStore) -> None:
        """One read and one write; the outcome goes to the board."""
        if not _exists(store.location) and self.board.status(store.part).store_id is None:
            return  # no store yet: nothing has needed one
        database = self._databases.get(store.part)
        if database is None:
            database = self._databases[store.part] = open_database(
                store.location, expected_id=self.board.expected_id(store.part) if store.sticky_identity
                else lambda: None)
        started = self.board.clock()
        try:
            database.run(lambda cursor: cursor.execute(database.sql(
                "INSERT INTO bootrules_meta (key, value) VALUES ('heartbeat', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value"), (str(started),)), write=True)
        except StateError as error:
            self.board.failed(store.part, error)
            return
        self.board.probed(store.part, started, database.store_id, database.file_identity(), store.sticky_identity)


def _exists(location: str) -> bool:
    return "://" in location or os.path.exists(location)
