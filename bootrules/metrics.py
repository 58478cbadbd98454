"""Prometheus metrics for /metrics, correct with one process or several.

With several workers, prometheus_client's multiprocess mode is used: each worker writes
its numbers to files in one directory (PROMETHEUS_MULTIPROC_DIR, made by `serve`), and
/metrics adds them up. prometheus_client decides on that mode when it is first imported,
so it is imported here lazily, after `serve` has set the directory.
"""

from __future__ import annotations

import os
import time
from typing import Any

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def multiprocess() -> bool:
    """Tell whether metrics are shared through files between worker processes."""
    return bool(os.environ.get(MULTIPROC_ENV))


class Metrics:
    """The bootrules metrics of one process."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        # In multiprocess mode values go to files whatever the registry; a registry per
        # app keeps apps made in one process (tests) apart.
        self.registry = CollectorRegistry()
        registry = self.registry
        self.decisions = Counter("bootrules_decisions", "Decisions sent, by the rule that answered and its action",
                                 ["rule", "action"], registry=registry)
        self.bad_requests = Counter("bootrules_bad_requests", "Decision requests refused with 400", registry=registry)
        self.reloads = Counter("bootrules_reloads", "Successful loads of the rules file", registry=registry)
        self.reload_failures = Counter("bootrules_reload_failures", "Loads of the rules file that failed",
                                       registry=registry)
        self.rules_loaded = Gauge("bootrules_rules_loaded", "Rules being served", registry=registry,
                                  multiprocess_mode="livemax")
        self.last_reload = Gauge("bootrules_last_reload_timestamp_seconds", "When the rules served were loaded",
                                 registry=registry, multiprocess_mode="livemax")
        self.latency = Histogram("bootrules_request_duration_seconds", "Time to answer a decision request",
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self._decision_children: dict[tuple[str, str], Any] = {}

    def decided(self, rule: str, action: str, seconds: float) -> None:
        """Count one decision and its latency."""
        child = self._decision_children.get((rule, action))
        if child is None:
            child = self._decision_children.setdefault((rule, action), self.decisions.labels(rule, action))
        child.inc()
        self.latency.observe(seconds)

    def refused(self, seconds: float) -> None:
        """Count one request refused with 400."""
        self.bad_requests.inc()
        self.latency.observe(seconds)

    def loaded(self, rules: int, when: float | None = None) -> None:
        """Record a successful load of `rules` rules."""
        self.reloads.inc()
        self.rules_loaded.set(rules)
        self.last_reload.set(when if when is not None else time.time())

    def load_failed(self) -> None:
        self.reload_failures.inc()

    def exposition(self) -> tuple[bytes, str]:
        """The metrics in Prometheus text format, and their content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        if multiprocess():
            from prometheus_client import multiprocess as mp

            registry = CollectorRegistry()
            mp.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def worker_exited(pid: int) -> None:
    """Drop a dead worker's live gauges (multiprocess mode)."""
    if multiprocess():
        from prometheus_client import multiprocess as mp

        mp.mark_process_dead(pid)
