"""Prometheus metrics for /metrics, correct with one process or several.

With several workers, prometheus_client's multiprocess mode is used: each worker writes
its numbers to files in one directory (PROMETHEUS_MULTIPROC_DIR, made by `serve`), and
/metrics adds them up. prometheus_client decides on that mode when it is first imported,
so it is imported here lazily, after `serve` has set the directory.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import glob
import json
import mmap
import os
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from . import pid
from .logs import JSON_AS_IS

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


# prometheus_client's multiprocess values share one lock per process. The supervisor forks
# workers on its main thread while its reloader thread may be counting a load: a fork in
# the middle of that would hand the new worker a lock held forever. Counting in the parent
# takes this lock, and a fork waits for it.
_COUNTING = threading.Lock()
os.register_at_fork(before=_COUNTING.acquire, after_in_parent=_COUNTING.release,
                    after_in_child=_COUNTING.release)


def missing_internals() -> str | None:
    """Why the installed prometheus_client cannot be used with several workers (None: it can).

    Adding up the workers' files (DecisionCounts, worker_exited) uses prometheus_client's
    MmapedDict and its file names, which are not its public API: checked once at start.
    """
    try:
        from prometheus_client import multiprocess as mp
        from prometheus_client.mmap_dict import MmapedDict
    except ImportError as error:
        return str(error)
    needed = [(MmapedDict, name) for name in ("read_value", "write_value", "read_all_values_from_file", "close")]
    needed.append((mp, "mark_process_dead"))
    lacking = [f"{getattr(owner, '__name__', owner)}.{name}" for owner, name in needed if not hasattr(owner, name)]
    if not lacking and not _layout_is_prometheus_clients():
        lacking.append("the layout of MmapedDict's files (DecisionFile writes it)")
    return ", ".join(lacking) or None


def _layout_is_prometheus_clients() -> bool:
    """Whether MmapedDict reads what DecisionFile writes, as it was when this was written."""
    from prometheus_client.mmap_dict import MmapedDict

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "check" + DecisionCounts.FILE_SUFFIX)
        written = DecisionFile(path)
        try:
            for number, key in enumerate(('["a", "b"]', '["ab", "c"]', '["ü", "exit"]'), start=1):
                written.write(written.slot(key), float(number))
        finally:
            written.close()
        try:
            read = [(key, value) for key, value, *_ in MmapedDict.read_all_values_from_file(path)]
        except Exception:  # noqa: BLE001 - any failure to read it is the answer
            return False
    return read == [('["a", "b"]', 1.0), ('["ab", "c"]', 2.0), ('["ü", "exit"]', 3.0)]


def multiprocess() -> bool:
    """Tell whether metrics are shared through files between worker processes."""
    return bool(os.environ.get(MULTIPROC_ENV))


class Metrics:
    """The bootrules metrics of one process."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        # In multiprocess mode values go to files whatever the registry; a registry per
        # app keeps apps made in one process (tests) apart.
        self.registry = CollectorRegistry()
        registry = self.registry
        self.decisions = DecisionCounts(registry)
        self.bad_requests = Counter("bootrules_bad_requests", "Decision requests refused with 400", registry=registry)
        self.reloads = Counter("bootrules_reloads", "Successful loads of the rules file", registry=registry)
        self.reload_failures = Counter("bootrules_reload_failures", "Loads of the rules file that failed",
                                       registry=registry)
        self.rules_loaded = Gauge("bootrules_rules_loaded", "Rules being served", registry=registry,
                                  multiprocess_mode="livemax")
        self.last_reload = Gauge("bootrules_last_reload_timestamp_seconds", "When the rules served were loaded",
                                 registry=registry, multiprocess_mode="livemax")
        self.once_tokens_issued = Counter("bootrules_once_tokens_issued", "Tokens issued to machines of once: rules",
                                          registry=registry)
        self.once_row_writes = Counter("bootrules_once_row_writes",
                                       "Transactions that wrote armed rows (a batch, or one row before its answer)",
                                       registry=registry)
        self.once_callbacks = Counter("bootrules_once_callbacks", "POST /done/<token> callbacks, by outcome",
                                      ["outcome"], registry=registry)
        self.state_errors = Counter("bootrules_state_errors", "Reads or writes of the state store that failed",
                                    registry=registry)
        self.machine_records_written = Counter("bootrules_machine_records_written",
                                               "Machines seen written to the state store (one per machine per batch)",
                                               registry=registry)
        self.machine_records_dropped = Counter("bootrules_machine_records_dropped",
                                               "Machines seen not recorded: the batch was full (the store slow or down)",
                                               registry=registry)
        self.template_failures = Counter("bootrules_template_failures",
                                         "Rules and files that could not be rendered for a machine", registry=registry)
        self.files_served = Counter("bootrules_files", "GET /files/: answers by status", ["status"], registry=registry)

    def template_failed(self) -> None:
        self.template_failures.inc()

    def file_served(self, status: str) -> None:
        self.files_served.labels(status).inc()

    def decided(self, rule: str, action: str, seconds: float) -> None:
        """Count one decision and its latency."""
        self.decisions.count(rule, action, seconds)

    def refused(self, seconds: float) -> None:
        """Count one request refused with 400."""
        self.bad_requests.inc()
        self.decisions.observe(seconds)

    def loaded(self, rules: int, when: float | None = None, reload: bool = True) -> None:
        """Record a successful load of `rules` rules (`reload`: not the first)."""
        with _COUNTING:
            if reload:
                self.reloads.inc()
            self.rules_loaded.set(rules)
            self.last_reload.set(when if when is not None else time.time())

    def load_failed(self) -> None:
        with _COUNTING:
            self.reload_failures.inc()

    def decision_totals(self) -> dict[tuple[str, str], float]:
        """Decisions so far by (rule, action), every worker's added up."""
        return self.decisions.totals()

    def exposition(self) -> tuple[bytes, str]:
        """The metrics in Prometheus text format, and their content type."""
        from prometheus_client import (
            CONTENT_TYPE_LATEST,
            CollectorRegistry,
            generate_latest,
        )

        if multiprocess():
            from prometheus_client import multiprocess as mp

            registry = CollectorRegistry()
            mp.MultiProcessCollector(registry)
            registry.register(self.decisions)
            with _files_locked(exclusive=False):  # not while a dead worker's counts are being folded
                return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class DecisionCounts:
    """bootrules_decisions_total by rule and action, and the latency histogram
    bootrules_request_duration_seconds, cheap to count and to collect.

    A prometheus_client Counter makes a child object per label pair, and with several
    workers the child also finds its place in the process's value file. In a boot storm on
    one-per-MAC rules nearly every decision is some rule's first, and making those children
    was a noticeable share of a worker's time. Here a count is an entry in a dict. With
    several workers, prometheus_client's Histogram takes its lock twice and writes two
    values per observation; here one lock covers the count and the latency.

    With several workers each count is also written to this process's file of decisions
    in PROMETHEUS_MULTIPROC_DIR (DecisionFile, keyed by the JSON of [rule, action], and of
    [LATENCY_NAME, "bucket", i] and [LATENCY_NAME, "sum", 0]), and a scrape adds the files
    up by key, which is faster than prometheus_client's own collector at one series per
    rule (docs/performance.md). Each pair keeps its count and where the file holds it in
    one slot, so that a count is one lookup and one write.
    """

    NAME = "bootrules_decisions"
    HELP = "Decisions sent, by the rule that answered and its action"
    LABELS = ("rule", "action")
    LATENCY_NAME = "bootrules_request_duration_seconds"
    LATENCY_HELP = "Time to answer a decision request"
    FILE_SUFFIX = ".decisions"  # not .db: prometheus_client's collector must not read these

    def __init__(self, registry: Any) -> None:
        self._lock = threading.Lock()  # the app may run under a threaded server too
        # Per (rule, action): [count, offset of its value in the file (-1: no file)].
        self._slots: dict[tuple[str, str], list[int]] = {}
        self._buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # per bucket, not cumulative; the last is +Inf
        self._sum = 0.0
        self._created = time.time()
        self._file: DecisionFile | None = None  # this process's file of decisions (multiprocess mode)
        self._file_pid = 0
        self._bucket_offsets: list[int] = []
        self._sum_offset = 0
        self._multiprocess = multiprocess()
        if not self._multiprocess:
            registry.register(self)  # in multiprocess mode exposition() adds it to its registry

    def count(self, rule: str, action: str, seconds: float | None = None) -> None:
        """Count one decision by `rule` with `action`, and its latency if given."""
        key = (rule, action)
        with self._lock:
            if self._multiprocess and self._file_pid != pid.current:  # first use, or forked since
                self._open_file()
            slot = self._slots.get(key)
            if slot is None:
                slot = self._first_count(key)
            total = slot[0] = slot[0] + 1
            if self._file is not None:
                self._file.write(slot[1], total)
            if seconds is not None:
                self._observe(seconds)

    def observe(self, seconds: float) -> None:
        """Count the latency of one answer that was no decision (a 400)."""
        with self._lock:
            if self._multiprocess and self._file_pid != pid.current:
                self._open_file()
            self._observe(seconds)

    def _observe(self, seconds: float) -> None:
        index = bisect.bisect_left(LATENCY_BUCKETS, seconds)  # the first bound >= seconds: `le`
        count = self._buckets[index] = self._buckets[index] + 1
        self._sum += seconds
        if self._file is not None:
            self._file.write(self._bucket_offsets[index], count)
            self._file.write(self._sum_offset, self._sum)

    def _open_file(self) -> None:
        self._slots = {}  # a parent's counts are in the parent's file
        self._file = file = _decision_file()
        self._file_pid = pid.current
        # A process that had this pid before may have left counts here; they are kept.
        self._bucket_offsets = [file.slot(key) for key in _BUCKET_KEYS]
        self._buckets = [int(file.read(offset)) for offset in self._bucket_offsets]
        self._sum_offset = file.slot(_SUM_KEY)
        self._sum = file.read(self._sum_offset)

    def _first_count(self, key: tuple[str, str]) -> list[int]:
        """The slot of a pair not counted yet by this object, with its count so far: 0, or
        what its file holds."""
        file = self._file
        if file is None:
            slot = self._slots[key] = [0, -1]
            return slot
        offset = file.slot(_file_key(key))
        # A process that had this pid before may have left counts here; they are kept.
        slot = self._slots[key] = [int(file.read(offset)), offset]
        return slot

    def totals(self) -> dict[tuple[str, str], float]:
        """This process's counts, or every worker's files added up."""
        if self._multiprocess:
            with _files_locked(exclusive=False):
                return _decisions_only(_added_up_decision_files())
        with self._lock:
            return {key: float(slot[0]) for key, slot in self._slots.items()}

    def collect(self) -> Iterator[Any]:
        """The counts and the latency as metric families: this process's, or every worker's
        files added up."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        family = CounterMetricFamily(self.NAME, self.HELP, labels=self.LABELS)
        if self._multiprocess:
            added = _added_up_decision_files()  # exposition() holds the files' lock
            counts = list(_decisions_only(added).items())
            buckets = [added.get(tuple(json.loads(key)), 0.0) for key in _BUCKET_KEYS]  # type: ignore[call-overload]
            total_seconds = added.get(tuple(json.loads(_SUM_KEY)), 0.0)  # type: ignore[call-overload]
        else:
            with self._lock:
                counts = [(key, float(slot[0])) for key, slot in self._slots.items()]
                buckets, total_seconds = [float(count) for count in self._buckets], self._sum
        for labels, total in counts:
            family.add_metric(labels, total)
        yield family
        cumulative, running = [], 0.0
        for bound, count in zip((*(_bound_text(bound) for bound in LATENCY_BUCKETS), "+Inf"), buckets):
            running += count
            cumulative.append((bound, running))
        yield HistogramMetricFamily(self.LATENCY_NAME, self.LATENCY_HELP, buckets=cumulative, sum_value=total_seconds)
        if not self._multiprocess and _created_series():  # as prometheus_client's own Histogram says it
            yield GaugeMetricFamily(f"{self.LATENCY_NAME}_created", self.LATENCY_HELP, value=self._created)


_BUCKET_KEYS = tuple(json.dumps([DecisionCounts.LATENCY_NAME, "bucket", index])
                     for index in range(len(LATENCY_BUCKETS) + 1))
_SUM_KEY = json.dumps([DecisionCounts.LATENCY_NAME, "sum", 0])  # three items: never a decision's key


def _created_series() -> bool:
    """Whether metrics carry a `_created` series (prometheus_client's own switch)."""
    return os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in ("true", "1", "t")


def _bound_text(bound: float) -> str:
    from prometheus_client.utils import floatToGoString

    return floatToGoString(bound)


def _decisions_only(added: dict[tuple[str, ...], float]) -> dict[tuple[str, str], float]:
    return {key: total for key, total in added.items() if len(key) == 2}  # type: ignore[misc]


def _file_key(key: tuple[str, str]) -> str:
    """`json.dumps(key)`, the key a count has in the files. In a boot storm on one-per-MAC
    rules nearly every decision is some rule's first, and rule names are nearly always
    plain: those are written out directly, at a quarter of json.dumps' cost."""
    rule, action = key
    if JSON_AS_IS.fullmatch(rule) and JSON_AS_IS.fullmatch(action):
        return f'["{rule}", "{action}"]'
    return json.dumps(key)


_INT = struct.Struct("i")
_DOUBLE = struct.Struct("d")
_NO_VALUE = bytes(16)  # a new key's value and timestamp: 0.0, 0.0


class DecisionFile:
    """One process's file of decision counts, in the layout of prometheus_client's
    multiprocess files, which its MmapedDict reads (and bootrules folds and adds up with
    it): a 4-byte count of the bytes used, 4 bytes of padding, then per key its length (4
    bytes), the key in UTF-8 padded with spaces to an 8-byte boundary, its value and a
    timestamp (8-byte doubles). `missing_internals` checks at start that MmapedDict still
    reads what this writes.

    Written here rather than through MmapedDict, which looks every write's key up twice by
    its text and makes a struct format for each new key (in a boot storm on one-per-MAC
    rules nearly every decision is some rule's first): here a key is looked up when first
    counted, and each count is written at its offset. Only the process whose file it is
    writes it, and a key is written whole before the count of bytes used says it is
    there, so a scrape reading the file meanwhile sees the key or nothing of it.
    """

    INITIAL_SIZE = 1 << 16  # bytes; doubled as needed

    def __init__(self, path: str) -> None:
        self._file = open(path, "a+b")
        size = os.fstat(self._file.fileno()).st_size
        if size == 0:
            self._file.truncate(self.INITIAL_SIZE)
            size = self.INITIAL_SIZE
        self._size = size
        self._map = mmap.mmap(self._file.fileno(), size)
        self._offsets: dict[str, int] = {}  # key -> offset of its value
        used = _INT.unpack_from(self._map, 0)[0]
        if used == 0:
            used = 8
            self._map[0:4] = _INT.pack(used)
        else:  # a process that had this pid before wrote it
            from prometheus_client.mmap_dict import MmapedDict

            for key, _value, _timestamp, offset in MmapedDict.read_all_values_from_file(path):
                self._offsets[key] = offset
        self._used = used

    def slot(self, key: str) -> int:
        """The offset of `key`'s value in the file; a key not there yet is added, at 0."""
        offset = self._offsets.get(key)
        if offset is not None:
            return offset
        encoded = key.encode("utf-8")
        entry = b"".join((_INT.pack(len(encoded)), encoded, b" " * (8 - (len(encoded) + 4) % 8), _NO_VALUE))
        start, end = self._used, self._used + len(entry)
        if end > self._size:
            self._grow(end)
        self._map[start:end] = entry
        self._map[0:4] = _INT.pack(end)  # only now do readers see the key
        self._used = end
        offset = self._offsets[key] = end - 16
        return offset

    def write(self, offset: int, value: float) -> None:
        # Assigned, not struct.pack_into: a reader never sees the value half written.
        self._map[offset:offset + 8] = _DOUBLE.pack(value)

    def read(self, offset: int) -> float:
        return _DOUBLE.unpack_from(self._map, offset)[0]

    def _grow(self, needed: int) -> None:
        size = self._size
        while size < needed:
            size *= 2
        self._file.truncate(size)
        self._map.close()
        self._map = mmap.mmap(self._file.fileno(), size)
        self._size = size

    def close(self) -> None:
        self._map.close()
        self._file.close()


_decision_files: dict[str, DecisionFile] = {}


def _decision_file() -> DecisionFile:
    """This process's file of decision counts, opened once (as prometheus_client does its own)."""
    path = os.path.join(os.environ[MULTIPROC_ENV], f"{os.getpid()}{DecisionCounts.FILE_SUFFIX}")
    if path not in _decision_files:
        _decision_files[path] = DecisionFile(path)
    return _decision_files[path]


def _added_up_decision_files() -> dict[tuple[str, str], float]:
    """The decision counts of every process, live or gone, that wrote a file here."""
    from prometheus_client.mmap_dict import MmapedDict

    by_key: dict[str, float] = {}
    for path in glob.glob(os.path.join(os.environ[MULTIPROC_ENV], "*" + DecisionCounts.FILE_SUFFIX)):
        for key, value, _timestamp, _position in MmapedDict.read_all_values_from_file(path):
            by_key[key] = by_key.get(key, 0.0) + value
    return {tuple(json.loads(key)): total for key, total in by_key.items()}  # type: ignore[misc]


# A dead worker's counter, histogram and decision files are added into these, so that a
# scrape reads one file per live worker plus one per kind, however many reloads there were.
ARCHIVE = "archive"
FOLDED_KINDS = ("counter", "histogram")
LOCK_FILE = "files.lock"


@contextlib.contextmanager
def _files_locked(exclusive: bool) -> Iterator[None]:
    """Hold the lock on the metrics files: shared to read them, exclusive to fold them."""
    fd = os.open(os.path.join(os.environ[MULTIPROC_ENV], LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def _fold(source: str, archive: str) -> None:
    """Add every value of the file `source` into the file `archive`, then remove `source`."""
    from prometheus_client.mmap_dict import MmapedDict

    target = MmapedDict(archive)
    try:
        for key, value, timestamp, _position in MmapedDict.read_all_values_from_file(source):
            total, _previous = target.read_value(key)
            target.write_value(key, total + value, timestamp)
    finally:
        target.close()
    os.unlink(source)


def worker_exited(pid: int) -> None:
    """Drop a dead worker's live gauges, and fold its counts into the archive (multiprocess mode)."""
    if not multiprocess():
        return
    from prometheus_client import multiprocess as mp

    mp.mark_process_dead(pid)
    directory = os.environ[MULTIPROC_ENV]
    with _files_locked(exclusive=True):
        for kind in FOLDED_KINDS:
            source = os.path.join(directory, f"{kind}_{pid}.db")
            if os.path.exists(source):
                _fold(source, os.path.join(directory, f"{kind}_{ARCHIVE}.db"))
        source = os.path.join(directory, f"{pid}{DecisionCounts.FILE_SUFFIX}")
        if os.path.exists(source):
            _fold(source, os.path.join(directory, ARCHIVE + DecisionCounts.FILE_SUFFIX))


def clear_runtime_files(directory: Path) -> None:
    """Remove metrics files an earlier run left in `directory`."""
    for pattern in ("*.db", "*" + DecisionCounts.FILE_SUFFIX):
        for stale in directory.glob(pattern):
            stale.unlink()
