"""Armed rows written after their machine is answered, a batch per transaction; and the
upkeep of the `once:` rows.

Why batches: in a boot storm on a `once:` rule every new machine needs a row. Written one
by one before each answer, every write waited for the other workers' hold on SQLite's one
write lock and then re-read the pages they had changed. A token proves itself
(bootrules.state.tokens), so its row need not be there before the machine is answered: a
row lost with its worker is a row the listing lacks, and the token still works.

A machine is only ever armed after a read of the store said it is not done. Until this
process has written to the store once (and again after a batch failed), rows are written
before the answer instead, so a store that cannot be written makes the rule fall through,
as one that cannot be read does.

What bounds the rows: an armed row goes once its token has expired, a re-arm tombstone
once no token issued before it can still be live, and the rows of a rule and label no
longer in force 30 days after their last change (bootrules.state.once_store.prune, every
PRUNE_EVERY seconds). Past MAX_ARMED_ROWS armed rows (a flood of made-up machines under a
glob `once:` rule), new machines get their token but no row: the token still proves
itself, and nothing more is written until the count is back below the limit.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from typing import Callable

from ..errors import StateError
from .once_store import OnceRow, OnceStore

log = logging.getLogger("bootrules")

BATCH_AFTER = 0.02  # seconds a batch gathers rows before it is written
RETRY_EVERY = 1.0  # seconds between two tries of a batch the store refused
MAX_PENDING = 20000  # rows waiting, per process; past it, rows are written before the answer
PRUNE_EVERY = 60.0  # seconds between two passes of upkeep
MAX_ARMED_ROWS = 100_000

Key = tuple[str, str, str]  # machine, rule, label


class ArmWriter:
    """Per process: the armed rows not written yet, and the thread that writes them."""

    def __init__(self, open_store: Callable[[], OnceStore], on_error: Callable[[StateError], None],
                 on_written: Callable[[], None], in_force: Callable[[], set[tuple[str, str]]] = set,
                 max_pending: int = MAX_PENDING, max_armed: int = MAX_ARMED_ROWS) -> None:
        self.open_store = open_store
        self.on_error = on_error
        self.on_written = on_written
        self.in_force = in_force
        self.max_pending = max_pending
        self.max_armed = max_armed
        self._store: OnceStore | None = None
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # one batch at a time (the thread, or flush())
        self._pending: dict[Key, OnceRow] = {}
        self._wakeup = threading.Event()
        self._pid = 0
        self._pruned_at = 0.0
        self.armed = 0  # armed rows in the store, as last counted plus those written since
        self.writable = False  # whether this process's last write to the store succeeded
        self.failing: str | None = None  # why the last batch could not be written

    def store(self) -> OnceStore:
        if self._store is None:  # its own connection, which may wait for the lock off the request path
            self._store = self.open_store()
        return self._store

    @property
    def full(self) -> bool:
        """Whether the store holds MAX_ARMED_ROWS armed rows: new ones are not kept."""
        return self.armed >= self.max_armed

    def pending(self, machine: str, rule: str, label: str, now: float) -> OnceRow | None:
        """The row this process armed and has not written yet, if its token is live."""
        if self._pid != os.getpid():
            return None  # a forked worker has armed nothing yet (what it inherited is not its own)
        row = self._pending.get((machine, rule, label))
        return row if row is not None and row.expires_at > now else None

    def add(self, row: OnceRow) -> bool:
        """Queue `row` to be written; False if it must be written now (see the module's doc)."""
        with self._lock:
            if self._pid != os.getpid():
                self._start()
            if self.full and self.writable:
                return True  # the token proves itself; the row is not kept
            if not self.writable or len(self._pending) >= self.max_pending:
                return False
            self._pending[(row.machine, row.rule, row.label)] = row
        self._wakeup.set()
        return True

    def written(self) -> None:
        """A write of this process succeeded: rows may wait for the batch again."""
        self.writable = True
        self.armed += 1

    def _start(self) -> None:
        """Start this process's writer (after a fork, the parent's thread is not here)."""
        self._pid = os.getpid()
        self._pending = {}  # a parent's rows are the parent's to write
        self._store = None
        self.writable = False
        threading.Thread(target=self._write_now_and_then, args=(os.getpid(),), daemon=True,
                         name="bootrules-arming").start()
        atexit.register(self.flush)

    def _write_now_and_then(self, pid: int) -> None:
        while os.getpid() == pid:
            if self._wakeup.wait(PRUNE_EVERY):
                time.sleep(BATCH_AFTER)
                self._wakeup.clear()
                if self.flush() < 0:
                    time.sleep(RETRY_EVERY)
                    self._wakeup.set()
            if time.monotonic() - self._pruned_at >= PRUNE_EVERY:
                self.upkeep()

    def flush(self) -> int:
        """Write what is pending now: how many rows, or -1 if the store refused them (kept)."""
        with self._write_lock:
            with self._lock:
                rows = list(self._pending.values())
            if not rows:
                return 0
            try:
                self.store().write_arms(rows)
            except StateError as error:
                self.writable = False
                self.failing = f"armed rows not written yet ({len(rows)} kept): {error}"
                self.on_error(type(error)(self.failing))  # the same kind of failure (stalled, replaced…)
                return -1
            with self._lock:
                for row in rows:  # a row armed again meanwhile (a new token) stays for the next batch
                    key = (row.machine, row.rule, row.label)
                    if self._pending.get(key) is row:
                        del self._pending[key]
            self.writable, self.failing = True, None
            self.armed += len(rows)
            self.on_written()
            return len(rows)

    def upkeep(self) -> None:
        """Forget the rows that can no longer matter, and count the armed ones."""
        self._pruned_at = time.monotonic()
        try:
            store = self.store()
            removed = store.prune(time.time(), self.in_force())
            self.armed = store.count_armed()
        except StateError as error:
            log.warning("once: upkeep of the state store failed: %s", error)
            return
        if removed:
            log.info("once: forgot %d row(s) that can no longer matter", removed)
        if self.full:
            log.warning("once: %d armed rows (the most kept); new machines get tokens without rows until "
                        "they expire", self.armed)

    def close(self) -> None:
        """Write what is left (a stopping worker), and close the connection."""
        if self._pid == os.getpid():
            self.flush()
        if self._store is not None:
            self._store.close()
