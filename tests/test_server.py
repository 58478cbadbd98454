"""bootrules as an operator runs it: `python app.py serve` with real waitress on a real port."""

from __future__ import annotations

import contextlib
import email.utils
import signal
import socket
import subprocess
import sys
import threading
import time

from conftest import SAMPLE_RULES, free_port, wait_until
from support import ROOT, BootrulesServer, http_get


def test_serve_answers_curl_style_requests_on_a_real_port(rules_path, tmp_path):
    """The entry script, a decision and /healthz over real HTTP from waitress."""
    with BootrulesServer(rules_path, free_port(), tmp_path / "server.log") as server:
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


@contextlib.contextmanager
def loop_server(app):
    """bootrules' waitress server on a free port, in this process, and a function that runs
    its loop (as `server.run` does) until a condition holds or 5 s have passed."""
    from bootrules import server
    from bootrules.serving import listening_socket
    from bootrules.web import SLOW_PATHS

    listener = listening_socket("127.0.0.1", 0)
    loop = server.create(app, listener, server.Shutdown(), slow_paths=SLOW_PATHS)
    assert isinstance(loop, server.LoopServer)

    def run_until(condition):
        deadline = time.monotonic() + 5
        while not condition() and time.monotonic() < deadline:
            loop.serve_pass(0.05)
        return condition()

    try:
        yield loop, run_until
    finally:
        loop.close()
        listener.close()


def has_received(sock, received, marker):
    """A condition for run_until: reads what non-blocking `sock` has into `received`,
    and holds once `marker` is among it."""
    def condition():
        try:
            received.extend(sock.recv(65536))
        except BlockingIOError:
            pass
        return marker in received

    return condition


def test_accepted_connections_have_tcp_nodelay(rules_path):
    """Scripts go out as soon as they are written: no connection waits on Nagle's algorithm."""
    from app import create_app

    with loop_server(create_app(rules_path)) as (loop, run_until):
        clients = [socket.create_connection(loop.waitress.socket.getsockname()) for _ in range(3)]
        try:
            def connections():
                return [channel.socket for channel in loop.connections()]

            assert run_until(lambda: len(connections()) == len(clients))
            assert all(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for conn in connections())
        finally:
            for client in clients:
                client.close()


def test_machines_are_answered_while_a_metrics_scrape_is_still_working(rules_path):
    """/metrics can take most of a second at 100k rules: it must not hold up the boots."""
    from app import create_app

    app = create_app(rules_path)
    scrape_may_finish = threading.Event()
    scrape_finished = threading.Event()
    metrics_view = app.view_functions["metrics"]

    def slow_metrics_view():
        scrape_may_finish.wait(6)
        scrape_finished.set()
        return metrics_view()

    app.view_functions["metrics"] = slow_metrics_view
    with loop_server(app) as (loop, run_until):
        address = loop.waitress.socket.getsockname()
        scrape = socket.create_connection(address, timeout=10)
        scrape.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        machine = socket.create_connection(address, timeout=10)
        machine.setblocking(False)
        machine.sendall(b"GET /ipxe?mac=00-12-34-56-78-90 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer, scraped = bytearray(), bytearray()
        try:
            assert run_until(has_received(machine, answer, b"lab-rescue")), bytes(answer)
            assert not scrape_finished.is_set(), "the machine waited for the scrape"
            scrape_may_finish.set()
            scrape.setblocking(False)
            assert run_until(has_received(scrape, scraped, b"bootrules_decisions_total")), bytes(scraped)
        finally:
            scrape_may_finish.set()
            scrape.close()
            machine.close()


def test_pipelined_requests_are_answered_in_order_while_another_client_stalls(rules_path, tmp_path):
    """One worker answers on its I/O loop: pipelined requests come back in order, each with
    its own rule, and a client stuck halfway through its request holds nothing up."""
    macs = ["00-12-34-56-78-90", "00-0c-29-aa-bb-cc", "00-99-99-99-99-99", "00-12-34-56-78-90"]
    expected = ["lab-rescue", "vmware-guests", "everyone-else", "lab-rescue"]
    with BootrulesServer(rules_path, free_port(), tmp_path / "server.log", args=("--workers", "1")) as server:
        stalled = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        stalled.sendall(b"GET /ipxe?mac=00-12-34-56-78-90 HTTP/1.1\r\nHost: x\r\n")  # never finished
        client = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        client.sendall(b"".join(f"GET /ipxe?mac={mac} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for mac in macs))
        received = b""
        while received.count(b"HTTP/1.1 200 OK") < len(macs) or not received.endswith(b"exit 1\n"):
            chunk = client.recv(65536)
            assert chunk, f"connection closed after {received!r}"
            received += chunk
        client.close()
        stalled.close()
    answered = [line.split(": ", 1)[1] for line in received.decode().split("\r\n") if line.startswith("X-Bootrules-Rule:")]
    assert answered == expected
    # bootrules dates its answers itself; waitress must not add a second Date header
    assert received.count(b"\r\nDate: ") == len(macs)
    date = email.utils.parsedate_to_datetime(received.split(b"\r\nDate: ")[1].split(b"\r\n")[0].decode())
    assert abs(date.timestamp() - time.time()) < 60


def test_an_edit_takes_effect_without_a_restart_and_sighup_reloads_at_once(rules_path, tmp_path):
    """Saving rules.yaml changes answers within two seconds; SIGHUP reloads immediately."""
    with BootrulesServer(rules_path, free_port(), tmp_path / "server.log") as server:
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


def test_waitress_serve_call_uses_create_app_with_environment_settings(rules_path, tmp_path):
    """`waitress-serve --call app:create_app` serves the file named by BOOTRULES_RULES."""
    port = free_port()
    env = {"BOOTRULES_RULES": str(rules_path), "BOOTRULES_BASE_URL": "http://boot.example.com", "PATH": "/usr/bin:/bin"}
    process = subprocess.Popen(
        [sys.executable, "-m", "waitress", f"--listen=127.0.0.1:{port}", "--call", "app:create_app"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                status, _h, body = http_get(f"http://127.0.0.1:{port}/boot.ipxe", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        assert status == 200
        assert "chain --replace --autofree http://boot.example.com/ipxe?" in body
        assert http_get(f"http://127.0.0.1:{port}/ipxe?mac=00:0c:29:01:02:03")[1]["X-Bootrules-Rule"] == "vmware-guests"
    finally:
        process.terminate()
        process.wait(timeout=10)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(child) for child in out.split()]


def test_workers_share_the_port_follow_edits_and_stop_cleanly(rules_path, tmp_path):
    """With --workers 2: both workers answer; an edit is loaded once, by the parent, which
    replaces both workers; a killed worker is started again; SIGTERM stops every process."""
    import os

    with BootrulesServer(rules_path, free_port(), tmp_path / "server.log", args=("--workers", "2")) as server:
        first = _children(server.process.pid)
        assert len(first) == 2, server.log()

        rules_path.write_text(SAMPLE_RULES.replace("lab-rescue", "lab-rescue-v2"))
        assert wait_until(lambda: "new rules: started workers" in server.log(), timeout=5), server.log()
        assert server.log().count("loaded 3 rules") == 2  # at start, then the edit: once each
        assert wait_until(lambda: set(_children(server.process.pid)).isdisjoint(first), timeout=10)
        answers = {http_get(server.url + "/ipxe?mac=00:12:34:56:78:90")[1]["X-Bootrules-Rule"] for _ in range(40)}
        assert answers == {"lab-rescue-v2"}

        workers = _children(server.process.pid)
        os.kill(workers[0], signal.SIGKILL)
        assert wait_until(lambda: len(_children(server.process.pid)) == 2
                          and workers[0] not in _children(server.process.pid), timeout=10)
        assert "exited with -9; starting it again" in server.log()
        assert http_get(server.url + "/healthz")[0] == 200

        remaining = _children(server.process.pid)
    assert server.process.returncode == 0
    for pid in remaining:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()
    assert "all workers stopped" in server.log()
    assert "Traceback" not in server.log()


def test_sighup_to_the_parent_reloads_and_replaces_the_workers(rules_path, tmp_path):
    """SIGHUP to the supervising process reloads at once and hands the rules to new workers."""
    with BootrulesServer(rules_path, free_port(), tmp_path / "server.log", args=("--workers", "2")) as server:
        before = set(_children(server.process.pid))
        server.signal(signal.SIGHUP)
        assert wait_until(lambda: "new rules: started workers" in server.log(), timeout=5), server.log()
        assert server.log().count("on request") == 1
        assert wait_until(lambda: set(_children(server.process.pid)).isdisjoint(before), timeout=10)


def test_a_broken_edit_shows_on_every_workers_healthz(rules_path, tmp_path):
    """With several workers the parent loads: a broken edit still shows on /healthz, and the
    workers keep serving the last good rules."""
    with BootrulesServer(rules_path, free_port(), tmp_path / "server.log", args=("--workers", "2")) as server:
        rules_path.write_text("rules:\n  - name: broken\n")
        assert wait_until(lambda: '"reload_error":null' not in http_get(server.url + "/healthz")[2].replace(" ", ""),
                          timeout=5)
        for _ in range(10):  # new connections: both workers
            status, _headers, body = http_get(server.url + "/healthz")
            assert status == 200 and "rule 'broken': no action" in body
        assert http_get(server.url + "/ipxe?mac=00:12:34:56:78:90")[1]["X-Bootrules-Rule"] == "lab-rescue"


def test_flask_run_serves_the_app_from_the_factory(rules_path, tmp_path):
    """`flask --app app run` finds create_app and serves the file named by BOOTRULES_RULES."""
    port = free_port()
    env = {"BOOTRULES_RULES": str(rules_path), "PATH": "/usr/bin:/bin"}
    with open(tmp_path / "flask.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "flask", "--app", "app", "run", "--port", str(port)],
                                   cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            def answer():
                try:
                    return http_get(f"http://127.0.0.1:{port}/ipxe?mac=00:12:34:56:78:90", timeout=1)
                except OSError:
                    return None

            status, headers, body = wait_until(answer, timeout=15, interval=0.1)
            assert status == 200 and headers["X-Bootrules-Rule"] == "lab-rescue"
            assert body.startswith("#!ipxe\n")
        finally:
            process.terminate()
            process.wait(timeout=10)
