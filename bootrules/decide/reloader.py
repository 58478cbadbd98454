"""Follow the rules file on disk and keep the last good rules, never serving a broken one.

A reload builds a whole new Snapshot off to the side and then swaps one reference, so a
request sees either the old rules or the new ones, never a mix, and needs no lock. A file
that fails to load leaves the last good snapshot in place; the failure is logged once
and kept for /healthz until a good version appears.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import datetime, timezone
from typing import Callable

from .engine import Snapshot
from ..rules.loader import RulesError, load_rules
from ..metrics import Metrics
from ..wakeup import Wakeup

log = logging.getLogger("bootrules")

FileSignature = tuple[int, int, int, int]


def file_signature(path: str) -> FileSignature | None:
    """Identify one version of a file (following symlinks), or None if it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


_RETRY = object()  # an attempt that must be repeated whatever the file looks like


class Reloader:
    """Holds the rules currently served and replaces them when the file changes.

    `metrics` counts loads; `status_path` is where the last load's outcome is published
    for the workers' /healthz (several workers).
    """

    def __init__(self, path: str, poll_interval: float = 1.0, *, metrics: Metrics | None = None,
                 status_path: str | None = None,
                 on_changed: Callable[[], None] | None = None, counts_as_reload: bool = False,
                 on_loaded: Callable[[Snapshot], None] | None = None) -> None:
        self.path = path
        self.poll_interval = poll_interval
        self.metrics = metrics
        self.status_path = status_path
        # Given, the file is only followed here: `on_changed` is called where a load would be,
        # and someone else loads (the supervisor of several workers starts a new generation).
        self.on_changed = on_changed
        # The first load of a process that replaces another's rules (a new generation).
        self.counts_as_reload = counts_as_reload
        # Told of each version loaded, before anyone is answered from it (off the request path).
        self.on_loaded = on_loaded
        self.snapshot: Snapshot | None = None
        self.last_error: RulesError | None = None
        self.last_error_at: datetime | None = None
        self._wakeup = Wakeup()
        self._forced = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        # The file version last loaded or tried, and the one seen at the previous poll.
        self._attempted: object = None
        self._previous_tick: object = None
        # The other files the rules were read from (inventory, templates): an edit of any reloads.
        self.watched: tuple[str, ...] = ()
        # With several workers the supervisor learns `watched` from a leader's report while
        # the watcher thread polls: a poll must see the paths and the versions agree.
        self._versions = threading.Lock()

    # ------------------------------------------------------------ loading

    def reload(self) -> bool:
        """Load the file now; on success serve it, on failure keep the last good rules."""
        with self._versions:
            before = self.signature()
            self._attempted = before
        if self.on_changed is not None:
            self.on_changed()
            return True
        started = time.monotonic()
        try:
            ruleset = load_rules(self.path)
        except RulesError as error:
            self.watch(error.watched)
            self._record_failure(error)
            if self.metrics is not None:
                self.metrics.load_failed()
            self._write_status()
            return False
        after = self.signature()
        if before != after:
            # Written to while we read it: this may be half a file. The next tick retries.
            self.retry()
            return False
        self.watch(ruleset.watched)
        first = self.snapshot is None and not self.counts_as_reload
        snapshot = Snapshot(ruleset=ruleset, loaded_at=datetime.now(timezone.utc))
        took = time.monotonic() - started
        if self.on_loaded is not None:
            try:
                self.on_loaded(snapshot)
            except Exception:  # what the rules need ahead is made again on first use
                log.exception("preparing for the rules from %s failed", self.path)
        self.snapshot = snapshot
        if self.metrics is not None:  # the load at start-up is not a reload
            self.metrics.loaded(len(ruleset), self.snapshot.loaded_at.timestamp(), reload=not first)
        if self.last_error is not None:
            log.info("rules file %s is valid again", self.path)
        self.last_error = None
        self.last_error_at = None
        log.info("loaded %d rules from %s in %.2f s", len(ruleset), self.path, took)
        self._write_status()
        return True

    def signature(self) -> tuple[FileSignature | None, ...]:
        """One version of the rules file and of every file it names."""
        return (file_signature(self.path), *(file_signature(path) for path in self.watched))

    def watch(self, paths: tuple[str, ...]) -> None:
        """Follow these files too (the rules' inventory and templates, as the last load named
        them); what was last attempted stays attempted."""
        paths = tuple(paths)
        with self._versions:
            if paths == self.watched:
                return
            attempted_now = self._attempted == self.signature()
            self.watched = paths
            if attempted_now:
                self._attempted = self.signature()
            self._previous_tick = self.signature()

    def retry(self) -> None:
        """Load again at the next tick, even if the file looks the same (it changed while read)."""
        self._attempted = _RETRY

    def _write_status(self) -> None:
        """Publish the last reload's outcome for the workers' /healthz (several workers only)."""
        if self.status_path is None:
            return
        status = {
            "reload_error": list(self.last_error.problems) if self.last_error else None,
            "reload_error_at": self.last_error_at.isoformat(timespec="seconds") if self.last_error_at else None,
        }
        temporary = f"{self.status_path}.{os.getpid()}"
        with open(temporary, "w") as stream:
            json.dump(status, stream)
        os.replace(temporary, self.status_path)

    def reload_status(self) -> tuple[list[str] | None, str | None]:
        """The last reload error and its time: this process's own, or the last leader's."""
        if self.status_path is not None:
            try:
                with open(self.status_path) as stream:
                    status = json.load(stream)
                return status["reload_error"], status["reload_error_at"]
            except (OSError, ValueError, KeyError):
                pass
        error = list(self.last_error.problems) if self.last_error else None
        return error, self.last_error_at.isoformat(timespec="seconds") if self.last_error_at else None

    def _record_failure(self, error: RulesError) -> None:
        if self.last_error is not None and self.last_error.problems == error.problems:
            return  # logged already
        if self.snapshot is not None:
            keeping = (
                f"still serving the {len(self.snapshot.ruleset)} rules loaded at "
                f"{self.snapshot.loaded_at:%Y-%m-%d %H:%M:%S} UTC"
            )
        elif self.counts_as_reload:
            keeping = "the workers go on serving the rules loaded before"
        else:
            keeping = "no rules loaded: every machine is told to boot from its next device"
        log.error("cannot load rules (%s):\n%s", keeping, error)
        self.last_error = error
        self.last_error_at = datetime.now(timezone.utc)

    def reload_if_changed(self) -> bool:
        """Reload if the file has changed and then stayed unchanged for one poll interval.

        Waiting for the file to settle skips the moment between an editor truncating a
        file and writing it back, which would otherwise be read as an empty file.
        """
        with self._versions:
            signature = self.signature()
            if signature == self._attempted:
                return False  # nothing new since the last attempt, good or bad
            if signature != self._previous_tick:
                self._previous_tick = signature
                return False
        return self.reload()

    # ------------------------------------------------------------ watching

    def request_reload(self) -> None:
        """Ask the watcher to reload at once (SIGHUP). Safe in a signal handler: no lock is taken."""
        self._forced = True
        self._wakeup.notify()

    def start(self) -> None:
        """Start the background thread that follows the file; idempotent."""
        if self._thread is not None or self.poll_interval <= 0:
            return
        self._previous_tick = self.signature()
        self._thread = threading.Thread(target=self._watch, name="bootrules-rules-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the watcher thread and wait for it."""
        self._stopping = True
        self._wakeup.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _watch(self) -> None:
        while not self._stopping:
            self._wakeup.wait(self.poll_interval)
            if self._stopping:
                return
            try:
                if self._forced:
                    self._forced = False
                    log.info("reloading %s on request", self.path)
                    self.reload()
                else:
                    self.reload_if_changed()
            except Exception:  # never let the watcher die; the next tick tries again
                log.exception("unexpected error while reloading %s", self.path)
                time.sleep(self.poll_interval)
