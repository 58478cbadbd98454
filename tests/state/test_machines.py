"""Machines seen (bootrules/state/recorder.py, machine_store.py; web/snippet.py): every decision recorded per
machine off the request path, unknown machines and the rule to paste for them."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import cli, create_app
from bootrules.decide.matching import first_match_linear as first_match
from bootrules.rules.loader import parse_rules
from bootrules.services import services
from bootrules.state.database import SCHEMA_VERSION
from bootrules.state.machine_store import Filter, Sighting
from bootrules.state.recorder import Recorder
from bootrules.web.snippet import PLACEHOLDER, rule_to_paste
from support import ROOT, BootrulesServer, free_port, http_get, machine_store, new_database, once_store, wait_until

RULES = """
rules:
  - name: lab-rescue
    match: {mac: "00:12:34:56:78:90"}
    chain: http://pxe.example.com/rescue.ipxe
  - name: vmware-guests
    match: {mac: "00:0c:29:*"}
    chain: http://boot.example.com/vmware.ipxe
  - name: everyone-else
    exit: true
"""
UUID = "4c4c4544-0042-3510-8052-b4c04f4d4e31"


def hexed(text: str) -> str:
    return text.encode().hex()


@pytest.fixture
def lab(write_rules, tmp_path):
    app = create_app(str(write_rules(RULES)), poll_interval=0)
    yield app, app.test_client(), machine_store(tmp_path / "bootrules-state-machines.db")
    services(app).stop()


def flush(app) -> int:
    return services(app).recorder.flush()


def test_every_decision_is_recorded_per_machine_with_what_it_sent(lab):
    """Each decision adds to its machine's row: the facts it sent last (normalised), counts, last
    answer, recent decisions."""
    app, client, store = lab
    for platform in ("pcbios", "efi", "efi"):
        client.get(f"/ipxe?mac=00-12-34-56-78-90&platform={platform}&serial_hex={hexed('  SN 42 ')}")
    client.get("/ipxe?mac=52:54:00:aa:bb:cc&product_hex=" + hexed("PowerEdge R640"))
    assert flush(app) == 2
    page = store.page(Filter())
    assert page.total == 2
    newest, rescue = page.machines
    assert newest.machine == "mac:52:54:00:aa:bb:cc" and newest.unknown and newest.last_rule == "everyone-else"
    assert rescue.machine == "mac:00:12:34:56:78:90" and not rescue.unknown
    assert rescue.facts == {"mac": "00:12:34:56:78:90", "platform": "efi", "serial": "sn 42"}  # normalised
    assert (rescue.decisions, rescue.last_rule, rescue.last_action, rescue.client) == (3, "lab-rescue", "chain",
                                                                                       "127.0.0.1")
    assert [decision.rule for decision in rescue.recent] == ["lab-rescue"] * 3
    assert rescue.first_seen <= rescue.last_seen and abs(rescue.recent[0].at - rescue.last_seen) < 0.001
    client.get("/ipxe?mac=00:12:34:56:78:90")
    flush(app)
    again = store.one("mac:00:12:34:56:78:90")
    assert again.decisions == 4 and again.first_seen == rescue.first_seen and len(again.recent) == 4


def test_a_machine_is_one_row_however_often_it_asks_and_from_whichever_nic(lab):
    """A machine is one row under its UUID, however often it asks and through whichever NIC."""
    app, client, store = lab
    for _ in range(100):
        client.get(f"/ipxe?mac=52:54:00:00:00:01&uuid={UUID}")
    client.get(f"/ipxe?mac=52:54:00:00:00:02&uuid={UUID}")  # its second NIC
    assert flush(app) == 1
    (machine,) = store.page(Filter()).machines
    assert machine.machine == f"uuid:{UUID}" and machine.decisions == 101
    assert machine.facts["mac"] == "52:54:00:00:00:02"  # what it sent last
    assert len(machine.recent) == 20  # the most recent ones, not all 101


def test_unknown_means_answered_by_a_catch_all_or_by_no_rule(write_rules, tmp_path):
    """Unknown: answered by a rule without match: or by no rule; a machine with neither MAC nor UUID
    is kept under its address."""
    rules = write_rules("rules:\n  - name: only-vms\n    match: {mac: '00:0c:29:*'}\n    exit: true\n")
    app = create_app(str(rules), poll_interval=0)
    client = app.test_client()
    client.get("/ipxe?mac=00:0c:29:00:00:01")
    client.get("/ipxe?mac=52:54:00:00:00:09")
    client.get("/ipxe")  # neither MAC nor UUID: kept under its address
    flush(app)
    store = machine_store(tmp_path / "bootrules-state-machines.db")
    unknown = store.page(Filter(unknown=True)).machines
    assert {(m.machine, m.last_rule) for m in unknown} == {("mac:52:54:00:00:00:09", "(none)"),
                                                          ("ip:127.0.0.1", "(none)")}
    services(app).stop()


def test_filters_and_pages_over_many_machines(lab):
    """Pages, the unknown and rule filters and the substring search find exactly their machines (a
    LIKE wildcard is a plain character)."""
    app, client, store = lab
    for number in range(120):
        serial = hexed(f"SER{number:04d}")
        client.get(f"/ipxe?mac=00:0c:29:00:{number // 256:02x}:{number % 256:02x}&serial_hex={serial}")
    for number in range(5):
        client.get(f"/ipxe?mac=52:54:00:00:01:{number:02x}")
    flush(app)
    everyone = store.page(Filter(), 1, 50)
    assert (everyone.total, everyone.pages, len(everyone.machines)) == (125, 3, 50)
    last = store.page(Filter(), 3, 50)
    assert len(last.machines) == 25 and not {m.machine for m in last.machines} & {m.machine for m in everyone.machines}
    assert store.page(Filter(unknown=True)).total == 5
    assert store.page(Filter(rule="vmware-guests")).total == 120
    assert [m.facts["serial"] for m in store.page(Filter(text="SER0042")).machines] == ["ser0042"]
    assert store.page(Filter(text="00:01:0")).total == 5
    assert store.page(Filter(text="%")).total == 0  # a LIKE wildcard is a character here


def test_retention_forgets_machines_not_seen_for_long_and_caps_the_count(tmp_path):
    """Machines not seen for --machines-keep are forgotten, and at most --machines-max are kept, the
    oldest going first."""
    store = machine_store(tmp_path / "state.db")
    now = [1_000_000.0]
    recorder = Recorder(lambda: store, keep_seconds=3600, max_machines=100, clock=lambda: now[0])
    for number in range(150):
        now[0] += 1
        recorder.saw({"mac": f"52:54:00:00:{number // 256:02x}:{number % 256:02x}"}, "10.0.0.1", "r", "exit", True)
    recorder.flush()  # the first batch prunes too: only the 100 seen last are kept
    assert store.totals().machines == 100
    assert store.one("mac:52:54:00:00:00:31") is None and store.one("mac:52:54:00:00:00:32")
    now[0] += 3600 + 60  # an hour later, one machine comes back; the rest are forgotten
    recorder.saw({"mac": "52:54:00:00:00:40"}, "10.0.0.1", "r", "exit", True)
    recorder.flush()
    assert [m.machine for m in store.page(Filter()).machines] == ["mac:52:54:00:00:00:40"]


def test_a_store_that_fails_never_fails_a_boot_and_what_was_seen_waits_for_it(write_rules, tmp_path):
    """A store that cannot be written: boots are answered, /healthz says machines_seen failed, and
    what was seen is written once it can be."""
    rules = write_rules(RULES)
    state = tmp_path / "not-yet" / "state.db"  # its directory does not exist yet
    app = create_app(str(rules), poll_interval=0)
    recorder = services(app).recorder
    recorder.open_store, recorder.max_pending = lambda: machine_store(state), 3
    client = app.test_client()
    for number in range(5):
        assert client.get(f"/ipxe?mac=52:54:00:00:00:{number:02x}").status_code == 200
    assert flush(app) == 0 and recorder.last_error
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "bootrules_machine_records_dropped_total 2.0" in metrics  # 3 kept for the next try
    assert "bootrules_state_errors_total 1.0" in metrics
    health = client.get("/healthz").get_json()
    assert health["status"] == "ok" and health["machines_seen"]["status"] == "error"
    state.parent.mkdir()
    assert flush(app) == 3
    assert machine_store(state).totals().machines == 3
    services(app).stop()


def test_recording_off_writes_nothing(write_rules, tmp_path, monkeypatch):
    """--machines-keep 0: no recorder, and no state file is made."""
    monkeypatch.setenv("BOOTRULES_MACHINES_KEEP", "0")
    app = create_app(str(write_rules(RULES)), poll_interval=0)
    assert app.test_client().get("/ipxe?mac=52:54:00:00:00:01").status_code == 200
    assert services(app).recorder is None
    assert not list(tmp_path.glob("bootrules-state*"))
    services(app).stop()


def test_a_stopping_server_writes_what_it_saw_before_it_exits(write_rules, tmp_path, http_server):
    """SIGTERM right after an answer: the machine is in the store once the process has exited."""
    rules = write_rules(RULES)
    for workers in ("1", "2"):
        server = BootrulesServer(rules, free_port(), tmp_path / f"server{workers}.log", args=(*http_server, "--workers", workers))
        with server:
            assert http_get(f"{server.url}/ipxe?mac=52:54:00:00:0{workers}:01")[0] == 200
            server.signal(signal.SIGTERM)
            assert server.process.wait(timeout=20) == 0
        found = machine_store(tmp_path / "bootrules-state-machines.db").one(f"mac:52:54:00:00:0{workers}:01")
        assert found is not None and found.last_rule == "everyone-else", server.log()


def test_machines_command_lists_unknown_machines_and_json(lab, runner, tmp_path):
    """`machines` marks unknown machines, prints what they sent with escapes (never raw control
    characters), and has --json."""
    app, client, _store = lab
    client.get("/ipxe?mac=00:12:34:56:78:90")
    client.get("/ipxe?mac=52:54:00:00:00:07&serial_hex=" + hexed("evil\x1b[31m\nserial"))
    flush(app)
    rules = str(tmp_path / "rules.yaml")
    listed = runner.invoke(cli, ["machines", "--rules", rules])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert len(lines) == 3 and lines[1].startswith("? ") and "mac:52:54:00:00:00:07" in lines[1]
    assert "\x1b" not in listed.output and "evil\\x1b[31m\\n" in lines[1]  # escapes shown, not obeyed
    assert "lab-rescue (chain)" in lines[2]
    unknown = runner.invoke(cli, ["machines", "--rules", rules, "--unknown", "--json"])
    (record,) = [json.loads(line) for line in unknown.output.splitlines()]
    assert record["machine"] == "mac:52:54:00:00:00:07" and record["facts"]["serial"] == "evil\x1b[31m\nserial"
    assert record["unknown"] is True and record["last_rule"] == "everyone-else"


def test_an_older_schema_is_migrated_keeping_once_state_and_its_tokens(tmp_path):
    """A store of an older release is migrated in place: its once: rows, and a token of that
    release, still count."""
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:  # a store made by the release before machines were recorded
        db.execute("CREATE TABLE bootrules_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO bootrules_meta VALUES ('schema_version', '1')")
        db.execute("CREATE TABLE bootrules_once (machine TEXT NOT NULL, rule TEXT NOT NULL, label TEXT NOT NULL, "
                   "state TEXT NOT NULL, token TEXT, issued_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE "
                   "PRECISION NOT NULL, done_at DOUBLE PRECISION, done_from TEXT, identities TEXT NOT NULL, "
                   "PRIMARY KEY (machine, rule, label)) WITHOUT ROWID")
        db.execute("INSERT INTO bootrules_once VALUES ('mac:52:54:00:00:00:01', 'r', 'true', 'done', NULL, 1, 2, 3, "
                   "'10.0.0.1', 'mac:52:54:00:00:00:01')")
        # A machine installing while bootrules is upgraded: its token is an older release's (random).
        db.execute("INSERT INTO bootrules_once VALUES ('mac:52:54:00:00:00:02', 'r', 'true', 'armed', ?, ?, ?, "
                   "NULL, NULL, 'mac:52:54:00:00:00:02')", ("A" * 32, time.time(), time.time() + 3600))
    db.close()
    store = once_store(path)
    assert sorted(row.state for row in store.rows()) == ["armed", "done"]
    assert machine_store(path).totals().machines == 0
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM bootrules_meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
        assert len(db.execute("SELECT value FROM bootrules_meta WHERE key = 'token_key'").fetchone()[0]) == 64
    db.close()
    assert store.redeem_unsigned("A" * 32, "10.0.0.2", time.time())[0] == "done"


def test_two_servers_record_into_one_postgresql(postgres, write_rules, tmp_path):
    """Machines seen by either server are listed by both, with their once: state."""
    rules = write_rules(RULES.replace("    chain: http://pxe.example.com/rescue.ipxe",
                                      "    once: true\n    chain: http://pxe.example.com/rescue.ipxe"))
    url = new_database(postgres)
    with BootrulesServer(rules, free_port(), tmp_path / "a.log", args=("--state", url)) as a, \
            BootrulesServer(rules, free_port(), tmp_path / "b.log", args=("--state", url)) as b:
        assert http_get(f"{a.url}/ipxe?mac=00:12:34:56:78:90&serial_hex={hexed('PG-1')}")[0] == 200
        assert http_get(f"{b.url}/ipxe?mac=52:54:00:00:00:33")[0] == 200

        def listed(server):
            return {m["machine"]: m for m in json.loads(http_get(f"{server.url}/api/machines")[2])["machines"]}

        assert wait_until(lambda: len(listed(a)) == 2 and len(listed(b)) == 2, timeout=10), listed(a)
        seen = listed(b)["mac:00:12:34:56:78:90"]
        assert seen["facts"]["serial"] == "pg-1" and seen["last_rule"] == "lab-rescue"
        assert [(row["rule"], row["state"]) for row in seen["once"]] == [("lab-rescue", "armed")]
        assert listed(a)["mac:52:54:00:00:00:33"]["unknown"] is True
        unknown = json.loads(http_get(f"{a.url}/api/machines?unknown=1")[2])
        assert [m["machine"] for m in unknown["machines"]] == ["mac:52:54:00:00:00:33"]


# --------------------------------------------------------------------------- the rule to paste


def filled_in(snippet: str, action: str = "chain: http://boot.example.com/new.ipxe") -> str:
    """The snippet with its placeholder action replaced, as an operator would: the action is
    its last line (a value the machine sent may read like the placeholder itself)."""
    before, placeholder, after = snippet.rpartition(PLACEHOLDER)
    assert placeholder, snippet
    return before + action + after


def rules_with(snippet: str) -> str:
    return "rules:\n" + snippet + "  - name: catch-all\n    exit: true\n"


def test_the_rule_to_paste_names_the_machine_and_passes_check_once_filled_in(tmp_path, runner):
    """The rule to paste is named from product and serial, matches the MAC, and passes check as
    written and once filled in."""
    facts = {"mac": "52:54:00:12:34:56", "serial": "4bx2k3", "product": "poweredge r640", "manufacturer": "dell inc.",
             "uuid": UUID, "platform": "efi"}
    snippet = rule_to_paste(facts, "10.0.0.5", taken={"poweredge-r640-4bx2k3"})
    assert snippet.startswith("  - name: poweredge-r640-4bx2k3-2\n    match:\n      mac: \"52:54:00:12:34:56\"\n")
    assert '      # serial: "4bx2k3"' in snippet and '      # manufacturer: "dell inc."' in snippet
    path = tmp_path / "rules.yaml"
    path.write_text(rules_with(filled_in(snippet)))
    checked = runner.invoke(cli, ["check", "--strict", str(path)])
    assert checked.exit_code == 0, checked.output
    path.write_text(rules_with(snippet))  # as written, too: the placeholder is a valid action
    assert runner.invoke(cli, ["check", str(path)]).exit_code == 0


TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=60).map(str.casefold).filter(
    lambda text: text.strip() == text and text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(serial=TEXT, product=TEXT, manufacturer=TEXT)
def test_no_value_a_machine_sends_can_break_or_change_the_rule_to_paste(serial, product, manufacturer):
    """Newlines, quotes, `#`, YAML syntax, any Unicode: the pasted rule is still the one rule for
    this MAC, and every value it shows as an alternative is exactly what the machine sent."""
    facts = {"mac": "52:54:00:12:34:56", "serial": serial, "product": product, "manufacturer": manufacturer}
    snippet = rule_to_paste(facts, "10.0.0.5")
    ruleset = parse_rules(rules_with(filled_in(snippet)), "rules.yaml")
    assert [rule.name for rule in ruleset.rules][1:] == ["catch-all"]
    assert first_match(ruleset.rules, {"mac": "52:54:00:12:34:56"}).name == ruleset.rules[0].name
    assert first_match(ruleset.rules, {"mac": "52:54:00:12:34:57"}).name == "catch-all"
    uncommented = snippet.replace("      # serial:", "      serial:").replace("      # product:", "      product:")
    if not any(char in serial + product for char in "*?["):  # a glob character would make it a pattern
        ruleset = parse_rules(rules_with(filled_in(uncommented)), "rules.yaml")
        assert first_match(ruleset.rules, facts).name == ruleset.rules[0].name
    assert textwrap.dedent(snippet).startswith("- name: ")


def test_a_machine_a_once_rule_finished_is_known_not_unknown(tmp_path):
    """After it reported done, a machine falls through to the catch-all; it is still a machine
    the rules name: listed as done by its once: rule, not as unknown, and no rule to paste."""
    from support import ask, write_once_rules

    app = create_app(str(write_once_rules(tmp_path / "rules.yaml")), poll_interval=0)
    client = app.test_client()
    _rule, token = ask(client)
    assert client.post(f"/done/{token}").status_code == 200
    assert ask(client) == ("local-disk", None)
    flush(app)
    machine = services(app).page_stores().machines.one("mac:52:54:00:12:34:56", services(app).page_stores().once)
    assert machine.last_rule == "local-disk" and not machine.unknown and machine.done_by == ("install-debian",)
    detail = client.get("/api/machines/mac:52:54:00:12:34:56").get_json()
    assert detail["unknown"] is False and detail["rule_to_paste"] is None
    services(app).stop()


def test_the_cap_holds_after_every_batch_not_only_at_the_next_prune(tmp_path):
    """--machines-max is kept after the batch that crosses it, not a minute later."""
    store = machine_store(tmp_path / "state.db")
    now = [1_000_000.0]
    recorder = Recorder(lambda: store, keep_seconds=86400, max_machines=100, clock=lambda: now[0])
    for batch in range(5):
        for number in range(80):
            now[0] += 0.001
            recorder.saw({"mac": f"52:54:00:00:{batch:02x}:{number:02x}"}, "10.0.0.1", "r", "exit", True)
        recorder.flush()
        assert store.count() <= 100, batch


def test_the_wal_of_a_busy_store_is_truncated_once_it_has_grown(tmp_path, monkeypatch):
    """A flood of writes grows SQLite's WAL; the checkpoint thread truncates it once it is past
    its limit, instead of keeping the disk space for ever."""
    from bootrules.state import database as database_module

    monkeypatch.setattr(database_module, "WAL_LIMIT_BYTES", 256 * 1024)
    monkeypatch.setattr(database_module, "CHECKPOINT_EVERY", 0.2)
    store = machine_store(tmp_path / "flood.db")
    now = time.time()
    for batch in range(40):
        store.write({f"mac:{batch}:{n}": Sighting({"mac": "52:54:00:00:00:01", "serial": "x" * 200}, "10.0.0.1",
                                                   now, "r", "exit", True) for n in range(64)}, {})
    wal = tmp_path / "flood.db-wal"
    assert wal.stat().st_size > 256 * 1024
    assert wait_until(lambda: wal.stat().st_size <= 256 * 1024, timeout=10), wal.stat().st_size
    assert store.count() == 40 * 64


def test_a_stopped_app_writes_what_it_saw_then_and_nothing_at_exit(write_rules):
    """An app that is stopped writes its machines seen at once, and nothing when the process
    exits, by when its store may long be gone."""
    rules = write_rules("- name: all\n  exit: true\n")
    script = textwrap.dedent(f"""
        import os, sys
        os.environ["BOOTRULES_STATE"] = "postgresql://bootrules:pw@127.0.0.1:{free_port()}/x"  # nothing listens
        from app import create_app
        from bootrules.services import services
        app = create_app({str(rules)!r}, poll_interval=0)
        assert app.test_client().get("/ipxe?mac=52:54:00:12:34:56").status_code == 200
        services(app).stop()
        print("STOPPED", file=sys.stderr, flush=True)
    """)
    ran = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    when_stopped, _, at_exit = ran.stderr.partition("STOPPED\n")
    assert "machines seen not recorded" in when_stopped
    assert at_exit == ""
