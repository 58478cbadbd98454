"""`once:` rules: install once, report done with a token, then fall through (bootrules/state/once.py,
once_store.py, tokens.py, arming.py)."""

from __future__ import annotations

import base64
import json
import logging
import re
import sqlite3
import struct
import time
from pathlib import Path

import pytest

from app import cli, create_app
from bootrules.services import services
from bootrules.state import database as database_module
from bootrules.state import health as health_module
from bootrules.state import tokens
from bootrules.rules.loader import RulesError, parse_rules
from bootrules.model import Once
from bootrules.state.once import SHOWN_CHARS, TOKEN
from support import (MAC_A, MAC_B, MAC_C, ROOT, UUID, ask, lose_unwritten_rows, once_store, rows, wait_until,
                     write_once_rules)

@pytest.fixture
def lab(tmp_path):
    """An app with a once: rule and its state in a SQLite file of the test's own."""
    rules = write_once_rules(tmp_path / "rules.yaml")
    app = create_app(str(rules), poll_interval=0)
    yield app, app.test_client(), rules, tmp_path / "bootrules-state.db"
    services(app).stop()


# --------------------------------------------------------------------------- rules.yaml


@pytest.mark.parametrize("value, expected", [
    ("true", Once("true", 0)), ("yes", Once("true", 0)), ("debian13-2026-11", Once("debian13-2026-11", 0)),
    ("{label: v2, expires: 36h}", Once("v2", 129600)), ("{expires: 90m}", Once("true", 5400)),
])
def test_once_takes_true_a_label_or_a_label_with_an_expiry(value, expected):
    """`once:` takes true, a label, or a mapping with a label and an expiry."""
    ruleset = parse_rules(f"rules:\n  - name: a\n    once: {value}\n    exit: true\n")
    assert ruleset.rules[0].once == expected


@pytest.mark.parametrize("value, problem", [
    ("false", "rules.yaml:3: rule 'a': 'once: false' does nothing; remove it (or give a label to re-arm)"),
    ('"two words"', "rules.yaml:3: rule 'a': once: label 'two words' must be 1-64 letters, digits, '.', '_' or '-', "
                    "starting with a letter or digit"),
    ("{expires: 3y}", "rules.yaml:3: rule 'a': once expires: '3y' is not a duration (a number and s, m, h or d: 90m, 24h, 7d)"),
    ("{expires: 10s}", "rules.yaml:3: rule 'a': once expires: '10s' is out of range (1 minute to 366 days)"),
    ("{lable: x}", "rules.yaml:3: rule 'a': once: unknown key 'lable' (did you mean 'label'? expected one of: label, expires)"),
])
def test_a_wrong_once_is_reported_with_its_line(value, problem):
    """A wrong `once:` (false, a bad label, a bad expiry) is a file:line error."""
    with pytest.raises(RulesError) as error:
        parse_rules(f"rules:\n  - name: a\n    once: {value}\n    exit: true\n")
    assert error.value.problems == (problem,)


def test_check_warns_when_a_once_rule_has_nothing_below_to_fall_through_to(runner, tmp_path):
    """check warns when nothing below a once: rule answers its machines once they are done."""
    rules = tmp_path / "rules.yaml"
    rules.write_text('rules:\n  - name: a\n    match: {mac: "52:54:00:*"}\n    once: v1\n    exit: true\n'
                     '  - name: b\n    match: {mac: "52:54:00:12:*"}\n    exit: true\n')
    result = runner.invoke(cli, ["check", str(rules)])
    assert f"{rules}:2: warning: rule 'a' has once: but no rule below it answers all its machines" in result.output
    assert "can never match" not in result.output  # a once: rule lets its machines through: it shadows nothing
    assert runner.invoke(cli, ["check", str(write_once_rules(rules))]).output.endswith("2 rules, no errors, 0 warnings\n")


# --------------------------------------------------------------------------- the boot path and the callback


def test_a_machine_installs_once_reports_done_and_then_boots_from_disk(lab):
    """Armed with one live token until it reports done; then the rules below answer it; a repeated
    callback changes nothing."""
    app, client, _rules, state = lab
    rule, token = ask(client)
    assert rule == "install-debian" and len(token) >= 22  # at least 128 random bits
    script = client.get(f"/ipxe?mac={MAC_A}").get_data(as_text=True)
    assert script.splitlines()[2] == f"set bootrules-done http://localhost/done/{token}"
    assert "bootrules.done=${bootrules-done}" in script
    for _ in range(20):  # asking again while armed: the same live token, no new row
        assert ask(client) == ("install-debian", token)
    assert rows(state) == [(f"mac:{MAC_A}", "install-debian", "true", "armed")]

    response = client.post(f"/done/{token}")
    assert response.status_code == 200 and response.get_data(as_text=True).startswith("done: machine mac:")
    assert ask(client) == ("local-disk", None)
    again = client.post(f"/done/{token}")  # an installer that retries: still 200, nothing changes
    assert again.status_code == 200 and again.get_data(as_text=True).startswith("already done")
    assert rows(state) == [(f"mac:{MAC_A}", "install-debian", "true", "done")]


def test_the_callback_refuses_get_unknown_malformed_and_expired_tokens(lab):
    """GET is 405, unknown and malformed tokens 404, an expired one 410; a new boot gets a new token
    that works."""
    app, client, _rules, state = lab
    _rule, token = ask(client)
    assert client.get(f"/done/{token}").status_code == 405  # a crawler or a prefetch disarms nothing
    assert client.get(f"/done/{token}").headers["Allow"] == "POST"
    assert client.post("/done/" + "A" * 32).status_code == 404
    assert client.post("/done/../../etc/passwd").status_code == 404
    assert client.post("/done/x%0aset").status_code == 404
    gate = services(app).once
    real_clock = gate.clock
    gate.clock = lambda: real_clock() + 86400 + 1  # a day and a second later
    expired = client.post(f"/done/{token}")
    assert expired.status_code == 410 and "token expired at" in expired.get_data(as_text=True)
    assert rows(state)[0][3] == "armed"  # nothing changed
    _rule, fresh = ask(client)  # booting again gets a new token, which works
    assert fresh != token and client.post(f"/done/{fresh}").status_code == 200


def test_a_token_only_disarms_the_machine_it_was_issued_to(lab):
    """A token disarms its own machine, never another."""
    _app, client, _rules, state = lab
    _rule, token_a = ask(client, MAC_A)
    _rule, token_b = ask(client, MAC_B)
    assert token_a != token_b
    assert client.post(f"/done/{token_a}").status_code == 200
    assert ask(client, MAC_A)[0] == "local-disk"
    assert ask(client, MAC_B) == ("install-debian", token_b)


def test_a_machine_with_two_nics_does_not_reinstall_through_the_other(lab):
    """State hangs on the SMBIOS UUID when the machine sends one: it is the same on every NIC."""
    _app, client, _rules, _state = lab
    _rule, token = ask(client, MAC_A, UUID)
    assert client.post(f"/done/{token}").status_code == 200
    assert ask(client, MAC_B, UUID)[0] == "local-disk"  # the second NIC, same machine
    assert ask(client, MAC_A)[0] == "local-disk"  # the first NIC, from firmware that sends no UUID


def test_changing_the_label_re_arms_every_machine_of_the_rule(lab):
    """A new label re-arms every machine of the rule; the old label again finds them done."""
    app, client, rules, state = lab
    for mac in (MAC_A, MAC_B):
        assert client.post(f"/done/{ask(client, mac)[1]}").status_code == 200
        assert ask(client, mac)[0] == "local-disk"
    write_once_rules(rules, "debian13-2026-11")
    assert services(app).reloader.reload()
    assert ask(client, MAC_A)[0] == "install-debian" and ask(client, MAC_B)[0] == "install-debian"
    write_once_rules(rules, "true")  # back to the old label: those machines are done under it
    assert services(app).reloader.reload()
    assert ask(client, MAC_A)[0] == "local-disk"


def test_rearm_and_machines_from_the_command_line(lab, runner):
    """`machines --once` lists the state without tokens; `rearm --mac` re-arms a machine under every
    name it has."""
    _app, client, rules, state = lab
    _rule, token = ask(client, MAC_A, UUID)
    assert client.post(f"/done/{token}").status_code == 200
    listed = runner.invoke(cli, ["machines", "--once", "--rules", str(rules)])
    assert listed.exit_code == 0, listed.output
    assert re.search(rf"^uuid:{UUID} +install-debian +true +done +\S+Z 127.0.0.1$", listed.output, re.M), listed.output
    assert token not in listed.output
    as_json = [json.loads(line) for line in runner.invoke(cli, ["machines", "--once", "--rules", str(rules), "--json"]).output.splitlines()]
    assert {row["machine"] for row in as_json} == {f"uuid:{UUID}", f"mac:{MAC_A}"}
    assert all(token not in json.dumps(row) for row in as_json)

    result = runner.invoke(cli, ["rearm", "--rules", str(rules), "--mac", MAC_A.replace(":", "-"), "--rule", "install-debian"])
    assert result.exit_code == 0 and "(2 rows re-armed)" in result.output, result.output
    assert ask(client, MAC_A, UUID)[0] == "install-debian"
    assert runner.invoke(cli, ["rearm", "--rules", str(rules)]).exit_code == 2  # neither --mac nor --uuid


def test_tokens_never_appear_whole_in_logs_health_or_metrics(lab, caplog):
    """Logs show a token's first 6 characters only; /healthz and /metrics never show it."""
    _app, client, _rules, _state = lab
    with caplog.at_level(logging.INFO, logger="bootrules"):
        _rule, token = ask(client)
        client.post(f"/done/{token}")
        client.post(f"/done/{token}")
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert f"token={token[:6]}…" in text and token not in text
    assert "once: armed machine=mac:52:54:00:12:34:56 rule=install-debian label=true" in text
    assert "once: done machine=mac:52:54:00:12:34:56 rule=install-debian label=true" in text
    assert token not in client.get("/healthz").get_data(as_text=True)
    metrics = client.get("/metrics").get_data(as_text=True)
    assert token not in metrics and 'bootrules_once_callbacks_total{outcome="done"} 1.0' in metrics
    assert "bootrules_once_row_writes_total 1.0" in metrics  # the process's first arm: written before its answer


def test_rules_without_once_never_touch_the_state_store(tmp_path):
    """No once: rule: no state file is made (not even where one could be), and health has no state."""
    rules = tmp_path / "rules.yaml"
    rules.write_text((ROOT / "rules.yaml").read_text())
    app = create_app(str(rules), poll_interval=0)
    client = app.test_client()
    for mac in ("00:11:22:33:44:56", "00:0c:29:12:34:56", "aa:bb:cc:dd:ee:ff"):
        assert client.get(f"/ipxe?mac={mac}").status_code == 200
    assert not (tmp_path / "bootrules-state.db").exists()
    assert "state" not in client.get("/healthz").get_json()
    services(app).stop()


def test_the_state_store_is_made_as_once_rules_load_never_by_a_machine(tmp_path, caplog, monkeypatch):
    """Rules with `once:` make their state file as they load, here when a reload brings the
    first `once:` rule: the first machine finds it made (making it means syncs to disk, which
    on a slow disk would hold up that machine's worker)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text((ROOT / "rules.yaml").read_text())
    state = tmp_path / "bootrules-state.db"
    app = create_app(str(rules), poll_interval=0)
    client = app.test_client()
    assert not state.exists()
    write_once_rules(rules)
    with caplog.at_level(logging.INFO, logger="bootrules"):
        assert services(app).reloader.reload()
    assert f"made the state store {state} for the once: rules" in caplog.text
    assert rows(state) == []  # made, schema and all, before any machine asked

    made_by_a_request = []
    make_schema = database_module.Database._make_schema

    def watched(database, connection):
        made_by_a_request.append(database.location)
        return make_schema(database, connection)

    monkeypatch.setattr(database_module.Database, "_make_schema", watched)
    assert ask(client)[0] == "install-debian"
    assert str(state) not in made_by_a_request
    services(app).stop()


def test_a_state_store_that_cannot_be_made_shows_on_healthz_before_any_machine_asks(tmp_path, caplog, monkeypatch):
    """The state file cannot be made where it is set: the log says so as the rules load, and
    /healthz is degraded before a machine has asked."""
    rules = write_once_rules(tmp_path / "rules.yaml")
    monkeypatch.setenv("BOOTRULES_STATE", broken_state("unreachable", tmp_path))
    with caplog.at_level(logging.INFO, logger="bootrules"):
        app = create_app(str(rules), poll_interval=0)
    assert re.search(r"state store \S+/not-a-dir/state.db cannot be made \(.+\); once: rules fall through until it "
                     r"can", caplog.text), caplog.text
    health = app.test_client().get("/healthz").get_json()
    assert health["status"] == "degraded" and health["state"]["status"] == "error", health
    services(app).stop()


# --------------------------------------------------------------------------- failing safe


def broken_state(kind: str, tmp_path: Path) -> str:
    if kind == "unreachable":
        (tmp_path / "not-a-dir").write_text("a file")
        return str(tmp_path / "not-a-dir" / "state.db")
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a SQLite database, it was overwritten" * 100)
    return str(path)


@pytest.mark.parametrize("kind", ["unreachable", "corrupt"])
def test_a_store_that_cannot_be_used_never_reinstalls_and_says_so(tmp_path, kind, caplog, monkeypatch):
    """An unreachable or corrupt store: the machine falls through, the log and /healthz say why, a
    callback asks to retry."""
    rules = write_once_rules(tmp_path / "rules.yaml")
    monkeypatch.setenv("BOOTRULES_STATE", broken_state(kind, tmp_path))
    app = create_app(str(rules), poll_interval=0)
    client = app.test_client()
    with caplog.at_level(logging.INFO, logger="bootrules"):
        assert ask(client) == ("local-disk", None)  # falls through, as if done
    assert any("once: rule install-debian skipped for machine=mac:52:54:00:12:34:56: state store unavailable"
               in record.getMessage() for record in caplog.records)
    health = client.get("/healthz").get_json()
    assert health["status"] == "degraded" and health["state"]["status"] == "error" and health["state"]["error"]
    errors = re.search(r"^bootrules_state_errors_total (\S+)$", client.get("/metrics").get_data(as_text=True), re.M)
    assert float(errors.group(1)) >= 1
    callback = client.post("/done/" + "A" * 32)
    assert callback.status_code == 503 and "try again" in callback.get_data(as_text=True)
    services(app).stop()


def test_a_store_locked_past_the_timeout_falls_through_and_the_callback_asks_to_retry(lab, monkeypatch):
    """A writer that does not let go: a new machine's row waits, the store counts as degraded
    while writes fail, and once the lock is gone the installer's retry and the row get through."""
    monkeypatch.setattr(database_module, "LOCK_TIMEOUT", 0.3)
    monkeypatch.setattr(health_module, "HOLD", 0.5)
    app, client, _rules, state = lab
    gate = services(app).once
    _rule, token = ask(client, MAC_A)  # this process's first arm: written before the answer
    holder = sqlite3.connect(state, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer that does not let go
    try:
        assert ask(client, MAC_A) == ("install-debian", token)  # reads still work (WAL)
        # A new machine: the read says it is not done, so it installs; its row waits.
        rule, token_b = ask(client, MAC_B)
        assert rule == "install-debian" and token_b
        assert gate.arms.flush() == -1  # the batch cannot be written: kept, and the store counts as failing
        assert client.get("/healthz").get_json()["status"] == "degraded"
        # From then on a new machine's row must be written before its answer, which fails: it falls through.
        assert ask(client, MAC_C) == ("local-disk", None)
        assert client.post(f"/done/{token}").status_code == 503
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert client.post(f"/done/{token}").status_code == 200  # the installer's retry succeeds
    assert gate.arms.flush() >= 0  # the kept row is written (by this flush, or by the writer's retry)
    assert rows(state) == [(f"mac:{MAC_A}", "install-debian", "true", "done"),
                           (f"mac:{MAC_B}", "install-debian", "true", "armed")]
    # The prober's next write succeeds: the store is healthy again.
    assert wait_until(lambda: client.get("/healthz").get_json()["status"] == "ok", timeout=10)
    assert ask(client, MAC_C)[0] == "install-debian"


def test_a_store_locked_while_a_worker_first_opens_it_works_once_the_lock_is_gone(tmp_path, monkeypatch):
    """A worker opens a store another worker made, while a writer holds it: the store is
    used in full (its token key read), and the machine falls through only because its row
    cannot be written before its answer. (It once answered 500 to every new machine.)"""
    monkeypatch.setattr(database_module, "LOCK_TIMEOUT", 0.3)
    rules = write_once_rules(tmp_path / "rules.yaml")
    once_store(tmp_path / "bootrules-state.db").check()  # made by another worker
    app = create_app(str(rules), poll_interval=0)
    client = app.test_client()
    holder = sqlite3.connect(tmp_path / "bootrules-state.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        assert ask(client, MAC_A) == ("local-disk", None)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    rule, token = ask(client, MAC_A)
    assert rule == "install-debian" and client.post(f"/done/{token}").status_code == 200
    services(app).stop()


def test_a_machine_re_armed_while_its_state_is_read_falls_through_without_an_error(lab, monkeypatch, caplog):
    # The race: another server re-arms (deletes) the machine's row between arm's write, which
    # found a live row, and its read, which then finds none. The store says: not done, no row.
    """A re-arm between a row's write and its read makes the machine fall through for this boot,
    with a log line, not an error."""
    app, client, _rules, _state = lab
    store = services(app).once.store()
    monkeypatch.setattr(store, "arm", lambda row: (False, None, False))
    with caplog.at_level(logging.INFO, logger="bootrules"):
        assert ask(client, MAC_A) == ("local-disk", None)
    assert any("its state changed while it was being read" in record.getMessage() for record in caplog.records)


# --------------------------------------------------------------------------- tokens that prove themselves


def test_a_token_carries_its_machine_and_times_and_is_signed_for_one_rule_and_label():
    """A token carries its machine's names and times, is signed for one rule and label, and its
    logged prefix tells tokens apart."""
    key = tokens.new_key()
    token = tokens.issue(key, [f"uuid:{UUID}", f"mac:{MAC_A}"], "install", "v1", 100.5, 200.25)
    claims = tokens.read(token)
    assert claims.identities == (f"uuid:{UUID}", f"mac:{MAC_A}") and (claims.issued, claims.expires) == (100.5, 200.25)
    assert tokens.signed_for(key, claims, "install", "v1")
    for rule, label in (("install", "v2"), ("other", "v1"), ("installv", "1"), ("install", "v1 ")):
        assert not tokens.signed_for(key, claims, rule, label)
    assert TOKEN.fullmatch(token) and TOKEN.fullmatch(tokens.issue(key, [f"mac:{MAC_A}"], "r", "v1", 1, 2))
    assert tokens.read("A" * 32) is None and tokens.read(token[:-2]) is None and tokens.read("%%") is None
    # Logs show a token's first characters: they must tell tokens issued together apart.
    shown = {tokens.issue(key, [f"mac:{MAC_A}"], "install", "v1", 100.5, 200.25)[:SHOWN_CHARS] for _ in range(50)}
    assert len(shown) == 50


def test_a_token_whose_row_was_lost_still_reports_done(lab):
    """A token whose row was never written still reports done, for every name of its machine."""
    app, client, _rules, state = lab
    ask(client, MAC_A)  # the first arm is written before its answer; the next ones after
    _rule, token = ask(client, MAC_B, UUID)
    lose_unwritten_rows(app)
    assert [row[0] for row in rows(state)] == [f"mac:{MAC_A}"]
    answer = client.post(f"/done/{token}")
    assert answer.status_code == 200 and f"machine uuid:{UUID}, rule 'install-debian'" in answer.get_data(as_text=True)
    assert ask(client, MAC_B, UUID) == ("local-disk", None)
    assert ask(client, MAC_C, UUID) == ("local-disk", None)  # the same machine on its other NIC
    assert client.post(f"/done/{token}").get_data(as_text=True).startswith("already done")
    assert rows(state) == [(f"mac:{MAC_A}", "install-debian", "true", "armed"),
                           (f"mac:{MAC_B}", "install-debian", "true", "done"),
                           (f"uuid:{UUID}", "install-debian", "true", "done")]


def test_a_forged_or_altered_token_disarms_nothing(lab):
    """A token with its tag, MAC or expiry altered, or signed with another key, is 404."""
    app, client, _rules, _state = lab
    ask(client, MAC_A)
    _rule, token = ask(client, MAC_B)
    lose_unwritten_rows(app)
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    mac_at = raw.index(bytes.fromhex(MAC_B.replace(":", "")))
    expires_at = tokens.RANDOM_BYTES + 1 + 8  # after the random bytes, the format byte and the issue time
    for change in (lambda data: data.__setitem__(-1, data[-1] ^ 1),  # the tag
                   lambda data: data.__setitem__(slice(mac_at, mac_at + 6), bytes.fromhex(MAC_A.replace(":", ""))),
                   lambda data: data.__setitem__(slice(expires_at, expires_at + 8), struct.pack(">d", 4e9))):  # later expiry
        altered = bytearray(raw)
        change(altered)
        forged = base64.urlsafe_b64encode(bytes(altered)).decode().rstrip("=")
        assert client.post(f"/done/{forged}").status_code == 404
    assert ask(client, MAC_A)[0] == ask(client, MAC_B)[0] == "install-debian"
    # A token signed with another store's key (another bootrules) counts for nothing here either.
    other = tokens.issue(tokens.new_key(), [f"mac:{MAC_B}"], "install-debian", "true", time.time(), time.time() + 60)
    assert client.post(f"/done/{other}").status_code == 404
    assert client.post(f"/done/{token}").status_code == 200


def test_a_re_arm_voids_the_tokens_issued_before_it(lab, runner):
    """Tokens issued before a re-arm, or before a later token, are refused."""
    app, client, rules, _state = lab
    _rule, first = ask(client, MAC_A)
    assert runner.invoke(cli, ["rearm", "--rules", str(rules), "--mac", MAC_A]).exit_code == 0
    unknown = client.post(f"/done/{first}")
    assert unknown.status_code == 404 and "re-armed" in unknown.get_data(as_text=True)
    listed = runner.invoke(cli, ["machines", "--once", "--rules", str(rules)]).output
    assert "rearmed" not in listed and MAC_A not in listed  # a re-armed machine has no state to list
    _rule, second = ask(client, MAC_A)
    assert second != first
    services(app).once.arms.flush()
    assert client.post(f"/done/{first}").status_code == 404  # a later token supersedes it
    assert client.post(f"/done/{second}").status_code == 200
    assert ask(client, MAC_A)[0] == "local-disk"


def test_machines_and_rearm_do_not_create_a_state_file(runner, tmp_path):
    """Commands that only look or re-arm never make a state file."""
    rules = write_once_rules(tmp_path / "rules.yaml")
    result = runner.invoke(cli, ["machines", "--rules", str(rules)])
    assert result.exit_code == 0 and "no state yet" in result.output
    assert runner.invoke(cli, ["rearm", "--rules", str(rules), "--mac", MAC_A]).exit_code == 0
    assert not (tmp_path / "bootrules-state.db").exists()


def test_check_stays_linear_with_many_once_rules(monkeypatch):
    """5,000 one-per-MAC once: rules above a catch-all: the fall-through check compares nothing."""
    from bootrules.decide import lint as lint_module

    text = "rules:\n" + "".join(
        f'  - name: m{n}\n    match: {{mac: "02:00:00:00:{n >> 8:02x}:{n & 255:02x}"}}\n    once: v1\n    exit: true\n'
        for n in range(5000)) + "  - name: rest\n    exit: true\n"
    compared = []
    implied = lint_module._implied
    monkeypatch.setattr(lint_module, "_implied", lambda selector, rule: compared.append(1) or implied(selector, rule))
    assert lint_module.lint(parse_rules(text)) == []
    assert len(compared) < 5000


# --------------------------------------------------------------------------- callbacks that cost nothing


def test_a_made_up_token_is_refused_without_touching_the_store(lab, monkeypatch):
    """A well-formed token signed with another key, or no token at all: 404, and not one
    statement reaches the store (its tag is checked first, against the rules in force)."""
    app, client, _rules, _state = lab
    ask(client, MAC_A)  # the store is open and the key read
    store = services(app).once.store()
    touched = []
    monkeypatch.setattr(store.database, "run", lambda *args, **kwargs: touched.append(args))
    forged = tokens.issue(tokens.new_key(), [f"mac:{MAC_B}"], "install-debian", "true", time.time(), time.time() + 60)
    for token in (forged, forged[:-4] + "AAAA", "B" * 64, "Q" * 90):
        assert client.post(f"/done/{token}").status_code == 404
    assert touched == []


def test_a_token_has_one_spelling(lab):
    """The unused bits of the last base64 character: the three other spellings of a token
    that decode to the same bytes are refused, and the real one still works."""
    _app, client, _rules, _state = lab
    _rule, token = ask(client, MAC_A)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(token[-1])
    unused = {1: 0b1111, 2: 0b11}[len(tokens.read(token).signed + tokens.read(token).tag) % 3]
    variants = {token[:-1] + alphabet[(last & ~unused) | bits] for bits in range(unused + 1)} - {token}
    assert variants
    for variant in variants:
        assert base64.urlsafe_b64decode(variant + "=" * (-len(variant) % 4)) == \
            base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        assert client.post(f"/done/{variant}").status_code == 404
    assert client.post(f"/done/{token}").status_code == 200


def test_a_flood_of_made_up_machines_stops_adding_rows_but_not_installs(lab):
    """Past the most armed rows kept, new machines still get tokens that work; no row is
    written for them."""
    app, client, _rules, state = lab
    gate = services(app).once
    gate.arms.max_armed = 2
    ask(client, MAC_A)
    gate.arms.flush()
    gate.arms.upkeep()  # counts the armed rows: 1
    ask(client, MAC_B)
    gate.arms.flush()
    gate.arms.upkeep()  # 2: full
    _rule, token = ask(client, MAC_C)
    gate.arms.flush()
    assert [row[0] for row in rows(state)] == [f"mac:{MAC_A}", f"mac:{MAC_B}"]
    assert client.post(f"/done/{token}").status_code == 200
    assert ask(client, MAC_C)[0] == "local-disk"
