"""Logging set-up: one line per decision, cheap enough for a boot storm.

Python's stderr is line-buffered, so each log line is a write(2). At ten thousand
decisions a second that, with formatting the timestamp, cost more than the decision itself
(17% of the throughput, measured with the benchmark). Here lines are written in batches:
at the latest half a second later, and at once for warnings and errors.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import threading
import time

FLUSH_INTERVAL = 0.5
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class SecondCachingFormatter(logging.Formatter):
    """A Formatter that renders the date and time once per second, not once per line."""

    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (logging's name)
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(record.created))
        return f"{self._stamp},{int(record.msecs):03d}"


# Fields a decision log line carries (passed as `extra=`), kept as JSON keys of their own.
DECISION_FIELDS = ("client", "mac", "rule", "action")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers: time, level, logger, message, and fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in DECISION_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class BatchingHandler(logging.StreamHandler):
    """Writes to a buffered stream and flushes it on a timer, or at once for warnings."""

    def __init__(self, stream: io.TextIOBase, interval: float = FLUSH_INTERVAL) -> None:
        super().__init__(stream)
        self._interval = interval
        self._start_timer()
        # Workers are forked: flush first so no line is written twice, and give each
        # worker its own timer (threads do not survive fork).
        os.register_at_fork(before=self._flush_stream, after_in_child=self._start_timer)

    def _start_timer(self) -> None:
        threading.Thread(target=self._flush_periodically, daemon=True, name="bootrules-log-flush").start()

    def _flush_stream(self) -> None:
        try:
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def emit(self, record: logging.LogRecord) -> None:
        try:
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
                with self.lock:  # type: ignore[union-attr]
                    self.stream.flush()
            except (OSError, ValueError):  # stderr closed at exit
                return


_configured = False


LOG_FORMATS = ("text", "json")


def configure_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    """Send log lines to stderr in batches, unless the hosting program set up logging already."""
    global _configured
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
    root.setLevel(level)
    # waitress warns "Task queue depth is N" whenever all its threads are busy, which
    # under a boot storm is thousands of lines a second saying the server is busy.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
