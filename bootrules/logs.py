"""Logging set-up: one line per decision, cheap enough for a boot storm.

Python's stderr is line-buffered, so each log line is a write(2); in a boot storm that,
with formatting the timestamp, cost more than the decision itself (README, performance).
Here lines are written in batches: at the latest half a second later, and at once for
warnings and errors.

Even batched, a LogRecord per decision cost a good part of a decision's time. So
`log_decision` (and `log_fields`, for other lines a storm makes) hands the fields straight
to the batching handler, which formats them when it writes, exactly as the formatter would
format the record. It does so only while
that handler is the sole listener; otherwise (a host program's logging, pytest's caplog)
it logs an ordinary record.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import re
import sys
import threading
import time

from .clock import PerSecond
from .settings import LOG_FORMATS

FLUSH_INTERVAL = 0.5
# Text that JSON writes as it is (no quote, backslash, control or non-ASCII character):
# rule names, actions and addresses nearly always are, and are written without json.dumps.
JSON_AS_IS = re.compile(r"[A-Za-z0-9 ._:/()-]*")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOGGER_NAME = "bootrules"
DECISION_MESSAGE = "client=%s mac=%s rule=%s action=%s"
# Fields a decision log line carries (passed as `extra=`), kept as JSON keys of their own.
DECISION_FIELDS = ("client", "mac", "rule", "action")

log = logging.getLogger(LOGGER_NAME)
_MILLISECONDS = [f"{n:03d}" for n in range(1000)]  # what %(msecs)03d writes, looked up: formatting cost more
_PLAIN_WORD = re.compile(r"[A-Za-z0-9._:/@+,-]+")
# Printable ASCII but quote and backslash: what json.dumps writes between quotes as it is.
_JSON_VERBATIM = re.compile(r"[ !#-\[\]-~]*")


def escaped(value: str) -> str:
    """An untrusted value for a `key=value` log line: as it is if it is one plain word, else
    double-quoted with every quote, backslash, control and non-ASCII character escaped, so
    that no log parser reads a key of its own in it (`rule=FORGED` stays inside the quotes)."""
    if _PLAIN_WORD.fullmatch(value):
        return value
    return json.dumps(value, ensure_ascii=True)


class SecondCachingFormatter(logging.Formatter):
    """A Formatter that renders the date and time once per second, not once per line."""

    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)
        self._stamp = PerSecond(lambda second: time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second)))

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (logging's name)
        return self._time(record.created, record.msecs)

    def _time(self, created: float, msecs: float) -> str:
        return f"{self._stamp(created)},{int(msecs):03d}"

    def format_queued(self, queued: collections.deque) -> list[str]:
        """Take every (created, message, fields, names) from `queued`: for each, the line
        `format` makes of an INFO record of `message % fields` created at `created`."""
        lines: list[str] = []
        append = lines.append
        second, stamp = -1, ""
        while queued:  # a boot storm's lines: one loop, the time stamp looked up once a second
            created, message, fields, _ = queued.popleft()
            if int(created) != second:
                second = int(created)
                stamp = self._stamp(second)
            append(f"{stamp},{_MILLISECONDS[int((created - second) * 1000)]} INFO {LOGGER_NAME}: {message % fields}")
        return lines


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers: time, level, logger, message, and fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": _utc_time(record.created, record.msecs),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in getattr(record, "field_names", DECISION_FIELDS):
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)

    def format_queued(self, queued: collections.deque) -> list[str]:
        """Take every (created, message, fields, names) from `queued`: for each, the line
        `format` makes of an INFO record of `message % fields`, with `names` as its fields."""
        lines: list[str] = []
        append = lines.append
        second, stamp = -1, ""
        while queued:  # a boot storm's lines: one loop, the time stamp looked up once a second
            created, message, fields, names = queued.popleft()
            if int(created) != second:
                second = int(created)
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            when = f"{stamp}.{_MILLISECONDS[int((created - second) * 1000)]}Z"
            if _JSON_VERBATIM.fullmatch("".join((message, *names, *fields))):
                # Nothing to escape: the line json.dumps would write, without its cost.
                pairs = "".join([f', "{name}": "{value}"' for name, value in zip(names, fields)])
                append(f'{{"time": "{when}", "level": "INFO", "logger": "{LOGGER_NAME}", '
                       f'"message": "{message % fields}"{pairs}}}')
            else:
                entry = {"time": when, "level": "INFO", "logger": LOGGER_NAME, "message": message % fields,
                         **dict(zip(names, fields))}
                append(json.dumps(entry, ensure_ascii=False))
        return lines


def _msecs(created: float) -> float:
    """Milliseconds past the second, as LogRecord computes them."""
    return (created - int(created)) * 1000


def _utc_time(created: float, msecs: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(msecs):03d}Z"


class BatchingHandler(logging.StreamHandler):
    """Writes to a buffered stream and flushes it on a timer, or at once for warnings.

    Decisions handed over by `log_decision` wait in a queue and are written, in order,
    before any other line and on every flush.
    """

    def __init__(self, stream: io.TextIOBase, interval: float = FLUSH_INTERVAL) -> None:
        super().__init__(stream)
        # (created, message, fields, field names): decisions and other frequent INFO lines.
        self.queued: collections.deque[tuple[float, str, tuple[str, ...], tuple[str, ...]]] = collections.deque()
        self._interval = interval
        self._start_timer()
        # Workers are forked: flush first so no line is written twice, and give each
        # worker its own timer (threads do not survive fork).
        os.register_at_fork(before=self._flush_stream, after_in_child=self._start_timer)

    def _start_timer(self) -> None:
        threading.Thread(target=self._flush_periodically, daemon=True, name="bootrules-log-flush").start()

    def _flush_stream(self) -> None:
        try:
            self.flush()
        except (OSError, ValueError):
            pass

    def _write_queued(self) -> None:
        """Write the queued lines (the caller holds the handler's lock)."""
        queued = self.queued
        if not queued:
            return
        lines = self.formatter.format_queued(queued)  # type: ignore[union-attr]
        lines.append("")
        self.stream.write(self.terminator.join(lines))

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self.stream and hasattr(self.stream, "flush"):
                self._write_queued()
                self.stream.flush()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._write_queued()
            self.stream.write(self.format(record) + self.terminator)
            if record.levelno >= logging.WARNING:
                self.stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def _flush_periodically(self) -> None:
        while True:
            time.sleep(self._interval)
            try:
                self.flush()
            except (OSError, ValueError):  # stderr closed at exit
                return


_configured = False
_handler: BatchingHandler | None = None  # installed by configure_logging


def log_decision(client: str, mac: str, rule: str, action: str) -> None:
    """Log one decision: `client=… mac=… rule=… action=…` at INFO, as fields in JSON."""
    handler = _handler
    if handler is not None and _handler_is_sole_listener(handler):  # log_fields, inline: every request
        handler.queued.append((time.time(), DECISION_MESSAGE, (client, mac, rule, action), DECISION_FIELDS))
    else:
        log_fields(DECISION_MESSAGE, (client, mac, rule, action), DECISION_FIELDS)


def log_fields(message: str, fields: tuple[str, ...], names: tuple[str, ...]) -> None:
    """Log `message % fields` at INFO, with each field under its name in JSON; queued for the
    batching handler to format when it writes (a boot storm's lines cost little)."""
    handler = _handler
    if handler is not None and _handler_is_sole_listener(handler):
        handler.queued.append((time.time(), message, fields, names))
    elif log.isEnabledFor(logging.INFO):
        log.info(message, *fields, extra={**dict(zip(names, fields)), "field_names": names})


def _handler_is_sole_listener(handler: BatchingHandler) -> bool:
    handlers = logging.root.handlers
    return (
        len(handlers) == 1 and handlers[0] is handler and log.isEnabledFor(logging.INFO)
        and not log.handlers and log.propagate and not log.filters and not logging.root.filters
        and not handler.filters and handler.level <= logging.INFO
    )


def configure_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    """Send log lines to stderr in batches, unless the hosting program set up logging already."""
    global _configured, _handler
    root = logging.getLogger()
    if _configured or root.handlers:
        return
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: expected one of {', '.join(LOG_FORMATS)}")
    _configured = True
    # Documented switches that spare each log record a stack walk and three lookups
    # nobody reads (the format shows none of them).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # A separate buffered writer on file descriptor 2: sys.stderr stays line-buffered
    # for anything else that writes to it.
    stream = io.TextIOWrapper(io.BufferedWriter(io.FileIO(os.dup(sys.stderr.fileno()), "w"), 64 * 1024),
                              encoding="utf-8", errors="backslashreplace", line_buffering=False)
    handler = BatchingHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else SecondCachingFormatter())
    root.addHandler(handler)
    _handler = handler
    root.setLevel(level)
    # waitress warns "Task queue depth is N" whenever all its threads are busy, which
    # under a boot storm is thousands of lines a second saying the server is busy.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
