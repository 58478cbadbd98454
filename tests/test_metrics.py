"""/metrics: decisions, refusals and reloads counted, summed over workers (bootrules/metrics.py)."""

from __future__ import annotations

import json

import re
import time

import pytest

from support import SAMPLE_RULES, BootrulesServer, free_port, http_get
from bootrules.services import services


@pytest.fixture(autouse=True)
def _decision_files_closed():
    """A process keeps its file of decision counts open for its life; these tests make one
    in each test's directory, all in one process: each is closed with its test."""
    from bootrules import metrics_files

    yield
    for path in list(metrics_files._decision_files):
        metrics_files._decision_files.pop(path).close()


# --------------------------------------------------------------------------- metrics


def metric(text: str, name: str) -> float:
    """The value of one sample line `name` (with labels) in Prometheus text format."""
    found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    assert found, f"{name} not in:\n{text}"
    return float(found.group(1))


def test_metrics_count_decisions_bad_requests_and_reloads(client, app, rules_path):
    """/metrics has decisions by rule and action, bad requests, reloads, rules and latency."""
    for _ in range(3):
        client.get("/ipxe?mac=00:12:34:56:78:90")
    client.get("/ipxe?mac=00:0c:29:00:00:01")
    client.get("/ipxe?mac=nonsense")
    rules_path.write_text(SAMPLE_RULES.replace("lab-rescue", "lab-rescue-2"))
    services(app).reloader.reload()
    rules_path.write_text("rules: [")
    services(app).reloader.reload()
    response = client.get("/metrics")
    assert response.status_code == 200 and response.content_type.startswith("text/plain; version=")
    text = response.text
    assert metric(text, 'bootrules_decisions_total{action="chain",rule="lab-rescue"}') == 3
    assert metric(text, 'bootrules_decisions_total{action="chain",rule="vmware-guests"}') == 1
    assert metric(text, "bootrules_bad_requests_total") == 1
    assert metric(text, "bootrules_reloads_total") == 1
    assert metric(text, "bootrules_reload_failures_total") == 1
    assert metric(text, "bootrules_rules_loaded") == 3
    assert metric(text, "bootrules_request_duration_seconds_count") == 5
    assert metric(text, "bootrules_last_reload_timestamp_seconds") > time.time() - 60


def test_metrics_add_up_across_worker_processes(rules_path, tmp_path, monkeypatch, http_server):
    """With two workers, one /metrics answer counts the decisions of both workers."""
    from prometheus_client.mmap_dict import MmapedDict

    shared = tmp_path / "metrics"
    shared.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(shared))
    with BootrulesServer(rules_path, free_port(), tmp_path / "server.log", args=(*http_server, "--workers", "2")) as server:
        for _ in range(60):  # a new connection each: the kernel hands them to either worker
            http_get(server.url + "/ipxe?mac=00:12:34:56:78:90")
        text = http_get(server.url + "/metrics")[2]
        per_worker = []
        for path in shared.glob("*.decisions"):  # one file of decision counts (and latencies) per process
            values = MmapedDict.read_all_values_from_file(str(path))
            per_worker.append(sum(value for key, value, *_ in values if len(json.loads(key)) == 2))
    assert sum(count > 0 for count in per_worker) == 2, per_worker  # both workers answered (the parent: none)
    assert sum(per_worker) == 60
    assert metric(text, 'bootrules_decisions_total{action="chain",rule="lab-rescue"}') == 60
    assert metric(text, "bootrules_rules_loaded") == 3


@pytest.mark.parametrize("multiprocess", [False, True], ids=["one process", "several"])
def test_odd_rule_names_are_counted_and_escaped_in_metrics(multiprocess, tmp_path, monkeypatch):
    """Quotes, backslashes, newlines and non-ASCII in a rule name come out escaped, counted right."""
    from prometheus_client.parser import text_string_to_metric_families

    from bootrules.metrics import Metrics

    if multiprocess:
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    else:
        monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    odd = 'odd "name" \\ with ü,\ttab and\nnewline'
    metrics = Metrics()
    for rule, action, times in ((odd, "chain", 3), ("plain", "exit", 1)):
        for _ in range(times):
            metrics.decided(rule, action, 0.001)
    text = metrics.exposition()[0].decode()
    family = next(f for f in text_string_to_metric_families(text) if f.name == "bootrules_decisions")
    counted = {(s.labels["rule"], s.labels["action"]): s.value for s in family.samples if s.name.endswith("_total")}
    assert counted == {(odd, "chain"): 3, ("plain", "exit"): 1}


def test_decision_counts_in_a_reused_process_file_are_kept(tmp_path, monkeypatch):
    """A process that finds its counter file already there (a reused pid) adds to it."""
    from bootrules.metrics import Metrics

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    for _ in range(2):  # the second Metrics opens the file the first one wrote
        metrics = Metrics()
        for _ in range(3):
            metrics.decided("lab-rescue", "chain", 0.001)
        metrics.decided("everyone-else", "exit", 0.001)
    text = metrics.exposition()[0].decode()
    assert metric(text, 'bootrules_decisions_total{action="chain",rule="lab-rescue"}') == 6
    assert metric(text, 'bootrules_decisions_total{action="exit",rule="everyone-else"}') == 2


def test_a_process_file_left_by_an_earlier_process_is_read_and_added_to(tmp_path, monkeypatch):
    """A file of decision counts a process with this pid left (prometheus_client's layout) is
    added to, key by key; and the file, grown far past its first size by thousands of rules,
    still reads back whole with prometheus_client's own reader."""
    import os

    from prometheus_client.mmap_dict import MmapedDict

    from bootrules.metrics import Metrics

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    path = tmp_path / f"{os.getpid()}.decisions"
    earlier = MmapedDict(str(path))
    earlier.write_value(json.dumps(["lab-rescue", "chain"]), 5.0, 0.0)
    earlier.write_value(json.dumps(["bootrules_request_duration_seconds", "sum", 0]), 0.5, 0.0)
    earlier.close()
    metrics = Metrics()
    names = [f"rack-{number:05d}-a-rule-name-long-enough-to-fill-pages" for number in range(3000)]
    for name in ["lab-rescue", *names, "lab-rescue"]:
        metrics.decided(name, "chain", 0.25)
    assert path.stat().st_size > 64 * 1024
    read = {tuple(json.loads(key)): value for key, value, *_ in MmapedDict.read_all_values_from_file(str(path))}
    assert read[("lab-rescue", "chain")] == 7
    assert all(read[(name, "chain")] == 1 for name in names)
    assert read[("bootrules_request_duration_seconds", "sum", 0)] == pytest.approx(0.5 + 3002 * 0.25)
    text = metrics.exposition()[0].decode()
    assert metric(text, 'bootrules_decisions_total{action="chain",rule="lab-rescue"}') == 7
    assert metric(text, "bootrules_request_duration_seconds_count") == 3002


def test_counts_of_a_worker_gone_add_to_the_same_series_whatever_the_rule_name(tmp_path, monkeypatch):
    """A dead worker's file keys each count by the JSON of [rule, action] (as json.dumps
    writes it): a live worker counting the same rules adds to those series, never beside them."""
    from prometheus_client.mmap_dict import MmapedDict

    from bootrules.metrics import Metrics

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    names = ["lab-rescue", "rack 12/row (b):a.b_c", 'odd "name" \\ ü', "tab\there"]
    gone = MmapedDict(str(tmp_path / "999999999.decisions"))
    for name in names:
        gone.write_value(json.dumps([name, "chain"]), 2.0, 0.0)
    gone.close()
    metrics = Metrics()
    for name in names:
        metrics.decided(name, "chain", 0.001)
    text = metrics.exposition()[0].decode()
    from prometheus_client.parser import text_string_to_metric_families

    family = next(f for f in text_string_to_metric_families(text) if f.name == "bootrules_decisions")
    counted = [(s.labels["rule"], s.value) for s in family.samples if s.name.endswith("_total")]
    assert sorted(counted) == sorted((name, 3.0) for name in names)


def test_several_workers_refuse_to_start_on_a_prometheus_client_without_what_they_use(rules_path, monkeypatch,
                                                                                     runner):
    """The workers' metrics files are added up with prometheus_client internals: an installed
    version without them stops `serve` with one line that says what to do."""
    from app import cli
    from prometheus_client.mmap_dict import MmapedDict

    monkeypatch.delattr(MmapedDict, "read_all_values_from_file")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(rules_path.parent))  # serve sets it for its process
    result = runner.invoke(cli, ["serve", "--rules", str(rules_path), "--workers", "2", "--port", "0"])
    assert result.exit_code == 1
    assert "MmapedDict.read_all_values_from_file" in result.output and "--workers 1" in result.output


def test_with_several_workers_every_metric_is_summed_not_only_decisions(rules_path, tmp_path):
    """Two workers: /metrics has the latency (7 answers), bad requests and rules of both, not only the
    decision counts (prometheus_client must be in its multiprocess mode in every worker)."""
    with BootrulesServer(rules_path, free_port(), tmp_path / "server.log", args=("--workers", "2")) as server:
        for _ in range(6):
            http_get(f"{server.url}/ipxe?mac=00:12:34:56:78:90")
        http_get(f"{server.url}/ipxe?mac=nonsense")
        metrics = http_get(f"{server.url}/metrics")[2]
    assert re.search(r"^bootrules_request_duration_seconds_count 7\.0$", metrics, re.M), metrics
    assert re.search(r"^bootrules_bad_requests_total 1\.0$", metrics, re.M), metrics
    assert re.search(r"^bootrules_rules_loaded 3\.0$", metrics, re.M), metrics
