"""`python app.py serve` as an operator runs it: one process or workers, signals, reloads under load."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from support import ROOT, SAMPLE_RULES, BootrulesServer, free_port, http_get, require_server, wait_until


def test_serve_answers_curl_style_requests_on_a_real_port(rules_path, tmp_path, http_server):
    """The entry script, a decision and /healthz over real HTTP, from either server."""
    with BootrulesServer(rules_path, free_port(), tmp_path / "server.log", args=http_server) as server:
        status, headers, body = http_get(server.url + "/boot.ipxe")
        assert status == 200 and body.startswith("#!ipxe\n")
        assert f"chain --replace --autofree {server.url}/ipxe?mac=${{netX/mac:hexhyp}}&" in body

        status, headers, body = http_get(server.url + "/ipxe?mac=00-12-34-56-78-90")
        assert status == 200
        assert headers["X-Bootrules-Rule"] == "lab-rescue"
        assert "chain --replace --autofree http://pxe.example.com/pxelinux.0 || goto bootrules_failed\n" in body

        status, _headers, body = http_get(server.url + "/ipxe?mac=bogus")
        assert status == 400 and body.startswith("mac: 'bogus' is not a MAC address")

        status, _headers, body = http_get(server.url + "/healthz")
        assert status == 200 and '"rules":3' in body.replace(" ", "")

    log = server.log()
    assert "client=127.0.0.1 mac=00:12:34:56:78:90 rule=lab-rescue action=chain" in log
    assert "Traceback" not in log


# Where Linux's struct tcp_info (netinet/tcp.h, since 4.6) keeps tcpi_data_segs_in: the
# segments this end has received that carried data.
TCP_INFO_DATA_SEGMENTS_IN = 152


@pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="counts segments with Linux's TCP_INFO")
def test_each_answer_reaches_the_machine_in_one_tcp_segment(rules_path, tmp_path, http_server):
    """Headers and script leave together, as one TCP segment a machine's small TCP stack takes
    in one go, not headers first and the script in a second segment."""
    with BootrulesServer(rules_path, free_port(), tmp_path / "server.log", args=http_server) as server, \
            socket.create_connection(("127.0.0.1", server.port), timeout=5) as connection:
        paths = ["/boot.ipxe", "/ipxe?mac=00-12-34-56-78-90"] * 5
        for path in paths:  # one at a time, on one kept-alive connection
            connection.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            assert _read_answer(connection).startswith(b"#!ipxe\n")
        info = connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        assert struct.unpack_from("I", info, TCP_INFO_DATA_SEGMENTS_IN)[0] == len(paths)


def _read_answer(connection: socket.socket) -> bytes:
    """The body of the next answer on `connection` (which must give a Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))
    while len(body) < length:
        body += connection.recv(65536)
    return body


def test_an_edit_takes_effect_without_a_restart_and_sighup_reloads_at_once(rules_path, tmp_path, http_server):
    """Saving rules.yaml changes answers within two seconds; SIGHUP reloads immediately."""
    with BootrulesServer(rules_path, free_port(), tmp_path / "server.log", args=http_server) as server:
        def answers(name: str) -> bool:
            return http_get(server.url + "/ipxe?mac=00:12:34:56:78:90")[1]["X-Bootrules-Rule"] == name

        rules_path.write_text(SAMPLE_RULES.replace("lab-rescue", "lab-rescue-v2"))
        assert wait_until(lambda: answers("lab-rescue-v2"), timeout=3)

        rules_path.write_text(SAMPLE_RULES.replace("lab-rescue", "lab-rescue-v3"))
        server.signal(signal.SIGHUP)
        assert wait_until(lambda: answers("lab-rescue-v3"), timeout=2)
    assert "reloading" in server.log() and "on request" in server.log()


def test_serve_refuses_to_start_on_a_broken_file_with_every_error_listed(write_rules):
    """A broken rules file stops `serve` with exit 1 and file:line errors, no traceback."""
    path = write_rules("rules:\n  - name: a\n    match: {mac: nope}\n    exit: true\n  - name: b\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "serve", "--rules", str(path), "--port", str(free_port())],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert f"{path}:3: rule 'a': match mac: 'nope' is not a MAC address" in result.stderr
    assert f"{path}:5: rule 'b': no action" in result.stderr
    assert "Traceback" not in result.stderr


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(child) for child in out.split()]


def _workers(pid: int) -> list[int]:
    """The workers under the parent `pid`: its leaders' children (one leader per generation)."""
    return [worker for leader in _children(pid) for worker in _children(leader)]


def test_workers_share_the_port_follow_edits_and_stop_cleanly(rules_path, tmp_path, http_server):
    """With --workers 2: both workers answer; an edit is loaded once, by the parent, which
    replaces both workers; a killed worker is started again; SIGTERM stops every process."""
    import os

    with BootrulesServer(rules_path, free_port(), tmp_path / "server.log", args=(*http_server, "--workers", "2")) as server:
        first = _workers(server.process.pid)
        assert len(first) == 2, server.log()

        rules_path.write_text(SAMPLE_RULES.replace("lab-rescue", "lab-rescue-v2"))
        assert wait_until(lambda: "new rules: started workers" in server.log(), timeout=5), server.log()
        assert server.log().count("loaded 3 rules") == 2  # at start, then the edit: once each
        assert wait_until(lambda: set(_workers(server.process.pid)).isdisjoint(first), timeout=10)
        answers = {http_get(server.url + "/ipxe?mac=00:12:34:56:78:90")[1]["X-Bootrules-Rule"] for _ in range(40)}
        assert answers == {"lab-rescue-v2"}

        workers = _workers(server.process.pid)
        os.kill(workers[0], signal.SIGKILL)
        assert wait_until(lambda: len(_workers(server.process.pid)) == 2
                          and workers[0] not in _workers(server.process.pid), timeout=10)
        assert "exited with -9; starting it again" in server.log()
        assert http_get(server.url + "/healthz")[0] == 200

        remaining = _workers(server.process.pid)
    assert server.process.returncode == 0
    for pid in remaining:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()
    assert "all workers stopped" in server.log()
    assert "Traceback" not in server.log()


def test_sighup_to_the_parent_reloads_and_replaces_the_workers(rules_path, tmp_path, http_server):
    """SIGHUP to the supervising process reloads at once and hands the rules to new workers."""
    with BootrulesServer(rules_path, free_port(), tmp_path / "server.log", args=(*http_server, "--workers", "2")) as server:
        before = set(_workers(server.process.pid))
        server.signal(signal.SIGHUP)
        assert wait_until(lambda: "new rules: started workers" in server.log(), timeout=5), server.log()
        assert server.log().count("on request") == 1
        assert wait_until(lambda: set(_workers(server.process.pid)).isdisjoint(before), timeout=10)


def test_a_killed_leader_leaves_its_workers_serving_until_a_new_leader_replaces_them(rules_path, tmp_path):
    """Each version of the rules has a leader process that loaded it and forked the workers.
    kill -9 of the leader: its workers go on answering, a new leader loads the rules and
    retires them, and SIGTERM then stops everything."""
    with BootrulesServer(rules_path, free_port(), tmp_path / "server.log", args=("--workers", "2")) as server:
        leaders = _children(server.process.pid)
        assert len(leaders) == 1 and len(_children(leaders[0])) == 2, server.log()
        orphans = _children(leaders[0])
        os.kill(leaders[0], signal.SIGKILL)
        assert wait_until(lambda: "its workers go on serving" in server.log(), timeout=5), server.log()
        assert http_get(server.url + "/ipxe?mac=00:12:34:56:78:90")[1]["X-Bootrules-Rule"] == "lab-rescue"
        assert wait_until(lambda: len(_workers(server.process.pid)) == 2
                          and set(_workers(server.process.pid)).isdisjoint(orphans), timeout=15), server.log()
        assert wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in orphans), timeout=15)
        assert server.log().count("loaded 3 rules") == 2, server.log()
        assert http_get(server.url + "/healthz")[0] == 200
    assert server.process.returncode == 0
    assert "Traceback" not in server.log()


def test_a_broken_edit_shows_on_every_workers_healthz(rules_path, tmp_path, http_server):
    """With several workers a leader process loads: a broken edit still shows on /healthz, and the
    workers keep serving the last good rules."""
    with BootrulesServer(rules_path, free_port(), tmp_path / "server.log", args=(*http_server, "--workers", "2")) as server:
        rules_path.write_text("rules:\n  - name: broken\n")
        assert wait_until(lambda: '"reload_error":null' not in http_get(server.url + "/healthz")[2].replace(" ", ""),
                          timeout=5)
        for _ in range(10):  # new connections: both workers
            status, _headers, body = http_get(server.url + "/healthz")
            assert status == 200 and "rule 'broken': no action" in body
        assert http_get(server.url + "/ipxe?mac=00:12:34:56:78:90")[1]["X-Bootrules-Rule"] == "lab-rescue"


# --------------------------------------------------------------------------- reloads and stops under load

VERSION_RULES = """rules:
  - name: version-{n}
    chain: http://boot.example.com/v{n}.ipxe
"""
BROKEN_VERSION = "rules:\n  - name: broken\n    chain: [not, a, url]\n"


class LoadClients:
    """Clients a reverse proxy, a probe and iPXE would be: some reuse one keep-alive connection
    request after request (http.client), others open a new connection per request."""

    def __init__(self, port: int, keep_alive: int = 4, new_connection: int = 2) -> None:
        self.port = port
        self.stop = threading.Event()
        self.answers: list[tuple[int, str, str]] = []
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._keep_alive) for _ in range(keep_alive)]
        self.threads += [threading.Thread(target=self._new_connections) for _ in range(new_connection)]

    def __enter__(self) -> "LoadClients":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def _ask(self, connection) -> None:
        try:
            connection.request("GET", "/ipxe?mac=52-54-00-12-34-56")
            response = connection.getresponse()
            self.answers.append((response.status, response.getheader("X-Bootrules-Rule", ""),
                                 response.read().decode()))
        except (OSError, http.client.HTTPException) as error:
            self.failures.append(repr(error))
            connection.close()

    def _keep_alive(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self.stop.is_set():
            self._ask(connection)  # reconnects by itself after a `Connection: close`
        connection.close()

    def _new_connections(self) -> None:
        while not self.stop.is_set():
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            self._ask(connection)
            connection.close()

    def assert_each_answer_is_one_good_version(self) -> set[int]:
        seen = set()
        for status, rule, body in self.answers:
            assert status == 200, (status, body)
            version = re.fullmatch(r"version-(\d+)", rule).group(1)
            assert f"# bootrules: rule '{rule}' (line 2)\n" in body
            assert f"chain --replace --autofree http://boot.example.com/v{version}.ipxe " in body
            seen.add(int(version))
        return seen


def test_reloads_fail_no_request_on_keep_alive_or_new_connections(tmp_path, http_server):
    """rules.yaml is replaced 24 times (every fourth edit broken) under keep-alive and
    new-connection clients: not one request fails, and every answer is one good version."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(VERSION_RULES.format(n=0))
    args = (*http_server, "--workers", "2", "--poll-interval", "0.1")
    with BootrulesServer(rules, free_port(), tmp_path / "server.log", args=args) as server:
        with LoadClients(server.port) as clients:
            for swap in range(1, 25):
                temp = tmp_path / "rules.yaml.new"
                temp.write_text(BROKEN_VERSION if swap % 4 == 0 else VERSION_RULES.format(n=swap))
                os.replace(temp, rules)
                time.sleep(0.35)
        log = server.log()
    print(f"{len(clients.answers)} requests, {log.count('new rules: started workers')} reloads, "
          f"{len(clients.failures)} failed")
    assert clients.failures == []
    assert log.count("new rules: started workers") >= 15, log
    assert len(clients.answers) > 500
    assert len(clients.assert_each_answer_is_one_good_version()) >= 15
    assert "Traceback" not in log


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_answers_requests_in_flight_and_pipelined_before_exiting(rules_path, tmp_path, workers, http_server):
    """SIGTERM while a connection has three pipelined requests answered and a fourth half
    sent: the fourth is answered too, marked `Connection: close`, and then the server exits.
    (waitress waits for the rest up to 2 s; granian for its closing half second.)"""
    with BootrulesServer(rules_path, free_port(), tmp_path / "server.log", args=(*http_server, "--workers", workers)) as server:
        client = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        request = b"GET /ipxe?mac=00-12-34-56-78-90 HTTP/1.1\r\nHost: x\r\n\r\n"
        client.sendall(request * 3 + request[:20])
        received = b""
        while received.count(b"HTTP/1.1 200 OK") < 3 or not received.endswith(b"exit 1\n"):
            received += client.recv(65536)
        server.signal(signal.SIGTERM)
        time.sleep(0.5 if "waitress" in http_server else 0.2)  # stopping now, the fourth request half read
        client.sendall(request[20:])
        while not received.endswith(b"exit 1\n") or received.count(b"HTTP/1.1 200 OK") < 4:
            chunk = client.recv(65536)
            assert chunk, f"closed before the fourth answer: {received[-300:]!r}\n{server.log()}"
            received += chunk
        assert client.recv(65536) == b""  # then the server closes the connection
        client.close()
        assert server.process.wait(timeout=15) == 0
    answers = received.split(b"HTTP/1.1 200 OK")[1:]
    assert [b"connection: close" in answer.lower() for answer in answers] == [False, False, False, True]
    assert "Traceback" not in server.log()


def _processes_with(marker: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def burst_then_edit_then_stop(server: BootrulesServer, rules: Path, sighups: int) -> None:
    """`sighups` SIGHUPs 0.2 ms apart; then an edit and one more SIGHUP must still load, and
    SIGTERM must still stop the server."""
    for _ in range(sighups):
        os.kill(server.process.pid, signal.SIGHUP)
        time.sleep(0.0002)
    assert http_get(server.url + "/ipxe?mac=00:12:34:56:78:90", timeout=5)[1]["X-Bootrules-Rule"] == "lab-rescue"
    rules.write_text(SAMPLE_RULES.replace("lab-rescue", "after-burst"))
    server.signal(signal.SIGHUP)
    assert wait_until(lambda: http_get(server.url + "/ipxe?mac=00:12:34:56:78:90")[1]["X-Bootrules-Rule"]
                      == "after-burst", timeout=10), server.log()
    server.signal(signal.SIGTERM)
    assert server.process.wait(timeout=20) == 0


def test_a_burst_of_sighups_leaves_one_process_serving_and_reloading(rules_path, tmp_path):
    """1000 SIGHUPs 0.2 ms apart (systemctl reload in a loop) to one process."""
    with BootrulesServer(rules_path, free_port(), tmp_path / "server.log", args=("--workers", "1")) as server:
        burst_then_edit_then_stop(server, rules_path, 1000)
    assert "Traceback" not in server.log()


def test_a_burst_of_sighups_to_the_supervisor_then_sigterm_stops_everything(tmp_path):
    """3000 SIGHUPs to the parent of two workers: it goes on replacing workers on edits, and
    SIGTERM afterwards stops the parent and every worker (none orphaned, none a zombie)."""
    rules = tmp_path / "burst-rules.yaml"
    rules.write_text(SAMPLE_RULES)
    with BootrulesServer(rules, free_port(), tmp_path / "server.log", args=("--workers", "2")) as server:
        burst_then_edit_then_stop(server, rules, 3000)
    assert wait_until(lambda: not _processes_with(str(rules)), timeout=5), _processes_with(str(rules))
    assert "Traceback" not in server.log()


def test_sigterm_right_after_a_reload_stops_the_new_workers_too(tmp_path):
    """SIGTERM 4 to 46 ms after SIGHUP, 12 times: each time the parent exits and leaves no
    worker behind (the new generation included)."""
    rules = tmp_path / "term-rules.yaml"
    rules.write_text(SAMPLE_RULES)
    for attempt in range(12):
        with BootrulesServer(rules, free_port(), tmp_path / f"server{attempt}.log", args=("--workers", "2")) as server:
            server.signal(signal.SIGHUP)
            time.sleep(0.004 + attempt * 0.0038)
            server.signal(signal.SIGTERM)
            assert server.process.wait(timeout=20) == 0, server.log()
        assert wait_until(lambda: not _processes_with(str(rules)), timeout=5), (attempt, server.log())


def test_dead_workers_metrics_are_folded_so_files_do_not_pile_up(tmp_path):
    """After 12 reloads (12 generations of 2 workers) the metrics directory holds the live
    workers' files and one archive per kind, and /metrics still counts every decision."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(VERSION_RULES.format(n=0))
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    try:
        server = BootrulesServer(rules, free_port(), tmp_path / "server.log", args=("--workers", "2")).start()
    finally:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR")
    asked = 0
    try:
        for reload in range(1, 13):
            for _ in range(5):
                assert http_get(server.url + "/ipxe?mac=52:54:00:00:00:01")[0] == 200
                asked += 1
            rules.write_text(VERSION_RULES.format(n=reload))
            server.signal(signal.SIGHUP)
            assert wait_until(lambda: server.log().count("new rules: started workers") == reload, timeout=10)
        assert wait_until(lambda: len(_workers(server.process.pid)) == 2, timeout=40)
        time.sleep(0.5)
        files = sorted(path.name for path in metrics_dir.iterdir() if path.suffix in (".db", ".decisions"))
        metrics = http_get(server.url + "/metrics")[2]
    finally:
        server.stop()
    live = set(_children_pids_in(files))
    assert len(live) <= 2 + 2, files  # the two live workers, their leader, and the parent
    assert len(files) <= 4 * 3 + 3, files
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("bootrules_decisions_total{"))
    assert counted == asked
    assert f"bootrules_reloads_total {12.0}" in metrics


def _children_pids_in(files: list[str]) -> list[str]:
    return sorted({re.search(r"(\d+)", name).group(1) for name in files if re.search(r"\d+", name)})


# --------------------------------------------------------------------------- the server


def test_granian_not_installed_is_one_line_naming_the_install_and_waitress_stays_the_default(rules_path, tmp_path):
    """`--server granian` where granian cannot be imported: exit 1, one line that says how to
    install it, no traceback. Without the flag nothing asks for granian."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "granian.py").write_text("raise ImportError('No module named granian')\n")
    env = {**os.environ, "PYTHONPATH": str(shim)}
    command = [sys.executable, str(ROOT / "app.py"), "serve", "--rules", str(rules_path), "--port", str(free_port())]
    result = subprocess.run([*command, "--server", "granian"], capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "Error: --server granian needs granian, which is not installed: pip install -r requirements-granian.txt "
        "(or: pip install '.[granian]')"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30,
                            env={**env, "BOOTRULES_SERVER": "nginx"})
    assert result.returncode == 1 and "BOOTRULES_SERVER: 'nginx' is not one of: waitress, granian" in result.stderr
    with BootrulesServer(rules_path, free_port(), tmp_path / "server.log") as server:  # the shim is not on its path
        assert http_get(server.url + "/healthz")[1]["Server"] == "bootrules"  # waitress's `ident`; granian's is its own
    assert re.search(r"with \d+ waitress worker\(s\)", server.log()), server.log()


def test_granian_requests_never_carry_the_process_environment(monkeypatch):
    """granian's own WSGI wrapper copies the whole process environment into every request's
    environ; bootrules' callback starts from WSGI's keys only (a password in BOOTRULES_STATE
    stays out of every request). The protocol object is granian's, so a stand-in records
    what the callback hands it."""
    require_server("granian")
    from bootrules.serve.granian_worker import WsgiCallback, _internals

    monkeypatch.setenv("BOOTRULES_STATE", "postgresql://bootrules:hunter2@db/bootrules")
    seen = {}

    def app(environ, start_response):
        seen.update(environ)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"no ", b"such page\n"] if environ["PATH_INFO"] == "/list" else iter([b"streamed\n"])

    class Proto:
        def response_bytes(self, status, headers, body):
            self.answer = ("bytes", status, headers, body)

        def response_iter(self, status, headers, body):
            chunks = []
            while True:  # as granian does: the wrapper has __next__, and close
                try:
                    chunks.append(body.__next__())
                except StopIteration:
                    break
            self.answer = ("iter", status, headers, b"".join(chunks))

    call = WsgiCallback(app, _internals()["IterWrap"])
    scope = {"REQUEST_METHOD": "GET", "PATH_INFO": "/list", "QUERY_STRING": "", "REMOTE_ADDR": "127.0.0.1"}
    proto = Proto()
    assert call(proto, scope) == 404
    assert proto.answer == ("bytes", 404, [("Content-Type", "text/plain")], b"no such page\n")
    assert "BOOTRULES_STATE" not in seen and not any("hunter2" in str(value) for value in seen.values())
    assert seen["wsgi.version"] == (1, 0) and seen["REMOTE_ADDR"] == "127.0.0.1"
    proto = Proto()
    call(proto, {**scope, "PATH_INFO": "/stream"})
    assert proto.answer == ("iter", 404, [("Content-Type", "text/plain")], b"streamed\n")
    call.retiring = True  # a retiring worker: every answer closes its connection
    proto = Proto()
    call(proto, scope)
    assert proto.answer[2] == [("Content-Type", "text/plain"), ("Connection", "close")]
