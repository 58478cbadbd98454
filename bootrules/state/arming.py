"""Armed rows written after their machine is answered, a batch per transaction.

Why: in a boot storm on a `once:` rule every new machine needs a row. Written one by one
before each answer, every write waited for the other workers' hold on SQLite's one write
lock and then re-read the pages they had changed. A token proves itself
(bootrules.tokens), so its row need not be there before the machine is answered: a row
lost with its worker is a row the listing lacks, and the token still works.

A machine is only ever armed after a read of the store said it is not done. Until this
process has written to the store once (and again after a batch failed), rows are written
before the answer instead, so a store that cannot be written makes the rule fall through,
as one that cannot be read does.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from typing import Callable

from .store import OnceRow, StateError, Store, open_store

BATCH_AFTER = 0.02  # seconds a batch gathers rows before it is written
RETRY_EVERY = 1.0  # seconds between two tries of a batch the store refused
MAX_PENDING = 20000  # rows waiting, per process; past it, rows are written before the answer

Key = tuple[str, str, str]  # machine, rule, label


class ArmWriter:
    """Per process: the armed rows not written yet, and the thread that writes them."""

    def __init__(self, location: str, on_error: Callable[[str], None], on_written: Callable[[], None],
                 max_pending: int = MAX_PENDING) -> None:
        self.location = location
        self.on_error = on_error
        self.on_written = on_written
        self.max_pending = max_pending
        self._store: Store | None = None
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # one batch at a time (the thread, or flush())
        self._pending: dict[Key, OnceRow] = {}
        self._wakeup = threading.Event()
        self._pid = 0
        self.writable = False  # whether this process's last write to the store succeeded
        self.failing: str | None = None  # why the last batch could not be written

    def store(self) -> Store:
        if self._store is None:  # its own connection, which may wait for the lock off the request path
            self._store = open_store(self.location, patient=True)
        return self._store

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
            if not self.writable or len(self._pending) >= self.max_pending:
                return False
            self._pending[(row.machine, row.rule, row.label)] = row
        self._wakeup.set()
        return True

    def written(self) -> None:
        """A write of this process succeeded: rows may wait for the batch again."""
        self.writable = True

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
            self._wakeup.wait()
            time.sleep(BATCH_AFTER)
            self._wakeup.clear()
            if self.flush() < 0:
                time.sleep(RETRY_EVERY)
                self._wakeup.set()

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
                self.on_error(self.failing)
                return -1
            with self._lock:
                for row in rows:  # a row armed again meanwhile (a new token) stays for the next batch
                    key = (row.machine, row.rule, row.label)
                    if self._pending.get(key) is row:
                        del self._pending[key]
            self.writable, self.failing = True, None
            self.on_written()
            return len(rows)

    def close(self) -> None:
        """Write what is left (a stopping worker), and close the connection."""
        if self._pid == os.getpid():
            self.flush()
        if self._store is not None:
            self._store.close()
