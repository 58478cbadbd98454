"""The state store (bootrules/state.py): SQLite crash safety and schema, and PostgreSQL shared
by two bootrules servers, on a real PostgreSQL the test starts itself (loopback only)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import urllib.request

import pytest
from conftest import ROOT, free_port, new_database
from support import BootrulesServer, http_get
from test_once import DONE_LINE, MAC_A, MAC_B, write


def test_a_crash_in_the_middle_of_writes_loses_nothing_committed(tmp_path):
    """A process writing tokens and callbacks as fast as it can is killed with SIGKILL: every
    callback it had acknowledged is there, and the file passes SQLite's integrity check."""
    state = tmp_path / "state.db"
    writer = textwrap.dedent(f"""
        import sys, time
        from bootrules.state.store import OnceRow, SqliteStore
        store = SqliteStore({str(state)!r})
        for n in range(1_000_000):
            names = (f"mac:02:00:00:{{n >> 16 & 255:02x}}:{{n >> 8 & 255:02x}}:{{n & 255:02x}}",)
            token, now = f"{{n:032d}}", time.time()
            store.arm(OnceRow(names[0], "install", "v1", "armed", token, now, now + 3600, None, None, names))
            assert store.redeem(token, "10.0.0.1", time.time())[0] == "done"
            print(n, flush=True)
    """)
    process = subprocess.Popen([sys.executable, "-c", writer], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    acknowledged = []
    for line in process.stdout:
        acknowledged.append(int(line))
        if len(acknowledged) >= 300:
            process.kill()
            break
    process.wait(timeout=10)
    process.stdout.close()
    with sqlite3.connect(state) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        done = {row[0] for row in db.execute("SELECT token FROM bootrules_once WHERE state = 'done'")}
    assert {f"{n:032d}" for n in acknowledged} <= done


def test_a_store_made_by_a_newer_bootrules_is_refused_not_rewritten(tmp_path):
    from bootrules.state.store import SqliteStore, StateError

    path = tmp_path / "state.db"
    SqliteStore(str(path)).check()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE bootrules_meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StateError, match="schema version 99, made by a newer bootrules"):
        SqliteStore(str(path)).check()


# --------------------------------------------------------------------------- PostgreSQL


def boot(server: BootrulesServer, mac: str) -> tuple[str, str | None]:
    status, headers, body = http_get(f"{server.url}/ipxe?mac={mac}")
    assert status == 200
    found = DONE_LINE.search(body)
    return headers["X-Bootrules-Rule"], (found.group(2) if found else None)


def post(url: str) -> tuple[int, str]:
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_two_servers_share_state_through_postgresql(postgres, tmp_path, http_server):
    """Armed through server A, reported done through server B: A's next answer is the disk."""
    rules = write(tmp_path / "rules.yaml")
    url = new_database(postgres)
    with BootrulesServer(rules, free_port(), tmp_path / "a.log", args=(*http_server, "--state", url)) as a, \
            BootrulesServer(rules, free_port(), tmp_path / "b.log", args=(*http_server, "--state", url)) as b:
        rule, token = boot(a, MAC_A)
        assert rule == "install-debian" and token
        assert boot(a, MAC_A) == ("install-debian", token) == boot(b, MAC_A)  # one row, one live token
        assert post(f"{b.url}/done/{token}")[0] == 200
        assert boot(a, MAC_A) == ("local-disk", None)
        assert boot(b, MAC_B)[0] == "install-debian"
        assert "state" in http_get(a.url + "/healthz")[2] and '"store":"postgresql"' in http_get(a.url + "/healthz")[2].replace(" ", "")
    assert postgres.split("@")[0] not in a.log()  # the URL (it may hold a password) is never logged


def test_armed_rows_go_to_postgresql_in_batches_and_a_lost_one_costs_nothing(postgres, tmp_path, monkeypatch):
    from app import create_app
    from bootrules.state.store import open_store
    from test_once import MAC_C, ask, lose_unwritten_rows

    monkeypatch.setenv("BOOTRULES_STATE", new_database(postgres))
    app = create_app(str(write(tmp_path / "rules.yaml")), poll_interval=0)
    client = app.test_client()
    gate = app.extensions["bootrules.once"]
    tokens = {mac: ask(client, mac)[1] for mac in (MAC_A, MAC_B)}  # the first written at once, the second in a batch
    assert gate.arms.flush() >= 0
    store = open_store(gate.location)
    assert {row.machine: row.token for row in store.rows()} == {f"mac:{mac}": token for mac, token in tokens.items()}
    store.close()
    _rule, lost = ask(client, MAC_C)
    lose_unwritten_rows(app)
    assert post_to(client, lost) == 200 and ask(client, MAC_C) == ("local-disk", None)
    gate.close()
    app.extensions["bootrules"].stop()


def post_to(client, token: str) -> int:
    return client.post(f"/done/{token}").status_code


@pytest.mark.parametrize("which", ["read-only", "unreachable"])
def test_a_postgresql_that_cannot_be_written_never_reinstalls(postgres, tmp_path, which):
    rules = write(tmp_path / "rules.yaml")
    url = postgres + "/readonly" if which == "read-only" else f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    with BootrulesServer(rules, free_port(), tmp_path / "server.log", args=("--state", url)) as server:
        assert boot(server, MAC_A) == ("local-disk", None)
        status, body = post(f"{server.url}/done/{'A' * 32}")
        assert status == 503 and "try again" in body
        health = http_get(server.url + "/healthz")[2].replace(" ", "")
        assert '"status":"degraded"' in health and '"store":"postgresql"' in health
    assert "state store unavailable" in server.log()
