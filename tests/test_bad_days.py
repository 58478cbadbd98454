"""A bad day in production: full disks, bodies nobody asked for, a supervisor killed with
SIGKILL, a state file deleted under a running server, callbacks that wait for a lock.
Each runs a real bootrules on a real port; a full disk is a small tmpfs the test mounts."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import tempfile
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from support import (DONE_LINE, BootrulesServer, free_port, http_get, require_root, wait_until,
                     write_once_rules)

RULES = """
rules:
  - name: install
    match: {mac: "52:54:00:12:*"}
    once: v1
    exit: 3
  - name: local-disk
    exit: true
"""


def write(path: Path, text: str = RULES) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def token_of(server: BootrulesServer, mac: str) -> str | None:
    status, headers, body = http_get(f"{server.url}/ipxe?mac={mac}")
    assert status == 200
    found = DONE_LINE.search(body)
    return found.group(2) if found else None


def rule_for(server: BootrulesServer, mac: str) -> str:
    return http_get(f"{server.url}/ipxe?mac={mac}")[1]["X-Bootrules-Rule"]


def post(url: str, timeout: float = 10) -> int:
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def health(server: BootrulesServer) -> dict:
    return json.loads(http_get(f"{server.url}/healthz")[2])


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            child = int(stat.parent.name)
            found += [child, *children_of(child)]
    return found


# --------------------------------------------------------------------------- bodies


def raw_exchange(port: int, request: bytes, then: bytes = b"", timeout: float = 5.0) -> bytes:
    """Send a request head (and perhaps some body), and read what comes back within `timeout`."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        if then:
            try:
                sock.sendall(then)
            except OSError:
                pass  # the server has answered and closed: what matters is its answer
        answer = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in answer and time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        return answer


@pytest.mark.parametrize("path", ["/done/" + "A" * 64, "/ipxe", "/healthz"])
def test_a_body_larger_than_a_few_kilobytes_is_refused_before_it_is_read(tmp_path, http_server, path):
    """No endpoint takes a body: a 1 GiB one announced, or one sent in chunks, gets 413 at once,
    and the server does not wait for (or store) the body."""
    rules = write_once_rules(tmp_path / "rules.yaml")
    with BootrulesServer(rules, free_port(), tmp_path / "server.log", args=http_server) as server:
        started = time.monotonic()
        answer = raw_exchange(server.port, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n"
                              .encode(), b"x" * 65536)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert time.monotonic() - started < 3
        chunked = raw_exchange(server.port, f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                               .encode(), b"10000\r\n" + b"x" * 65536 + b"\r\n")
        assert chunked.startswith(b"HTTP/1.1 413"), chunked[:200]
        assert http_get(f"{server.url}/ipxe?mac=52:54:00:00:00:01")[0] == 200  # and it goes on answering


# --------------------------------------------------------------------------- callbacks beside boots


def test_a_callback_waiting_for_the_store_never_holds_up_a_boot(tmp_path, http_server):
    """A callback waits for a write lock another process holds; meanwhile the worker answers
    boots at once (the callback is not answered on the thread that answers machines)."""
    rules = write(tmp_path / "rules.yaml")
    with BootrulesServer(rules, free_port(), tmp_path / "server.log", args=("--workers", "1", *http_server)) as server:
        token = token_of(server, "52:54:00:12:00:01")
        holder = sqlite3.connect(tmp_path / "bootrules-state.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        outcome = []
        callback = threading.Thread(target=lambda: outcome.append(post(f"{server.url}/done/{token}")))
        try:
            callback.start()
            time.sleep(0.3)  # the callback is waiting for the lock now
            for _ in range(5):
                started = time.monotonic()
                assert rule_for(server, "52:54:00:99:00:01") == "local-disk"
                assert time.monotonic() - started < 0.5
        finally:
            holder.execute("ROLLBACK")
            holder.close()
            callback.join(timeout=10)
        assert outcome == [503] or outcome == [200]


# --------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs of the test's own, unmounted when it ends (the recorder leaves 5% of it,
    820 KiB, to once: state)."""
    require_root("mounting a tmpfs")
    disk = Path(tempfile.mkdtemp(prefix="bootrules-disk-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
        disk.rmdir()


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill `disk` until at most `leave` bytes are free; return the filler file."""
    filler = disk / "filler"
    with open(filler, "ab") as stream:
        while True:
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            if free <= leave:
                break
            try:
                stream.write(b"\0" * min(65536, free - leave if free > leave else 4096))
                stream.flush()
            except OSError:
                break
    return filler


def test_on_a_full_disk_health_is_degraded_everywhere_and_recording_gives_way_to_callbacks(small_disk, tmp_path):
    """The disk under the state fills up: callbacks that cannot be stored answer 503 and every
    worker says degraded; with a little room again, the machines seen are dropped and counted
    while the callbacks get through; once there is room, health is ok again."""
    rules = write(tmp_path / "rules.yaml")
    state = small_disk / "state.db"
    with BootrulesServer(rules, free_port(), tmp_path / "server.log",
                         args=("--workers", "2", "--state", str(state))) as server:
        tokens = [token_of(server, f"52:54:00:12:00:{n:02x}") for n in range(30)]
        assert all(tokens)
        filler = fill(small_disk)
        answers = [post(f"{server.url}/done/{token}") for token in tokens]
        assert 503 in answers, answers
        assert [health(server)["status"] for _ in range(10)] == ["degraded"] * 10  # from either worker
        # Some room, but less than the recorder leaves for once: state.
        os.truncate(filler, max(0, filler.stat().st_size - 600 * 1024))
        for n in range(300):  # a flood of made-up machines
            http_get(f"{server.url}/ipxe?mac=02:00:00:00:{n >> 8:02x}:{n & 255:02x}")
        time.sleep(1.5)  # a batch of the recorder: it gives way
        retried = [post(f"{server.url}/done/{token}") for token, answer in zip(tokens, answers) if answer == 503]
        assert set(retried) == {200}, retried
        metrics = http_get(f"{server.url}/metrics")[2]
        dropped = re.search(r"^bootrules_machine_records_dropped_total (\S+)$", metrics, re.M)
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        assert dropped and float(dropped.group(1)) > 0, (free, server.log()[-3000:])
        filler.unlink()
        assert wait_until(lambda: all(health(server)["status"] == "ok" for _ in range(4)), timeout=30), health(server)
        assert rule_for(server, "52:54:00:12:00:00") == "local-disk"


# --------------------------------------------------------------------------- the supervisor killed


def test_workers_stop_when_the_supervisor_is_killed_and_the_next_start_cleans_up(tmp_path, http_server):
    """SIGKILL of `serve`: its leader and workers notice and exit within seconds, the port is
    free again, and the next start removes the runtime directory the dead one left."""
    rules = write(tmp_path / "rules.yaml")
    port = free_port()
    server = BootrulesServer(rules, port, tmp_path / "first.log", args=(*http_server, "--workers", "2")).start()
    parent = server.process.pid
    children = children_of(parent)
    assert len(children) >= 3, children  # a leader and two workers
    left = [path for path in Path(tempfile.gettempdir()).glob("bootrules-*")
            if (path / "owner.pid").exists() and (path / "owner.pid").read_text() == str(parent)]
    assert len(left) == 1
    os.kill(parent, signal.SIGKILL)
    server.process.wait(timeout=5)
    try:
        assert wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in children), timeout=5), \
            [pid for pid in children if Path(f"/proc/{pid}").exists()]
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    with BootrulesServer(rules, port, tmp_path / "second.log", args=(*http_server, "--workers", "2")) as again:
        assert rule_for(again, "52:54:00:99:00:01") == "local-disk"  # the same port
        assert not left[0].exists()
    server._log.close()


# --------------------------------------------------------------------------- the state file deleted


def test_the_state_file_is_made_as_the_rules_load_before_any_machine_asks(tmp_path):
    """Several workers: the leader makes the state file as it loads rules with `once:`, before it
    forks the workers (no machine's request waits for its syncs), and a reload does not make it again."""
    rules = write(tmp_path / "rules.yaml")
    state = tmp_path / "state.db"
    with BootrulesServer(rules, free_port(), tmp_path / "server.log",
                         args=("--workers", "2", "--state", str(state))) as server:
        assert state.exists()  # serving, and no machine has asked
        assert server.log().count(f"made the state store {state} for the once: rules") == 1
        assert wait_until(lambda: health(server).get("state", {}).get("status") == "ok", timeout=10)
        assert token_of(server, "52:54:00:12:00:01")
        reloads = server.reloads()
        server.signal(signal.SIGHUP)
        server.wait_for_reload(reloads)
        assert token_of(server, "52:54:00:12:00:02")
    assert server.log().count("made the state store") == 1


def test_a_deleted_state_file_is_never_silently_replaced_and_nothing_reinstalls(tmp_path):
    """The state file is deleted under a running server: /healthz says degraded, once: rules
    fall through (no machine reinstalls), and after a reload the new workers make no new file."""
    rules = write(tmp_path / "rules.yaml")
    state = tmp_path / "state.db"
    with BootrulesServer(rules, free_port(), tmp_path / "server.log",
                         args=("--workers", "2", "--state", str(state))) as server:
        token = token_of(server, "52:54:00:12:00:01")
        assert post(f"{server.url}/done/{token}") == 200
        assert token_of(server, "52:54:00:12:00:02")  # another machine is installing
        for name in ("state.db", "state.db-wal", "state.db-shm"):
            (tmp_path / name).unlink(missing_ok=True)
        assert wait_until(lambda: health(server)["status"] == "degraded", timeout=10)
        time.sleep(1)  # every worker has read the board again (it reads it at most twice a second)
        for mac in ("52:54:00:12:00:01", "52:54:00:12:00:02", "52:54:00:12:00:03"):
            assert rule_for(server, mac) == "local-disk", json.dumps(health(server))
        server.signal(signal.SIGHUP)  # new workers, which open the store afresh
        time.sleep(3)
        for mac in ("52:54:00:12:00:01", "52:54:00:12:00:03"):
            assert rule_for(server, mac) == "local-disk"
        assert not state.exists()
        assert health(server)["status"] == "degraded"
    assert "not the one this server started with" in server.log()
