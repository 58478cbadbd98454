"""Prometheus metrics for /metrics, correct with one process or several.

With several workers, prometheus_client's multiprocess mode is used: each worker writes
its numbers to files in one directory (PROMETHEUS_MULTIPROC_DIR, made by `serve`), and
/metrics adds them up (the files: bootrules.metrics_files). prometheus_client decides on
that mode when it is first imported, so it is imported here lazily, after `serve` has set
the directory.
"""

from __future__ import annotations

import bisect
import json
import os
import threading
import time
from typing import Any, Iterator

from . import pid
from .logs import JSON_AS_IS
from .metrics_files import DecisionFile, added_up_decision_files, decision_file, files_locked, multiprocess

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


# prometheus_client's multiprocess values share one lock per process. The supervisor forks
# workers on its main thread while its reloader thread may be counting a load: a fork in
# the middle of that would hand the new worker a lock held forever. Counting in the parent
# takes this lock, and a fork waits for it.
_COUNTING = threading.Lock()
os.register_at_fork(before=_COUNTING.acquire, after_in_parent=_COUNTING.release,
                    after_in_child=_COUNTING.release)


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
            with files_locked(exclusive=False):  # not while a dead worker's counts are being folded
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
    rule (docs/performance.md). Each pair's count is written at the place in the file
    found when it was first counted.
    """

    NAME = "bootrules_decisions"
    HELP = "Decisions sent, by the rule that answered and its action"
    LABELS = ("rule", "action")
    LATENCY_NAME = "bootrules_request_duration_seconds"
    LATENCY_HELP = "Time to answer a decision request"

    def __init__(self, registry: Any) -> None:
        self._lock = threading.Lock()  # the app may run under a threaded server too
        self._counts: dict[tuple[str, str], int] = {}
        # Where each pair's count lies in the file. (Two dicts of ints rather than one of
        # [count, offset] lists: a list per rule would be one more object per rule for the
        # cyclic garbage collector to walk, and a storm makes thousands.)
        self._offsets: dict[tuple[str, str], int] = {}
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
            total = self._counts.get(key)
            if total is None:
                total = self._first_count(key)
            total += 1
            self._counts[key] = total
            if self._file is not None:
                self._file.write(self._offsets[key], total)
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
        self._counts, self._offsets = {}, {}  # a parent's counts are in the parent's file
        self._file = file = decision_file()
        self._file_pid = pid.current
        # A process that had this pid before may have left counts here; they are kept.
        self._bucket_offsets = [file.slot(key) for key in _BUCKET_KEYS]
        self._buckets = [int(file.read(offset)) for offset in self._bucket_offsets]
        self._sum_offset = file.slot(_SUM_KEY)
        self._sum = file.read(self._sum_offset)

    def _first_count(self, key: tuple[str, str]) -> int:
        """The count so far of a pair not counted yet by this object: 0, or what its file holds."""
        file = self._file
        if file is None:
            return 0
        offset = self._offsets[key] = file.slot(_file_key(key))
        # A process that had this pid before may have left counts here; they are kept.
        return int(file.read(offset))

    def totals(self) -> dict[tuple[str, str], float]:
        """This process's counts, or every worker's files added up."""
        if self._multiprocess:
            with files_locked(exclusive=False):
                return _decisions_only(added_up_decision_files())
        with self._lock:
            return {key: float(total) for key, total in self._counts.items()}

    def collect(self) -> Iterator[Any]:
        """The counts and the latency as metric families: this process's, or every worker's
        files added up."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        family = CounterMetricFamily(self.NAME, self.HELP, labels=self.LABELS)
        if self._multiprocess:
            added = added_up_decision_files()  # exposition() holds the files' lock
            counts = list(_decisions_only(added).items())
            buckets = [added.get(tuple(json.loads(key)), 0.0) for key in _BUCKET_KEYS]  # type: ignore[call-overload]
            total_seconds = added.get(tuple(json.loads(_SUM_KEY)), 0.0)  # type: ignore[call-overload]
        else:
            with self._lock:
                counts = list(self._counts.items())
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
