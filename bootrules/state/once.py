"""`once:` rules: answer a machine until it reports done, then let it fall through.

Which machine: a machine is known by its SMBIOS UUID when it sends a real one, and by the
MAC of the NIC it boots from (bootrules.model.machine_names). The UUID comes first because
it is the same whichever NIC boots: a machine with two NICs that installed through one
must not reinstall through the other. The MAC is kept beside it, so a done machine stays
done if its firmware later boots without reporting a UUID. A board that shares a bogus
UUID with others (it happens on cheap boards) would make its twins count as done too:
they fall through to the disk, never reinstall, and `rearm --mac` fixes them.

Failing safe: when the state cannot be read, gives no answer within its deadline, was
replaced, or a new machine's row cannot be written when it must be (bootrules.state.arming
says when), a `once:` rule does not match (the machine falls through as if done). A
machine that may be installed is never reinstalled because a database was down; one that
should install waits for the store to come back.

The callback: a signed token says which machine it was issued to, and its tag, checked
against the `once:` rules in force, which rule and label; all of that before the store is
touched, so a made-up token costs a few HMACs and no I/O. Its row is then found by its
primary key.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from ..clock import utc
from ..errors import StateError
from ..logs import log_fields
from ..model import Facts, Rule, machine_names
from ..settings import Settings
from . import is_server, open_stores, tokens
from .arming import ArmWriter
from .health import HealthBoard
from .once_store import OnceRow, OnceStore

log = logging.getLogger("bootrules")

DONE_PATH = "/done/"
DONE = "done"  # token_for's answer for a machine that has reported done (never a token: too short)
# What a files token of a rule without `once:` is signed for, in place of a `once:` label
# (which can never be this: a token of one is never a token of the other).
FILES_LABEL = "\x00files"
TOKEN = re.compile(r"[A-Za-z0-9_-]{32,128}")
UNSIGNED_LENGTH = 32  # a random token of bootrules before signed ones
SHOWN_CHARS = 6  # of a token, in logs: enough to correlate, far too few to use
WARN_EVERY = 10.0  # seconds between two warnings that the store fails
ARMED_FIELDS = ("machine", "rule", "label", "token", "client", "expires")


def shown(token: str | None) -> str:
    """A token as logs show it: its first characters only."""
    return (token or "")[:SHOWN_CHARS] + "…"


def make_store_ahead(settings: Settings, board: HealthBoard) -> None:
    """Make the `once:` state file now, when rules with `once:` have loaded, if it is not there.

    Otherwise the first machine a `once:` rule answers would make it, on the request path:
    journal mode, schema and identity are several syncs to disk, which the deadline's
    interrupt cannot cut short, so on a slow or stalled disk that machine's worker would
    stop answering everyone. A file the server has used already is never made again (it
    was deleted or replaced: bootrules.state.database refuses it), nor is a PostgreSQL
    schema made here (the prober does it, as it connects at start). A failure is logged
    and put on the board, and `once:` rules fall through until the store can be used.
    """
    location = settings.state_location()
    if is_server(location) or os.path.exists(location) or board.expected_id("state")() is not None:
        return
    stores = open_stores(settings, "background", board)
    try:
        stores.once.check()
        log.info("made the state store %s for the once: rules", location)
    except StateError as error:
        board.failed("state", error)
        log.warning("state store %s cannot be made (%s); once: rules fall through until it can", location, error)
    finally:
        stores.close()


@dataclass(frozen=True)
class Callback:
    """The outcome of POST /done/<token>: HTTP status and one line for the caller."""

    status: str
    message: str


class OnceGate:
    """Decides, per machine, whether a `once:` rule still answers it; takes the callbacks.

    The store is opened in the process that first needs it (forked workers each open their
    own connection; its SQLite file was made as the rules loaded: make_store_ahead); rules
    without `once:` never come here. `rules_in_force()` gives the rules being served (a
    callback's token is checked against their `once:` names).
    """

    def __init__(self, settings: Settings, board: HealthBoard, metrics: object | None = None,
                 rules_in_force: Callable[[], Iterable[Rule]] = tuple,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.default_lifetime = settings.once_expires
        self.board = board
        self.metrics = metrics
        self.rules_in_force = rules_in_force
        self.clock = clock
        self._store: OnceStore | None = None
        self._lock = threading.Lock()
        self._warned_at = 0.0
        self._suppressed = 0
        self.arms = ArmWriter(lambda: open_stores(settings, "background", board).once,
                              self._failed, lambda: self._count("once_row_writes"), self._in_force)

    def store(self) -> OnceStore:
        with self._lock:
            if self._store is None:
                self._store = open_stores(self.settings, "request", self.board).once
            return self._store

    def _in_force(self) -> set[tuple[str, str]]:
        return {(rule.name, rule.once.label) for rule in self.rules_in_force() if rule.once is not None}

    # ------------------------------------------------------------ the boot path

    def token_for(self, rule: Rule, facts: Facts, client: str) -> str | None:
        """The live token if `rule` still answers this machine; DONE if it reported done; None
        if it falls through for another reason (the store cannot be used)."""
        assert rule.once is not None
        names = machine_names(facts)
        if not names:
            self._skip(rule, "-", "the machine sent neither a MAC nor a UUID, so its state cannot be kept")
            return None
        blocked = self.board.blocked("state")
        if blocked:
            self._skip(rule, names[0], f"state store unavailable ({blocked}); not risking a reinstall")
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
            self._failed(error)
            self._skip(rule, names[0], f"state store unavailable ({error}); not risking a reinstall")
            return None
        if done:
            return DONE
        if row is None or row.token is None:  # re-armed between its write and its read
            self._skip(rule, names[0], "its state changed while it was being read; it is answered at its next boot")
            return None
        if issued:
            log_fields("once: armed machine=%s rule=%s label=%s token=%s client=%s expires=%s",
                       (names[0], rule.name, rule.once.label, shown(row.token), client, utc(row.expires_at)),
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

    def _failed(self, error: StateError | str) -> None:
        self.board.failed("state", error)
        self._count("state_errors")

    def close(self) -> None:
        """Write the armed rows not written yet (a stopping worker), and close the store."""
        self.arms.close()
        if self._store is not None:
            self._store.close()

    def _count(self, name: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, name).inc()

    # ------------------------------------------------------------ the callback

    def redeem(self, token: str, peer: str) -> Callback:
        """POST /done/<token>: disarm the machine the token was issued to."""
        if not TOKEN.fullmatch(token):
            return Callback("404 Not Found", "malformed token")
        claims = tokens.read(token)  # None for anything but a token's one spelling
        if claims is None and len(token) != UNSIGNED_LENGTH:
            return self._answer(token, peer, "unknown", None)
        blocked = self.board.blocked("state")
        if blocked:
            return Callback("503 Service Unavailable", "the state store is unavailable; try again")
        try:
            store = self.store()
            now = self.clock()
            if claims is None:
                outcome, row = store.redeem_unsigned(token, peer, now)
            else:
                claimed = self._claimed(claims, store.token_key(), token)
                outcome, row = ("unknown", None) if claimed is None else store.redeem(claimed, token, peer, now)
        except StateError as error:
            self._failed(error)
            log.error("once: callback token=%s from=%s not stored: %s", shown(token), peer, error)
            return Callback("503 Service Unavailable", "the state store is unavailable; try again")
        return self._answer(token, peer, outcome, row)

    # ------------------------------------------------------------ files

    def files_token(self, rule: Rule, facts: Facts) -> str | None:
        """A token for the files of `rule` (without `once:`), bound to this machine; None if
        none can be made now (no MAC or UUID, or no key: the state store is unavailable)."""
        names = machine_names(facts)
        if not names:
            self._skip(rule, "-", "the machine sent neither a MAC nor a UUID, so its files URL cannot be bound to it")
            return None
        if self.board.blocked("state"):
            return None
        try:
            key = self.store().token_key()
        except StateError as error:
            self._failed(error)
            self._skip(rule, names[0], f"no files URL: the state store is unavailable ({error})")
            return None
        now = self.clock()
        return tokens.issue(key, names, rule.name, FILES_LABEL, now, now + self.default_lifetime)

    def files_claim(self, token: str, rules: Iterable[Rule]) -> tuple[Rule, tokens.Claims, bool] | None:
        """The rule whose files `token` opens, what the token says, and whether it has expired;
        None for a token of no such rule (made up, altered, another store's)."""
        if not TOKEN.fullmatch(token):
            return None
        claims = tokens.read(token)
        if claims is None or self.board.blocked("state"):
            return None
        try:
            key = self.store().token_key()
        except StateError as error:
            self._failed(error)
            return None
        for rule in rules:
            label = rule.once.label if rule.once is not None else FILES_LABEL
            if tokens.signed_for(key, claims, rule.name, label):
                return rule, claims, claims.expires <= self.clock()
        return None

    def _claimed(self, claims: tokens.Claims, key: str, token: str) -> OnceRow | None:
        """The row a token's claims stand for, if its tag is one of a `once:` rule in force."""
        for rule in self.rules_in_force():
            if rule.once is not None and tokens.signed_for(key, claims, rule.name, rule.once.label):
                return OnceRow(claims.identities[0], rule.name, rule.once.label, "armed", token,
                               claims.issued, claims.expires, None, None, claims.identities)
        return None

    def _answer(self, token: str, peer: str, outcome: str, row: OnceRow | None) -> Callback:
        if self.metrics is not None:
            self.metrics.once_callbacks.labels(outcome).inc()
        if row is None:
            log.info("once: callback token=%s from=%s: unknown token", shown(token), peer)
            return Callback("404 Not Found", "unknown token (re-armed, or never issued)")
        what = f"machine {row.machine}, rule '{row.rule}', label {row.label}"
        if outcome == "expired":
            log.info("once: callback token=%s from=%s: expired (%s)", shown(token), peer, what)
            return Callback("410 Gone", f"token expired at {utc(row.expires_at)}; boot the machine again for a new one")
        if outcome == "already":
            return Callback("200 OK", f"already done: {what}")
        log.info("once: done machine=%s rule=%s label=%s token=%s from=%s", row.machine, row.rule, row.label,
                 shown(token), peer)
        return Callback("200 OK", f"done: {what}; from its next boot the rules below answer it")
