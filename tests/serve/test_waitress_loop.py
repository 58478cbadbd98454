"""bootrules' waitress driver (bootrules/serve/waitress_loop.py): answers on the loop, scrapes aside, pipelining, the fallback."""

from __future__ import annotations

import contextlib
import email.utils
import signal
import socket
import subprocess
import sys
import threading
import time

from support import ROOT, BootrulesServer, first_answer, free_port, http_get


@contextlib.contextmanager
def loop_server(app):
    """bootrules' waitress server on a free port, in this process, and a function that runs
    its loop (as `server.run` does) until a condition holds or 5 s have passed."""
    from bootrules.serve import waitress_loop as server
    from bootrules.serve.launch import listening_socket
    from bootrules.web.boot import SLOW_PATHS

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


def test_pipelined_requests_are_answered_in_order_while_another_client_stalls(rules_path, tmp_path, http_server):
    """One worker: pipelined requests come back in order, each with its own rule, and a
    client stuck halfway through its request holds nothing up."""
    macs = ["00-12-34-56-78-90", "00-0c-29-aa-bb-cc", "00-99-99-99-99-99", "00-12-34-56-78-90"]
    expected = ["lab-rescue", "vmware-guests", "everyone-else", "lab-rescue"]
    with BootrulesServer(rules_path, free_port(), tmp_path / "server.log", args=(*http_server, "--workers", "1")) as server:
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
    answered = [line.split(": ", 1)[1] for line in received.decode().split("\r\n")
                if line.lower().startswith("x-bootrules-rule:")]
    assert answered == expected
    # bootrules dates its answers itself; the server must not add a second Date header
    lowered = received.lower()
    assert lowered.count(b"\r\ndate: ") == len(macs)
    date = email.utils.parsedate_to_datetime(lowered.split(b"\r\ndate: ")[1].split(b"\r\n")[0].decode())
    assert abs(date.timestamp() - time.time()) < 60




def test_a_waitress_without_the_internals_used_gets_the_stock_server_which_serves(rules_path, tmp_path):
    """If an upgrade of waitress drops an internal the loop server uses, bootrules says so
    once and serves with waitress's own threaded server: same answers, clean stop."""
    port = free_port()
    # As if upstream dropped the `_dispatcher` test shim of create_server.
    hide = ("import waitress.server as s; stock = s.create_server; "
            "s.create_server = lambda application, **options: stock(application, **options); "
            "from bootrules.cli import main; main()")
    command = [sys.executable, "-c", hide, "serve", "--rules", str(rules_path), "--port", str(port), "--workers", "1"]
    with open(tmp_path / "server.log", "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            status, headers, body = first_answer(f"http://127.0.0.1:{port}/ipxe?mac=00:12:34:56:78:90")
            assert status == 200 and headers["X-Bootrules-Rule"] == "lab-rescue" and body.startswith("#!ipxe\n")
            assert http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=15) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    text = (tmp_path / "server.log").read_text()
    assert text.count("lacks what bootrules' fast server uses (create_server(_dispatcher=))") == 1, text
    assert "Traceback" not in text


def test_the_installed_waitress_has_every_internal_the_loop_server_uses():
    """The pinned waitress (requirements.txt) is one the fast server runs on."""
    from bootrules.serve.waitress_loop import missing_internals

    assert missing_internals() == []
