"""`once:` rules: answer a machine until it reports done, then let it fall through.

Which machine: a machine is known by its SMBIOS UUID when it sends a real one, and by the
MAC of the NIC it boots from. The UUID comes first because it is the same whichever NIC
boots: a machine with two NICs that installed through one must not reinstall through the
other. The MAC is kept beside it, so a done machine stays done if its firmware later
boots without reporting a UUID. A board that shares a bogus UUID with others (it happens
on cheap boards) would make its twins count as done too: they fall through to the disk,
never reinstall, and `rearm --mac` fixes them.

Failing safe: when the state cannot be read, or a new machine's row cannot be written when
it must be (bootrules.arming says when), a `once:` rule does not match (the machine falls
through as if done). A machine that may be installed is never reinstalled because a
database was down; one that should install waits for the store to come back.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from . import tokens
from .arming import ArmWriter
from ..logs import log_fields
from ..model import Facts, Rule
from .store import OnceRow, StateError, Store, open_store

log = logging.getLogger("bootrules")

DONE_PATH = "/done/"
TOKEN = re.compile(r"[A-Za-z0-9_-]{32,128}")  # 32: a random token of bootrules before signed ones
SHOWN_CHARS = 6  # of a token, in logs: enough to correlate, far too few to use
WARN_EVERY = 10.0  # seconds between two warnings that the store fails
ARMED_FIELDS = ("machine", "rule", "label", "token", "client", "expires")


def identities(facts: Facts) -> tuple[str, ...]:
    """The names a machine's state hangs on: its UUID (if real), then its MAC."""
    names = []
    if facts.get("uuid"):
        names.append(f"uuid:{facts['uuid']}")
    if facts.get("mac"):
        names.append(f"mac:{facts['mac']}")
    return tuple(names)


def shown(token: str | None) -> str:
    """A token as logs show it: its first characters only."""
    return (token or "")[:SHOWN_CHARS] + "…"


@dataclass(frozen=True)
class Callback:
    """The outcome of POST /done/<token>: HTTP status and one line for the caller."""

    status: str
    message: str


class OnceGate:
    """Decides, per machine, whether a `once:` rule still answers it; takes the callbacks.

    The store is opened in the process that first needs it (forked workers each open their
    own connection); rules without `once:` never come here.
    """

    def __init__(self, location: str, default_lifetime: int, metrics: object | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.location = location
        self.default_lifetime = default_lifetime
        self.metrics = metrics
        self.clock = clock
        self._store: Store | None = None
        self._lock = threading.Lock()
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self._warned_at = 0.0
        self._suppressed = 0
        self.arms = ArmWriter(location, self._failed, self._rows_written)

    @property
    def kind(self) -> str:
        return "postgresql" if self.location.startswith(("postgresql://", "postgres://")) else "sqlite"

    def store(self) -> Store:
        with self._lock:
            if self._store is None:
                self._store = open_store(self.location)
            return self._store

    # ------------------------------------------------------------ the boot path

    def token_for(self, rule: Rule, facts: Facts, client: str) -> str | None:
        """The live token if `rule` still answers this machine; None if it falls through."""
        assert rule.once is not None
        names = identities(facts)
        if not names:
            self._skip(rule, "-", "the machine sent neither a MAC nor a UUID, so its state cannot be kept")
            return None
        label, now = rule.once.label, self.clock()
        try:
            store = self.store()
            done, row = store.lookup(names, rule.name, label, now)
            issued = False
            if not done and row is None:
                row = self.arms.pending(names[0], rule.name, label, now)
            if not done and row is None:
                expires = now + (rule.once.expires or self.default_lifetime)
                token = tokens.issue(store.token_key(), names, rule.name, label, now, expires)
                row = OnceRow(names[0], rule.name, label, "armed", token, now, expires, None, None, names)
                issued = True
                if not self.arms.add(row):
                    done, row, issued = store.arm(row)
                    self.arms.written()
                    self._count("once_row_writes")
        except StateError as error:
            self._failed(str(error))
            self._skip(rule, names[0], f"state store unavailable ({error}); not risking a reinstall")
            return None
        self.last_error = None
        if done:
            return None
        if row is None or row.token is None:  # re-armed between its write and its read
            self._skip(rule, names[0], "its state changed while it was being read; it is answered at its next boot")
            return None
        if issued:
            log_fields("once: armed machine=%s rule=%s label=%s token=%s client=%s expires=%s",
                       (names[0], rule.name, rule.once.label, shown(row.token), client, _utc(row.expires_at)),
                       ARMED_FIELDS)
            self._count("once_tokens_issued")
        return row.token

    def _skip(self, rule: Rule, machine: str, reason: str) -> None:
        now = time.monotonic()
        if now - self._warned_at < WARN_EVERY:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more since the last warning)" if self._suppressed else ""
        self._warned_at, self._suppressed = now, 0
        log.warning("once: rule %s skipped for machine=%s: %s%s", rule.name, machine, reason, more)

    def _failed(self, reason: str) -> None:
        self.last_error = reason
        self.last_error_at = self.clock()
        self._count("state_errors")

    def _rows_written(self) -> None:
        self.last_error = None
        self._count("once_row_writes")

    def close(self) -> None:
        """Write the armed rows not written yet (a stopping worker), and close the store."""
        self.arms.close()
        if self._store is not None:
            self._store.close()

    def _count(self, name: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, name).inc()

    # ------------------------------------------------------------ the callback

    def redeem(self, token: str, peer: str, rules: Iterable[Rule] = ()) -> Callback:
        """POST /done/<token>: disarm the machine the token was issued to.

        `rules`: those in force; a token whose row is not written is checked against their
        `once:` names and labels.
        """
        if not TOKEN.fullmatch(token):
            return Callback("404 Not Found", "malformed token")
        try:
            store = self.store()
            key = store.token_key()

            def vouch() -> OnceRow | None:
                claims = tokens.read(token)
                if claims is None:
                    return None
                for rule in rules:
                    if rule.once is not None and tokens.signed_for(key, claims, rule.name, rule.once.label):
                        return OnceRow(claims.identities[0], rule.name, rule.once.label, "armed", token,
                                       claims.issued, claims.expires, None, None, claims.identities)
                return None

            outcome, row = store.redeem(token, peer, self.clock(), vouch)
        except StateError as error:
            self._failed(str(error))
            log.error("once: callback token=%s from=%s not stored: %s", shown(token), peer, error)
            return Callback("503 Service Unavailable", f"the state store is unavailable ({error}); try again")
        self.last_error = None
        if self.metrics is not None:
            self.metrics.once_callbacks.labels(outcome).inc()
        if row is None:
            log.info("once: callback token=%s from=%s: unknown token", shown(token), peer)
            return Callback("404 Not Found", "unknown token (re-armed, or never issued)")
        what = f"machine {row.machine}, rule '{row.rule}', label {row.label}"
        if outcome == "expired":
            log.info("once: callback token=%s from=%s: expired (%s)", shown(token), peer, what)
            return Callback("410 Gone", f"token expired at {_utc(row.expires_at)}; boot the machine again for a new one")
        if outcome == "already":
            return Callback("200 OK", f"already done: {what}")
        log.info("once: done machine=%s rule=%s label=%s token=%s from=%s", row.machine, row.rule, row.label,
                 shown(token), peer)
        return Callback("200 OK", f"done: {what}; from its next boot the rules below answer it")

    # ------------------------------------------------------------ health

    def health(self, probe: bool) -> dict[str, object]:
        """The store's state for /healthz; `probe` tries it now (each worker has its own connection)."""
        if probe:
            try:
                self.store().check()
                self.last_error = None
            except StateError as error:
                self._failed(str(error))
        error = self.last_error or self.arms.failing
        return {"store": self.kind, "status": "error" if error else "ok", "error": error}


def _utc(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
