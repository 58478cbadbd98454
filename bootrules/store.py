"""Keep the rules being served in step with the file on disk, never serving a broken one.

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
from dataclasses import dataclass, field
from typing import Callable
from datetime import datetime, timezone

from .loader import RulesError, load_rules
from .matching import Matcher
from .metrics import Metrics
from .model import Facts, Rule, RuleSet
from .render import render_no_match, render_rule

log = logging.getLogger("bootrules")

FileSignature = tuple[int, int, int, int]


def file_signature(path: str) -> FileSignature | None:
    """Identify one version of a file (following symlinks), or None if it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class Snapshot:
    """One loaded version of the rules, with its index and rendered scripts."""

    ruleset: RuleSet
    loaded_at: datetime
    signature: FileSignature | None = None
    matcher: Matcher = field(init=False)
    _scripts: dict[int, str] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.matcher = Matcher(self.ruleset.rules)

    def decide(self, facts: Facts) -> tuple[Rule | None, str]:
        """Return the rule that answers for `facts` (None: no rule) and the script to send."""
        rule = self.matcher.first_match(facts)
        if rule is None:
            return None, NO_MATCH_SCRIPT
        key = id(rule)
        script = self._scripts.get(key)
        if script is None:  # rendered on first use; a race only renders the same text twice
            script = self._scripts[key] = render_rule(rule)
        return rule, script


NO_MATCH_SCRIPT = render_no_match()
_RETRY = object()  # an attempt that must be repeated whatever the file looks like


class RuleStore:
    """Holds the rules currently served and replaces them when the file changes."""

    def __init__(self, path: str, poll_interval: float = 1.0) -> None:
        self.path = path
        self.poll_interval = poll_interval
        self.snapshot: Snapshot | None = None
        self.last_error: RulesError | None = None
        self.last_error_at: datetime | None = None
        self.metrics: Metrics | None = None  # set by create_app (and by serve, for the parent)
        # With several workers the parent loads; these tell it and its workers what happened.
        self.on_loaded: Callable[[], None] | None = None
        self.status_path: str | None = None
        self._reload_now = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # The file version last loaded or tried, and the one seen at the previous poll.
        self._attempted: object = None
        self._previous_tick: FileSignature | None = None

    # ------------------------------------------------------------ loading

    def reload(self) -> bool:
        """Load the file now; on success serve it, on failure keep the last good rules."""
        before = file_signature(self.path)
        self._attempted = before
        started = time.monotonic()
        try:
            ruleset = load_rules(self.path)
        except RulesError as error:
            self._record_failure(error)
            if self.metrics is not None:
                self.metrics.load_failed()
            self._write_status()
            return False
        after = file_signature(self.path)
        if before != after:
            # Written to while we read it: this may be half a file. The next tick retries.
            self._attempted = _RETRY
            return False
        self.snapshot = Snapshot(ruleset=ruleset, loaded_at=datetime.now(timezone.utc), signature=after)
        if self.metrics is not None:
            self.metrics.loaded(len(ruleset), self.snapshot.loaded_at.timestamp())
        if self.last_error is not None:
            log.info("rules file %s is valid again", self.path)
        self.last_error = None
        self.last_error_at = None
        log.info("loaded %d rules from %s in %.2f s", len(ruleset), self.path, time.monotonic() - started)
        self._write_status()
        if self.on_loaded is not None:
            self.on_loaded()
        return True

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
        """The last reload error and its time: this process's own, or the parent's."""
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
        signature = file_signature(self.path)
        if signature == self._attempted:
            return False  # nothing new since the last attempt, good or bad
        if signature != self._previous_tick:
            self._previous_tick = signature
            return False
        return self.reload()

    # ------------------------------------------------------------ watching

    def request_reload(self) -> None:
        """Ask the watcher to reload at once (SIGHUP); safe to call from a signal handler."""
        self._reload_now.set()

    def start(self) -> None:
        """Start the background thread that follows the file; idempotent."""
        if self._thread is not None or self.poll_interval <= 0:
            return
        self._previous_tick = file_signature(self.path)
        self._thread = threading.Thread(target=self._watch, name="bootrules-rules-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the watcher thread and wait for it."""
        self._stop.set()
        self._reload_now.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _watch(self) -> None:
        while not self._stop.is_set():
            forced = self._reload_now.wait(self.poll_interval)
            if self._stop.is_set():
                return
            try:
                if forced:
                    self._reload_now.clear()
                    log.info("reloading %s on request", self.path)
                    self.reload()
                else:
                    self.reload_if_changed()
            except Exception:  # never let the watcher die; the next tick tries again
                log.exception("unexpected error while reloading %s", self.path)
                time.sleep(self.poll_interval)
