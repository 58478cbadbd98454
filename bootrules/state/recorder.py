"""Recording the machines seen, off the request path.

A decision only puts what it saw into this process's in-memory batch, coalesced by
machine (a machine that asks ten times in a second is one row to write). A thread writes
the batch every FLUSH_EVERY seconds, in transactions of at most CHUNK machines, giving the
GIL back between them, so the worker's loop thread never waits long for it. (The batches
go to a SQLite file of their own: see Settings.machines_location.)
When the batch is full (the store is slow or down), a machine not in it yet is dropped
and counted (bootrules_machine_records_dropped_total): the machine is answered as ever.
A batch the store refused is put back, as far as there is room, and tried again.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from . import machines
from .machines import Sighting
from ..model import Facts
from .store import StateError, Store, open_store

log = logging.getLogger("bootrules")

FLUSH_EVERY = 1.0  # seconds
CHUNK = 64  # machines written per transaction
MAX_PENDING = 20000  # machines waiting to be written, per process
PRUNE_EVERY = 60.0  # seconds between two passes of the retention limits
WARN_EVERY = 60.0  # seconds between two warnings that recording fails
RECORDER_NICENESS = 10  # the writer thread's nice value (Linux schedules threads one by one)


class Recorder:
    """Per process: batches the machines seen and writes them to the state store."""

    def __init__(self, location: str, keep_seconds: int, max_machines: int, metrics: Any = None,
                 clock: Callable[[], float] = time.time, max_pending: int = MAX_PENDING,
                 store: Store | None = None) -> None:
        self.location = location
        self.keep_seconds = keep_seconds
        self.max_machines = max_machines
        self.metrics = metrics
        self.clock = clock
        self.max_pending = max_pending
        self._store = store
        self._lock = threading.Lock()
        self._pending: dict[str, Sighting] = {}
        self._minutes: dict[tuple[int, str], int] = {}
        self._thread_pid = 0
        self._wakeup = threading.Event()
        self._write_lock = threading.Lock()  # one batch written at a time (the thread, or close())
        self._pruned_at = 0.0
        self._warned_at = 0.0
        self.last_error: str | None = None

    def store(self) -> Store:
        if self._store is None:  # its own connection: a batch never waits behind a decision's
            self._store = open_store(self.location, patient=True)
        return self._store

    # ------------------------------------------------------------ the request path

    def saw(self, facts: Facts, client: str, rule: str, action: str, unknown: bool) -> None:
        """Note one decision. Never raises, never waits for the store; a few dict operations."""
        when = self.clock()
        minute = (int(when // 60), action)
        # The machine's name: its UUID when real, else its MAC (as once: names it), else
        # the address it asked from.
        uuid = facts.get("uuid")
        if uuid:
            machine = "uuid:" + uuid
        else:
            mac = facts.get("mac")
            machine = "mac:" + mac if mac else "ip:" + client
        with self._lock:
            if self._thread_pid != os.getpid():
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
        threading.Thread(target=self._write_now_and_then, args=(os.getpid(),), daemon=True,
                         name="bootrules-recorder").start()
        atexit.register(self.flush)

    def _write_now_and_then(self, pid: int) -> None:
        # Below the loop thread in the CPU scheduler: on a busy box the machines come first,
        # and the batches catch up in the quiet after a storm. (This thread holds the GIL
        # only in short slices, so it cannot hold up the loop thread while it waits.)
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), RECORDER_NICENESS)
        except OSError:
            pass
        while os.getpid() == pid:
            self._wakeup.wait(FLUSH_EVERY)
            self._wakeup.clear()
            self.flush()

    def flush(self) -> int:
        """Write what is pending now; return how many machines were written."""
        with self._write_lock:
            with self._lock:
                batch, self._pending = self._pending, {}
                minutes, self._minutes = self._minutes, {}
            written = 0
            chunk: dict[str, Sighting] = {}
            try:
                store = self.store() if batch or minutes else None
                while batch or minutes:
                    # Taken out of the batch a chunk at a time, so that each chunk is also
                    # freed on its own: freeing thousands of objects at once holds the GIL.
                    chunk = dict(batch.popitem() for _ in range(min(CHUNK, len(batch))))
                    machines.write(store, chunk, minutes)  # type: ignore[arg-type]
                    minutes = {}
                    written += len(chunk)
                    chunk = {}
                    # Hand the GIL back between chunks: the loop thread answering machines
                    # must never wait long for this thread's Python work.
                    time.sleep(0)
                now = self.clock()
                if now - self._pruned_at >= PRUNE_EVERY and store is not None:
                    self._pruned_at = now
                    machines.prune(store, self.keep_seconds, self.max_machines, now)
                self.last_error = None
            except StateError as error:
                self._failed(str(error), {**chunk, **batch}, minutes)
            if self.metrics is not None and written:
                self.metrics.machine_records_written.inc(written)
            return written

    def _failed(self, reason: str, unsent: dict[str, Sighting], minutes: dict[tuple[int, str], int]) -> None:
        """Keep what was not written, as far as there is room, for the next round."""
        self.last_error = reason
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
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            log.warning("machines seen not recorded (kept for the next try, %d dropped): %s", lost, reason)

    def close(self) -> None:
        """Write what is left (a stopping worker)."""
        if self._thread_pid == os.getpid():
            self.flush()
