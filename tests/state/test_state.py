"""The state stores (bootrules/state/database.py, once_store.py, machine_store.py): the same tests on
SQLite and on a real PostgreSQL the test starts itself (loopback only); SQLite crash safety;
two bootrules servers sharing a PostgreSQL; deadlines when a database freezes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import pytest

from app import create_app
from bootrules.errors import StateError
from bootrules.services import services
from bootrules.state import MachineStore, OnceStore
from bootrules.state.database import StoreReplaced, StoreStalled, open_database
from bootrules.state.machine_store import Filter, Sighting
from bootrules.state.once_store import FORGET_AFTER, OnceRow
from support import (DONE_LINE, MAC_A, MAC_B, MAC_C, ROOT, BootrulesServer, ask, free_port, http_get,
                     lose_unwritten_rows, new_database, wait_until, write_once_rules)


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path) -> str:
    """Where a store lives: a SQLite file of the test's own, or a database of its own in the
    session's PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "state.db")
    return new_database(request.getfixturevalue("postgres"))


@pytest.fixture
def database(location):
    """Open a Database at the test's location (closed when the test ends)."""
    opened = []

    def open_one(**options):
        opened.append(open_database(location, **options))
        return opened[-1]

    yield open_one
    for each in opened:
        each.close()


def armed(machine: str, token: str, issued: float, expires: float, rule: str = "install", label: str = "v1",
          names: tuple[str, ...] | None = None) -> OnceRow:
    return OnceRow(machine, rule, label, "armed", token, issued, expires, None, None, names or (machine,))


# --------------------------------------------------------------------------- the same tests, both engines


def test_a_machine_is_armed_once_and_a_live_token_is_never_replaced(database):
    """The first token issued stays the machine's until it is used or expires, whoever arms it."""
    store = OnceStore(database())
    now = time.time()
    assert store.arm(armed("mac:a", "T" * 64, now, now + 60)) == (False, armed("mac:a", "T" * 64, now, now + 60), True)
    done, row, mine = store.arm(armed("mac:a", "U" * 64, now + 1, now + 61))  # another server, a moment later
    assert (done, row.token, mine) == (False, "T" * 64, False)
    assert store.lookup(("mac:a",), "install", "v1", now + 2) == (False, row)
    assert store.lookup(("mac:a",), "install", "v1", now + 61) == (False, None)  # expired: no live token
    assert store.arm(armed("mac:a", "V" * 64, now + 61, now + 120))[2]  # an expired token is replaced


def test_done_counts_under_every_name_and_a_callback_may_be_repeated(database):
    """Done is written under every name of the machine; the same callback again is `already`."""
    store = OnceStore(database())
    now = time.time()
    claim = armed("uuid:1", "T" * 64, now, now + 60, names=("uuid:1", "mac:a"))
    assert store.redeem(claim, "T" * 64, "10.0.0.1", now)[0] == "done"
    assert store.redeem(claim, "T" * 64, "10.0.0.1", now)[0] == "already"
    assert store.lookup(("mac:a",), "install", "v1", now)[0]  # the other NIC, without a UUID
    assert {row.machine for row in store.rows()} == {"uuid:1", "mac:a"}


def test_an_expired_or_superseded_token_changes_nothing(database):
    """A token superseded by a later one is unknown, an expired one expired; neither writes."""
    store = OnceStore(database())
    now = time.time()
    first = armed("mac:a", "T" * 64, now, now + 60)
    store.write_arms([armed("mac:a", "U" * 64, now + 5, now + 65)])  # a later token is in force
    assert store.redeem(first, "T" * 64, "10.0.0.1", now + 10)[0] == "unknown"
    late = armed("mac:b", "V" * 64, now, now + 60)
    assert store.redeem(late, "V" * 64, "10.0.0.1", now + 61)[0] == "expired"
    assert [(row.machine, row.state) for row in store.rows()] == [("mac:a", "armed")]


def test_a_re_arm_voids_tokens_issued_before_it_and_is_not_listed(database):
    """A re-arm leaves a tombstone: not listed, and the tokens issued before it are unknown."""
    store = OnceStore(database())
    now = time.time()
    token = armed("mac:a", "T" * 64, now - 5, now + 60)
    store.redeem(token, "T" * 64, "10.0.0.1", now - 4)
    assert store.rearm(["mac:a"]) == 1
    assert store.rows() == [] and store.lookup(("mac:a",), "install", "v1", now) == (False, None)
    assert store.redeem(token, "T" * 64, "10.0.0.1", now)[0] == "unknown"


def test_an_unsigned_token_of_an_older_bootrules_is_found_by_its_row(database):
    """A 32-character token of an older release is found by its row, once."""
    store = OnceStore(database())
    now = time.time()
    store.write_arms([armed("mac:a", "A" * 32, now, now + 60)])
    assert store.redeem_unsigned("B" * 32, "10.0.0.1", now) == ("unknown", None)
    assert store.redeem_unsigned("A" * 32, "10.0.0.1", now)[0] == "done"
    assert store.redeem_unsigned("A" * 32, "10.0.0.1", now)[0] == "already"


def test_upkeep_forgets_what_can_no_longer_matter_and_keeps_what_can(database):
    """Expired armed rows go at once; rows of a label no longer in force a month after their
    last change; done rows of a label in force, never."""
    store = OnceStore(database())
    now = time.time()
    old = now - FORGET_AFTER - 60
    store.write_arms([armed("mac:expired", "T" * 64, now - 100, now - 1), armed("mac:live", "U" * 64, now, now + 60),
                      armed("mac:old-label", "V" * 64, old, old + 60, label="v0")])
    store.redeem(armed("mac:done", "W" * 64, old, now + 60), "W" * 64, "10.0.0.1", old + 1)
    store.redeem(armed("mac:done-old", "X" * 64, old, now + 60, label="v0"), "X" * 64, "10.0.0.1", old + 1)
    store.redeem(armed("mac:done-recent", "Y" * 64, now - 60, now + 60, label="v0"), "Y" * 64, "10.0.0.1", now - 30)
    assert store.prune(now, {("install", "v1")}) == 3
    assert {row.machine for row in store.rows()} == {"mac:live", "mac:done", "mac:done-recent"}
    assert store.count_armed() == 1


def test_machines_seen_are_written_in_batches_listed_and_capped(database):
    """Machines are written in a batch, paged newest first, filtered, counted per minute, and pruned
    to the cap oldest first."""
    store = MachineStore(database())
    now = time.time()
    batch = {f"mac:{n:02x}": Sighting({"mac": f"52:54:00:00:00:{n:02x}", "serial": f"sn{n}"}, "10.0.0.9",
                                      now + n, "rule", "exit", n % 2 == 0) for n in range(30)}
    store.write(batch, {(int(now // 60), "exit"): 30})
    assert store.totals() == type(store.totals())(30, 15)
    page = store.page(Filter(unknown=True), 1, 10)
    assert (page.total, len(page.machines), page.machines[0].machine) == (15, 10, "mac:1c")
    assert store.one("mac:05").facts["serial"] == "sn5" and store.one("mac:ff") is None
    assert store.per_minute(int(now // 60)) == {(int(now // 60), "exit"): 30}
    store.prune(3600, 20, now + 30)
    assert store.count() == 20 and store.one("mac:00") is None  # the least recently seen went first


def test_a_store_made_by_a_newer_bootrules_is_refused_not_rewritten(database):
    """A store with a newer schema version is refused with a message, and left as it is."""
    OnceStore(database()).check()
    database().run(lambda cursor: cursor.execute("UPDATE bootrules_meta SET value = '99' WHERE key = 'schema_version'"),
                   write=True)
    with pytest.raises(StateError, match="schema version 99, made by a newer bootrules"):
        OnceStore(database()).check()


def test_a_store_that_is_not_the_one_expected_is_refused(database):
    """A store knows who it is: a server that has used one refuses another in its place."""
    first = OnceStore(database())
    first.check()
    expected = first.database.store_id
    assert OnceStore(database(expected_id=lambda: expected)).rows() == []
    with pytest.raises(StoreReplaced, match="not the one this server started with"):
        OnceStore(database(expected_id=lambda: "f" * 32)).check()


def test_a_statement_that_outlives_its_deadline_is_aborted(database):
    """A transaction that does not come back within the deadline is aborted from outside, and
    the store is used again at once afterwards."""
    database = database(deadline=0.5)
    runaway = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
               if database.kind == "sqlite" else "SELECT pg_sleep(30)")
    if database.kind == "postgresql":  # the server's own timeout would fire first
        database.deadline = 0.5
        database.run(lambda cursor: cursor.execute("SELECT 1"))
        database._connection.execute("SET statement_timeout = 0")
        database._connection.commit()
    started = time.monotonic()
    with pytest.raises(StoreStalled):
        database.run(lambda cursor: cursor.execute(runaway))
    assert time.monotonic() - started < 1.5
    assert database.run(lambda cursor: (cursor.execute("SELECT 1"), cursor.fetchone())[1]) == (1,)


# --------------------------------------------------------------------------- SQLite


def test_a_crash_in_the_middle_of_writes_loses_nothing_committed(tmp_path):
    """A process writing tokens and callbacks as fast as it can is killed with SIGKILL: every
    callback it had acknowledged is there, and the file passes SQLite's integrity check."""
    state = tmp_path / "state.db"
    writer = textwrap.dedent(f"""
        import sys, time
        from bootrules.state import OnceStore
        from bootrules.state.database import open_database
        from bootrules.state.once_store import OnceRow
        store = OnceStore(open_database({str(state)!r}))
        for n in range(1_000_000):
            names = (f"mac:02:00:00:{{n >> 16 & 255:02x}}:{{n >> 8 & 255:02x}}:{{n & 255:02x}}",)
            token, now = f"{{n:064d}}", time.time()
            row = OnceRow(names[0], "install", "v1", "armed", token, now, now + 3600, None, None, names)
            store.arm(row)
            assert store.redeem(row, token, "10.0.0.1", time.time())[0] == "done"
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
    assert {f"{n:064d}" for n in acknowledged} <= done


def test_a_missing_file_is_not_made_again_once_a_store_was_known(tmp_path):
    """The file of a store this server used is deleted: it is reported gone, never re-created
    empty (a new store would forget every machine installed)."""
    path = tmp_path / "state.db"
    first = OnceStore(open_database(str(path)))
    first.check()
    expected = first.database.store_id
    first.close()
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    with pytest.raises(StoreReplaced, match="is gone"):
        OnceStore(open_database(str(path), expected_id=lambda: expected)).check()
    assert not path.exists()


def wal_header(wal) -> bytes:
    """The WAL header's checkpoint sequence number and salts (sqlite.org/fileformat2.html,
    "WAL File Format"): they change each time a writer starts the WAL again."""
    with open(wal, "rb") as file:
        return file.read(24)[12:24]


def rows_in_the_database_file(path) -> int:
    """The once: rows in the database file itself, without what is still only in its WAL
    (-1 while a checkpoint is copying pages into it: read as immutable, the file is then
    half old, half new)."""
    try:
        with sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True) as db:
            if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'bootrules_once'").fetchone() is None:
                return 0  # even the schema is still only in the WAL
            return db.execute("SELECT count(*) FROM bootrules_once").fetchone()[0]
    except sqlite3.DatabaseError:
        return -1


def test_a_write_after_a_quiet_moment_never_waits_for_the_disk(tmp_path, monkeypatch):
    """Between two writes the checkpoint thread runs several times, and the second write
    still appends to the WAL. Had the thread copied the WAL into the database, the second
    write would start the WAL again, and SQLite syncs a new WAL's header to disk while it
    holds the write lock: on a disk slow to sync, every other writer (a `once:` decision)
    waited behind that. What the first write put in the WAL is synced by the thread."""
    from bootrules.state import database as database_module

    monkeypatch.setattr(database_module, "CHECKPOINT_EVERY", 0.05)
    synced: list[str] = []
    fdatasync = os.fdatasync

    def recorded(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        fdatasync(descriptor)

    monkeypatch.setattr(database_module.os, "fdatasync", recorded)
    path = tmp_path / "state.db"
    wal = tmp_path / "state.db-wal"
    store = OnceStore(open_database(str(path)))
    now = time.time()
    store.arm(armed("mac:52:54:00:00:00:01", "token-1", now, now + 3600))
    assert wait_until(lambda: str(wal) in synced, timeout=5), synced
    header, size = wal_header(wal), wal.stat().st_size
    time.sleep(0.5)  # ten rounds of the checkpoint thread
    store.arm(armed("mac:52:54:00:00:00:02", "token-2", now, now + 3600))
    assert wal_header(wal) == header
    assert wal.stat().st_size > size
    assert [row.machine for row in store.rows()] == ["mac:52:54:00:00:00:01", "mac:52:54:00:00:00:02"]
    store.close()


def test_the_wal_is_copied_into_the_database_once_it_holds_enough(tmp_path, monkeypatch):
    """Past CHECKPOINT_AFTER_BYTES the checkpoint thread copies the WAL into the database
    file, and the next write starts the WAL again, cut to what it then holds."""
    from bootrules.state import database as database_module

    monkeypatch.setattr(database_module, "CHECKPOINT_EVERY", 0.05)
    monkeypatch.setattr(database_module, "CHECKPOINT_AFTER_BYTES", 64 * 1024)
    path = tmp_path / "state.db"
    wal = tmp_path / "state.db-wal"
    store = OnceStore(open_database(str(path)))
    now = time.time()
    store.arm(armed("mac:52:54:00:00:00:00", "token-0", now, now + 3600))
    time.sleep(0.3)
    assert rows_in_the_database_file(path) == 0  # a small WAL stays a WAL
    for number in range(1, 200):
        store.arm(armed(f"mac:52:54:00:00:01:{number:02x}", f"token-{number}", now, now + 3600))
    assert wal.stat().st_size > 64 * 1024
    assert wait_until(lambda: rows_in_the_database_file(path) == 200, timeout=5)
    header = wal_header(wal)
    more = iter(range(256))

    def write_one_more() -> bool:  # the copy may still be ending: the write after it restarts the WAL
        number = next(more)
        store.arm(armed(f"mac:52:54:00:00:02:{number:02x}", f"token-2{number}", now, now + 3600))
        return wal_header(wal) != header

    assert wait_until(write_one_more, timeout=5)
    assert wal.stat().st_size < 64 * 1024
    store.close()


def test_a_process_forked_while_the_store_is_written_can_write_to_it(tmp_path):
    """serve forks its leader and workers while the parent's prober may be writing. A
    worker forked in the middle of that write found the store "locked" for good: SQLite
    keeps what a process holds of a file's locks in its own memory, shared by all the
    process's connections, and a child inherits that memory without the locks. The fork
    waits for the write and closes the parent's connections; the child's are its own."""
    path = tmp_path / "state.db"
    prober = open_database(str(path))
    OnceStore(prober).check()
    writing = threading.Event()
    writer = threading.Thread(target=lambda: prober.run(lambda cursor: (writing.set(), time.sleep(0.5)), write=True))
    writer.start()
    writing.wait(5)
    child = os.fork()
    if child == 0:  # a worker: a store of its own on the same file
        code = 1
        try:
            now = time.time()
            OnceStore(open_database(str(path))).arm(armed("mac:52:54:00:00:00:09", "token-9", now, now + 3600))
            code = 0
        except BaseException as error:
            os.write(2, f"the forked process: {error!r}\n".encode())
        finally:
            os._exit(code)
    writer.join()
    exit_codes: list[int] = []

    def reaped() -> bool:
        pid, status = os.waitpid(child, os.WNOHANG)
        if pid == child:
            exit_codes.append(os.waitstatus_to_exitcode(status))
        return bool(exit_codes)

    if not wait_until(reaped, timeout=20):
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    assert exit_codes == [0], "the forked process could not write to the store"
    store = OnceStore(open_database(str(path)))
    assert [row.machine for row in store.rows()] == ["mac:52:54:00:00:00:09"]
    store.close()
    prober.close()


def test_a_write_that_holds_the_lock_for_long_is_logged(tmp_path, caplog):
    """Every other writer waited for it: the log says which store, and how long."""
    database = open_database(str(tmp_path / "state.db"))
    OnceStore(database).check()
    with caplog.at_level("WARNING", logger="bootrules"):
        database.run(lambda cursor: time.sleep(0.2), write=True)
        assert "held the write lock" not in caplog.text
        database.run(lambda cursor: time.sleep(1.1), write=True)
    assert f"state store {tmp_path / 'state.db'}: a write held the write lock for 1.1 s" in caplog.text
    database.close()


# --------------------------------------------------------------------------- PostgreSQL, two servers


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
    rules = write_once_rules(tmp_path / "rules.yaml")
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
    """Rows written after their answer reach PostgreSQL; a token whose row was lost still works."""
    url = new_database(postgres)
    monkeypatch.setenv("BOOTRULES_STATE", url)
    app = create_app(str(write_once_rules(tmp_path / "rules.yaml")), poll_interval=0)
    client = app.test_client()
    gate = services(app).once
    tokens = {mac: ask(client, mac)[1] for mac in (MAC_A, MAC_B)}  # the first written at once, the second in a batch
    assert gate.arms.flush() >= 0
    store = OnceStore(open_database(url))
    assert {row.machine: row.token for row in store.rows()} == {f"mac:{mac}": token for mac, token in tokens.items()}
    store.close()
    _rule, lost = ask(client, MAC_C)
    lose_unwritten_rows(app)
    assert client.post(f"/done/{lost}").status_code == 200 and ask(client, MAC_C) == ("local-disk", None)
    gate.close()
    services(app).stop()


@pytest.mark.parametrize("which", ["read-only", "unreachable"])
def test_a_postgresql_that_cannot_be_written_never_reinstalls(postgres, tmp_path, which):
    """A read-only or unreachable database: once: rules fall through, callbacks ask to retry,
    /healthz says which part is degraded."""
    rules = write_once_rules(tmp_path / "rules.yaml")
    url = postgres + "/readonly" if which == "read-only" else f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    with BootrulesServer(rules, free_port(), tmp_path / "server.log", args=("--state", url)) as server:
        assert boot(server, MAC_A) == ("local-disk", None)
        status, body = post(f"{server.url}/done/{'A' * 32}")
        assert status == 503 and "try again" in body
        assert wait_until(lambda: '"status":"degraded"' in http_get(server.url + "/healthz")[2].replace(" ", ""),
                          timeout=10)
        health = http_get(server.url + "/healthz")[2].replace(" ", "")
        assert '"status":"degraded"' in health and '"store":"postgresql"' in health
    assert "state store unavailable" in server.log()


# --------------------------------------------------------------------------- a frozen PostgreSQL


FROZEN_RULES = """
rules:
  - name: install
    match: {mac: "52:54:00:12:*"}
    once: v1
    exit: 3
  - name: plain
    match: {mac: "52:54:00:99:*"}
    exit: 2
  - name: local-disk
    exit: true
"""


def timed_get(url: str) -> tuple[float, int, str]:
    started = time.monotonic()
    status, headers, body = http_get(url, timeout=30)
    return time.monotonic() - started, status, headers.get("X-Bootrules-Rule", body)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_frozen_postgresql_never_holds_up_a_boot_and_is_used_again_once_it_thaws(postgres, tmp_path, workers):
    """Every PostgreSQL process stopped with SIGSTOP (the database answers nothing, the network
    refuses nothing): /healthz and decisions of rules without once: answer at once, a once:
    rule falls through within its deadline, /healthz says degraded; after SIGCONT the same
    server installs again, without a restart."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(textwrap.dedent(FROZEN_RULES).lstrip())
    url = new_database(postgres)
    with BootrulesServer(rules, free_port(), tmp_path / "server.log", args=("--state", url, "--workers", workers)) as server:
        assert timed_get(f"{server.url}/ipxe?mac=52:54:00:12:00:01")[1:] == (200, "install")
        frozen = postgres.processes()
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(0.5)
            for _ in range(3):
                elapsed, status, rule = timed_get(f"{server.url}/ipxe?mac=52:54:00:99:00:01")
                assert (status, rule) == (200, "plain") and elapsed < 1.0, elapsed
                elapsed, status, _body = timed_get(f"{server.url}/healthz")
                assert status == 200 and elapsed < 1.0, elapsed
            elapsed, status, rule = timed_get(f"{server.url}/ipxe?mac=52:54:00:12:00:02")
            assert (status, rule) == (200, "local-disk") and elapsed <= 2.5, elapsed  # fails safe
            assert wait_until(lambda: '"status":"degraded"' in http_get(f"{server.url}/healthz")[2].replace(" ", ""),
                              timeout=10)
            for _ in range(5):  # while it stays frozen, a once: machine does not wait again
                elapsed, status, rule = timed_get(f"{server.url}/ipxe?mac=52:54:00:12:00:03")
                assert (status, rule) == (200, "local-disk") and elapsed < 1.0, elapsed
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
        assert wait_until(lambda: http_get(f"{server.url}/ipxe?mac=52:54:00:12:00:04")[1].get("X-Bootrules-Rule")
                          == "install", timeout=20), server.log()
        assert wait_until(lambda: '"status":"ok"' in http_get(f"{server.url}/healthz")[2].replace(" ", ""),
                          timeout=20)
