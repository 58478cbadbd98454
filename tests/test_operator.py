"""Operator experience: check warnings, preview --explain, /metrics, JSON logs, settings
from the environment, and the JSON Schema that editors use."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from app import cli
from bootrules.lint import lint
from bootrules.logs import DECISION_MESSAGE, BatchingHandler, JsonFormatter, SecondCachingFormatter
from bootrules.loader import RulesError, parse_rules
from conftest import ROOT, SAMPLE_RULES, free_port
from support import BootrulesServer, http_get

# --------------------------------------------------------------------------- check warnings

LINT_CASES = [
    pytest.param(
        """
        rules:
          - name: everyone
            exit: true
          - name: never
            match: {mac: "00:11:22:33:44:55"}
            chain: http://x/never
        """,
        ["rules.yaml:4: warning: rule 'never' can never match: rule 'everyone' (line 2) has no 'match:', so it matches every machine"],
        id="earlier-catch-all",
    ),
    pytest.param(
        """
        rules:
          - name: first
            match: {mac: "00:11:22:33:44:55"}
            exit: true
          - name: second
            match: {mac: "00-11-22-33-44-55", platform: efi}
            chain: http://x/second
          - name: rest
            exit: true
        """,
        ["rules.yaml:5: warning: rule 'second' can never match: rule 'first' (line 2) matches its machines first"],
        id="same-mac-twice",
    ),
    pytest.param(
        """
        rules:
          - name: vmware
            match: {mac: "00:0c:29:*"}
            exit: true
          - name: lab
            match: {mac: ["00:11:22:33:44:55", "00:0C:29:AB:CD:EF"]}
            chain: http://x/lab
          - name: one-vm
            match: {mac: "00:0c:29:00:00:01"}
            chain: http://x/vm
          - name: rest
            exit: true
        """,
        [
            "rules.yaml:5: warning: rule 'lab': mac 00:0c:29:ab:cd:ef never reaches it: rule 'vmware' (line 2) matches that first",
            "rules.yaml:8: warning: rule 'one-vm' can never match: rule 'vmware' (line 2) matches its machines first",
        ],
        id="glob-covers-later-exact",
    ),
    pytest.param(
        """
        rules:
          - name: lab-net
            match: {client: 10.0.0.0/8}
            exit: true
          - name: office
            match: {client: 10.1.0.0/16, product: "OptiPlex*"}
            chain: http://x/office
          - name: dell
            match: {product: "optiplex 7*"}
            chain: http://x/dell
          - name: rest
            exit: true
        """,
        ["rules.yaml:5: warning: rule 'office' can never match: rule 'lab-net' (line 2) matches its machines first"],
        id="cidr-covers-cidr",
    ),
    pytest.param(
        """
        rules:
          - name: only
            match: {mac: "00:11:22:33:44:55"}
            exit: true
        """,
        ["rules.yaml:2: warning: no catch-all rule at the end: a machine no rule matches is sent on with `exit`; "
         "add a last rule without 'match:' to say what it should get"],
        id="no-catch-all",
    ),
    pytest.param(SAMPLE_RULES, [], id="clean"),
]


@pytest.mark.parametrize("text,expected", LINT_CASES)
def test_check_warns_about_rules_that_can_never_match(text, expected):
    """Each warning names the shadowed rule and the rule that wins, with both lines."""
    ruleset = parse_rules(textwrap.dedent(text).lstrip("\n"))
    assert [warning.render("rules.yaml") for warning in lint(ruleset)] == expected


def test_check_exits_0_on_warnings_unless_strict(runner, write_rules):
    """Warnings are printed but only --strict turns them into exit status 1."""
    path = write_rules(LINT_CASES[0].values[0])
    relaxed = runner.invoke(cli, ["check", str(path)])
    assert relaxed.exit_code == 0
    assert "warning: rule 'never' can never match" in relaxed.stderr
    assert relaxed.stdout == f"{path}: 2 rules, no errors, 1 warning\n"
    assert runner.invoke(cli, ["check", "--strict", str(path)]).exit_code == 1


def test_the_bundled_rules_have_no_warnings(runner):
    """The rules.yaml shipped as an example passes `check --strict`."""
    result = runner.invoke(cli, ["check", "--strict", str(ROOT / "rules.yaml")])
    assert result.exit_code == 0, result.output


# --------------------------------------------------------------------------- preview --explain


def test_preview_explain_says_why_each_earlier_rule_did_not_match(runner):
    """--explain lists each rule above the answer with the first selector that failed."""
    result = runner.invoke(cli, ["preview", "--rules", str(ROOT / "rules.yaml"), "--explain", "--mac", "52:54:00:12:34:56",
                                 "--manufacturer", "Dell Inc.", "--product", "PowerEdge R740", "--platform", "efi"])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "# rule 'lab-rescue' (line 16) did not match: mac 52:54:00:12:34:56 does not match 00:12:34:56:78:90",
        "# rule 'db01-iscsi' (line 21) did not match: mac 52:54:00:12:34:56 does not match any of 00:11:22:33:44:55, 00:11:22:33:44:56",
        "# rule 'diskless-kiosk' (line 31) did not match: no serial was sent",
        "# rule 'dell-uefi-installer' (line 39) did not match: product poweredge r740 does not match poweredge r6* (glob)",
        "# rule 'test-rack' (line 47) did not match: no ip was sent",
        "# rule 'vmware-guests' (line 52) did not match: mac 52:54:00:12:34:56 does not match 00:0c:29:* (glob)",
        f"# answered by rule 'everyone-else' ({ROOT / 'rules.yaml'}:57), action exit",
    ]


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
    app.extensions["bootrules"].reload()
    rules_path.write_text("rules: [")
    app.extensions["bootrules"].reload()
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


def test_metrics_add_up_across_worker_processes(rules_path, tmp_path, monkeypatch):
    """With two workers, one /metrics answer counts the decisions of both workers."""
    from prometheus_client.mmap_dict import MmapedDict

    shared = tmp_path / "metrics"
    shared.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(shared))
    with BootrulesServer(rules_path, free_port(), tmp_path / "server.log", args=("--workers", "2")) as server:
        for _ in range(60):  # a new connection each: the kernel hands them to either worker
            http_get(server.url + "/ipxe?mac=00:12:34:56:78:90")
        text = http_get(server.url + "/metrics")[2]
        per_worker = []
        for path in shared.glob("*.decisions"):  # one file of decision counts per process
            values = MmapedDict.read_all_values_from_file(str(path))
            per_worker.append(sum(value for key, value, *_ in values))
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


# --------------------------------------------------------------------------- logs and settings


def test_json_logs_carry_one_object_per_line_with_the_decision_fields(rules_path, tmp_path):
    """--log-format json: every line is a JSON object; a decision has client, mac, rule, action."""
    with BootrulesServer(rules_path, free_port(), tmp_path / "server.log", args=("--log-format", "json")) as server:
        http_get(server.url + "/ipxe?mac=00-12-34-56-78-90")
    lines = [json.loads(line) for line in server.log().splitlines()]
    assert any(line["message"].startswith("serving 3 rules from") for line in lines)
    decision = next(line for line in lines if line.get("rule") == "lab-rescue")
    assert decision["client"] == "127.0.0.1" and decision["mac"] == "00:12:34:56:78:90" and decision["action"] == "chain"
    assert decision["level"] == "INFO" and decision["time"].endswith("Z")


@pytest.mark.parametrize("formatter", [SecondCachingFormatter(), JsonFormatter()], ids=["text", "json"])
def test_queued_decision_lines_read_as_logged_records_and_keep_their_order(formatter):
    """A decision handed straight to the log handler is written exactly as the same
    record logged the ordinary way, before any later line, and a warning flushes it."""
    fields = ("10.0.0.7", "00:12:34:56:78:90", "lab-rescue", "chain")
    record = logging.LogRecord("bootrules", logging.INFO, __file__, 1, DECISION_MESSAGE, fields, None)
    record.__dict__.update(zip(("client", "mac", "rule", "action"), fields))
    stream = io.StringIO()
    handler = BatchingHandler(stream, interval=3600)
    handler.setFormatter(formatter)
    handler.decisions.append((record.created, fields))
    handler.handle(logging.LogRecord("bootrules", logging.WARNING, __file__, 1, "reload failed", (), None))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "reload failed" in lines[1]
    assert lines[0] == formatter.format(record)


def test_every_setting_can_come_from_the_environment(rules_path, tmp_path):
    """serve with no flags at all: rules, port, base URL, workers and log format from BOOTRULES_*."""
    port = free_port()
    env = {**os.environ, "BOOTRULES_RULES": str(rules_path), "BOOTRULES_PORT": str(port),
           "BOOTRULES_BASE_URL": "http://boot.example.com", "BOOTRULES_WORKERS": "1", "BOOTRULES_LOG_FORMAT": "json",
           "BOOTRULES_TRUSTED_PROXIES": "127.0.0.1"}
    log = tmp_path / "env.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "serve"], env=env, stdout=out,
                                   stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    status, _h, body = http_get(f"http://127.0.0.1:{port}/boot.ipxe", timeout=1)
                    break
                except OSError:
                    assert time.monotonic() < deadline and process.poll() is None, log.read_text()
                    time.sleep(0.1)
            assert "chain --replace --autofree http://boot.example.com/ipxe?" in body
        finally:
            process.terminate()
            process.wait(timeout=10)
    assert json.loads(log.read_text().splitlines()[0])["message"].startswith("loaded 3 rules")


def test_help_lists_every_environment_variable(runner):
    """`--help` names each BOOTRULES_* variable the README lists."""
    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"^\| `(BOOTRULES_[A-Z_]+)`", readme, re.M))
    assert len(listed) >= 10
    shown = runner.invoke(cli, ["--help"]).output + runner.invoke(cli, ["serve", "--help"]).output
    for name in listed:
        short = name.replace("BOOTRULES_PORT", "_PORT")
        assert name in shown or short in shown, name


# --------------------------------------------------------------------------- JSON Schema

SCHEMA = json.loads((ROOT / "contrib" / "rules.schema.json").read_text())


def schema_errors(document: object) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(SCHEMA)
    return [error.message for error in validator.iter_errors(document)]


def readme_rule_examples() -> list[str]:
    """Every YAML block in the README that holds rules (fragments get a `rules:` header)."""
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    examples = []
    for block in blocks:
        if block.lstrip().startswith("rules:"):
            examples.append(block)
        elif block.lstrip().startswith("- name:"):
            examples.append("rules:\n" + block)
    return examples


def test_the_schema_accepts_the_bundled_rules_and_every_readme_example():
    """rules.yaml and each rules example in the README pass both the schema and the loader."""
    examples = [(ROOT / "rules.yaml").read_text(), *readme_rule_examples()]
    assert len(examples) >= 3
    for text in examples:
        assert schema_errors(yaml.safe_load(text)) == [], text
        parse_rules(text)


WRONG_DOCUMENTS = [
    pytest.param("rules:\n  - name: a\n    match: {mack: '00:11:22:33:44:55'}\n    exit: true\n", id="unknown-selector"),
    pytest.param("rules:\n  - name: a\n    chain: http://x/a\n    exit: true\n", id="two-actions"),
    pytest.param("rules:\n  - name: a\n    match: {mac: '00:11:22:33:44:55'}\n", id="no-action"),
    pytest.param("rules:\n  - name: a\n    match: {mac: '00:11:22:33:44'}\n    exit: true\n", id="bad-mac"),
    pytest.param("rules:\n  - name: a\n    match: {uuid: '1234'}\n    exit: true\n", id="bad-uuid"),
    pytest.param("rules:\n  - name: a\n    match: {platform: uefi}\n    exit: true\n", id="bad-platform"),
    pytest.param("rules:\n  - name: a\n    match: {}\n    exit: true\n", id="empty-match"),
    pytest.param("rules:\n  - name: a\n    exit: false\n", id="exit-false"),
    pytest.param("rules:\n  - name: a\n    sanboot: {uri: 'iscsi:x::::iqn.a', drive: 300}\n", id="drive-out-of-range"),
    pytest.param("rules:\n  - match: {mac: '00:11:22:33:44:55'}\n    exit: true\n", id="no-name"),
    pytest.param("rules:\n  - name: 'two words'\n    exit: true\n", id="bad-name"),
    pytest.param("rules:\n  - name: a\n    chain: 'http://x/a b'\n", id="space-in-url"),
    pytest.param("rules:\n  - name: a\n    boot: {initrd: http://x/i}\n", id="boot-without-kernel"),
    pytest.param("rules:\n  - name: a\n    sanboot: nbd://x/disk\n", id="bad-san-uri"),
    pytest.param("rule:\n  - name: a\n    exit: true\n", id="top-level-typo"),
]


@pytest.mark.parametrize("text", WRONG_DOCUMENTS)
def test_wrong_documents_are_rejected_by_both_schema_and_loader(text):
    """What the loader refuses, the schema underlines too."""
    assert schema_errors(yaml.safe_load(text)) != []
    with pytest.raises(RulesError):
        parse_rules(text)
