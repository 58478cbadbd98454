"""Recording the machines seen, off the request path.

A decision only puts what it saw into this process's in-memory batch, coalesced by
machine (a machine that asks ten times in a second is one row to write). A thread writes
the batch every FLUSH_EVERY seconds, in transactions of at most CHUNK machines, giving the
GIL back between them, so the worker's loop thread never waits long for it. (The batches
go to a SQLite file of their own: see Settings.machines_location.)
When the batch is full (the store is slow or down), a machine not in it yet is dropped
and counted (bootrules_machine_records_dropped_total): the machine is answered as ever.
A batch the store refused is put back, as far as there is room, and tried again.

Bounds: `--machines-max` holds after every batch (a batch that may cross it is followed by
a count and a prune at once), and the WAL is truncated once it has passed its limit
(bootrules.state.database). With SQLite, recording gives way when the disk is nearly
full: while less than the reserve is free, batches are dropped and counted, so that a
`done` callback, which matters more, still finds room.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import pid
from ..errors import StateError
from ..model import Facts, machine_key
from .health import HealthBoard
from .machine_store import MachineStore, Sighting

log = logging.getLogger("bootrules")

FLUSH_EVERY = 1.0  # seconds
CHUNK = 64  # machines written per transaction
MAX_PENDING = 20000  # machines waiting to be written, per process
PRUNE_EVERY = 60.0  # seconds between two passes of the retention limits
WARN_EVERY = 60.0  # seconds between two warnings that recording fails
LAST_FLUSH_PATIENCE = 6.0  # seconds a stopping worker keeps trying to write what it saw
RECORDER_NICENESS = 10  # the writer thread's nice value (Linux schedules threads one by one)
DISK_RESERVE = 64 * 1024 * 1024  # bytes left free for `once:` state; 5% of a disk smaller than 1.3 GB


class Recorder:
    """Per process: batches the machines seen and writes them to the state store.

    `directory`: where a SQLite store's file lies (its free space is checked); None for a
    server.
    """

    def __init__(self, open_store: Callable[[], MachineStore], keep_seconds: int, max_machines: int,
                 metrics: Any = None, board: HealthBoard | None = None, directory: str | None = None,
                 clock: Callable[[], float] = time.time, max_pending: int = MAX_PENDING) -> None:
        self.open_store = open_store
        self.keep_seconds = keep_seconds
        self.max_machines = max_machines
        self.metrics = metrics
        self.board = board
        self.directory = directory
        self.clock = clock
        self.max_pending = max_pending
        self._store: MachineStore | None = None
        self._stored: int | None = None  # machines in the store: last counted, plus those written since
        self._lock = threading.Lock()
        self._pending: dict[str, Sighting] = {}
        self._minutes: dict[tuple[int, str], int] = {}
        self._thread_pid = 0
        self._wakeup = threading.Event()
        self._write_lock = threading.Lock()  # one batch written at a time (the thread, or close())
        self._pruned_at = 0.0
        self._warned_at = 0.0
        self._stopped = False
        self.last_error: str | None = None

    def store(self) -> MachineStore:
        if self._store is None:  # its own connection: a batch never waits behind a decision's
            self._store = self.open_store()
        return self._store

    # ------------------------------------------------------------ the request path

    def saw(self, facts: Facts, client: str, rule: str, action: str, unknown: bool) -> None:
        """Note one decision. Never raises, never waits for the store; a few dict operations."""
        when = self.clock()
        minute = (int(when // 60), action)
        machine = machine_key(facts, client)
        with self._lock:
            if self._thread_pid != pid.current:
                self._start()
            minutes = self._minutes
            minutes[minute] = minutes.get(minute, 0) + 1
            seen = self._pending.get(machine)
            if seen is not None:
                seen.add(facts, client, when, rule, action, unknown)
                return
            if len(self._pending) < self.max_pending:
                self._pending[machine] = Sighting(facts, client, when, rule, action, unknown)
                return
        if self.metrics is not None:
            self.metrics.machine_records_dropped.inc()

    # ------------------------------------------------------------ writing

    def _start(self) -> None:
        """Start this process's writer (after a fork the parent's thread is not here)."""
        self._thread_pid = os.getpid()
        self._pending, self._minutes = {}, {}  # a parent's batch is the parent's to write
        self._store, self._stored = None, None
        threading.Thread(target=self._write_now_and_then, args=(os.getpid(),), daemon=True,
                         name="bootrules-recorder").start()
        atexit.register(self.flush)

    def _write_now_and_then(self, started_in: int) -> None:
        # Below the loop thread in the CPU scheduler: on a busy box the machines come first,
        # and the batches catch up in the quiet after a storm. (This thread holds the GIL
        # only in short slices, so it cannot hold up the loop thread while it waits.)
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), RECORDER_NICENESS)
        except OSError:
            pass
        while os.getpid() == started_in and not self._stopped:
            self._wakeup.wait(FLUSH_EVERY)
            self._wakeup.clear()
            self.flush()

    def flush(self) -> int:
        """Write what is pending now; return how many machines were written."""
        with self._write_lock:
            with self._lock:
                batch, self._pending = self._pending, {}
                minutes, self._minutes = self._minutes, {}
            if not batch and not minutes:
                return 0
            short = self._disk_short()
            if short:
                self._drop(batch, short)
                return 0
            written = 0
            chunk: dict[str, Sighting] = {}
            try:
                store = self.store()
                while batch or minutes:
                    # Taken out of the batch a chunk at a time, so that each chunk is also
                    # freed on its own: freeing thousands of objects at once holds the GIL.
                    chunk = dict(batch.popitem() for _ in range(min(CHUNK, len(batch))))
                    store.write(chunk, minutes)
                    minutes = {}
                    written += len(chunk)
                    chunk = {}
                    # Hand the GIL back between chunks: the loop thread answering machines
                    # must never wait long for this thread's Python work.
                    time.sleep(0)
                self._keep_within_limits(store, written)
                self.last_error = None
            except StateError as error:
                self._failed(error, {**chunk, **batch}, minutes)
            if self.metrics is not None and written:
                self.metrics.machine_records_written.inc(written)
            return written

    def _keep_within_limits(self, store: MachineStore, written: int) -> None:
        """Prune at once when this batch may have crossed --machines-max (counting a machine
        seen again as new), and every PRUNE_EVERY seconds for the age limit."""
        now = self.clock()
        self._stored = store.count() if self._stored is None else self._stored + written
        if self._stored > self.max_machines or now - self._pruned_at >= PRUNE_EVERY:
            self._pruned_at = now
            store.prune(self.keep_seconds, self.max_machines, now)
            self._stored = store.count()

    def _disk_short(self) -> str | None:
        """Why not to write now: the disk under a SQLite store is nearly full (None: write)."""
        if self.directory is None:
            return None
        try:
            disk = os.statvfs(self.directory)
        except OSError:
            return None
        reserve = min(DISK_RESERVE, disk.f_blocks * disk.f_frsize // 20)
        free = disk.f_bavail * disk.f_frsize
        if free >= reserve:
            return None
        return f"the disk is nearly full ({free // 1024} KiB free, {reserve // 1024} KiB kept for once: state)"

    def _drop(self, batch: dict[str, Sighting], reason: str) -> None:
        if self.metrics is not None and batch:
            self.metrics.machine_records_dropped.inc(len(batch))
        self._report(reason, f"{len(batch)} dropped")

    def _failed(self, error: StateError, unsent: dict[str, Sighting], minutes: dict[tuple[int, str], int]) -> None:
        """Keep what was not written, as far as there is room, for the next round."""
        if self.metrics is not None:
            self.metrics.state_errors.inc()
        lost = 0
        with self._lock:
            for key, count in minutes.items():
                self._minutes[key] = self._minutes.get(key, 0) + count
            for machine, older in unsent.items():
                newer = self._pending.get(machine)
                if newer is not None:
                    newer.merge_older(older)
                elif len(self._pending) < self.max_pending:
                    self._pending[machine] = older
                else:
                    lost += 1
        if lost and self.metrics is not None:
            self.metrics.machine_records_dropped.inc(lost)
        self._report(str(error), f"kept for the next try, {lost} dropped", error)

    def _report(self, reason: str, what: str, error: StateError | None = None) -> None:
        self.last_error = reason
        if self.board is not None:
            self.board.failed("machines_seen", error or reason)
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            log.warning("machines seen not recorded (%s): %s", what, reason)

    def stop(self) -> None:
        """Stop recording in the background (an app that is done with; tests make many in one
        process): what is pending is written now, once, and the store is closed; nothing is
        left to write at exit, when the store may be long gone."""
        self._stopped = True
        self._wakeup.set()
        atexit.unregister(self.flush)
        if self._thread_pid == os.getpid():
            self.flush()
        with self._write_lock:
            store, self._store = self._store, None
        if store is not None:
            store.close()

    def close(self) -> None:
        """Write what is left (a stopping worker): tried again for a few seconds, since
        what is not written now is lost with the process."""
        if self._thread_pid != os.getpid():
            return
        give_up = time.monotonic() + LAST_FLUSH_PATIENCE
        self.flush()
        while self.last_error is not None and self._pending and time.monotonic() < give_up:
            time.sleep(0.2)
            self.flush()
