"""contrib/ web front ends and the systemd unit, checked with the real programs.

nginx and apache are started on the contrib files (ports substituted) in front of a real
waitress bootrules. A client on 127.0.0.2 asks through the proxy on 127.0.0.1. bootrules
must see 127.0.0.2 as the client, but only when the proxy is trusted, and the entry
script must point machines back at the proxy.
"""

from __future__ import annotations

import http.client
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from support import ROOT, BootrulesServer, contrib, free_port, require_tool

RULES = """
rules:
  - name: real-client
    match: {client: 127.0.0.2}
    chain: http://files.example.com/real-client.ipxe
  - name: seen-as-proxy
    match: {client: 127.0.0.1}
    exit: true
"""


def get(port: int, path: str, host: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    """GET through the proxy from 127.0.0.2, as a machine on another address would."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=("127.0.0.2", 0))
    try:
        connection.request("GET", path, headers={"Host": host, **(headers or {})})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        connection.close()


def wait_for_port(port: int, log: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {port}:\n{log.read_text() if log.exists() else ''}"
            time.sleep(0.1)


def start_nginx(workdir: Path, port: int, upstream: int) -> subprocess.Popen:
    require_tool("nginx", "from Debian's nginx-light package")
    site = contrib("nginx.conf", LISTEN=f"127.0.0.1:{port}", SERVER_NAME="_", BOOTRULES=f"127.0.0.1:{upstream}")
    (workdir / "site.conf").write_text(site)
    (workdir / "nginx.conf").write_text(f"""
        daemon off;
        worker_processes 1;
        pid {workdir}/nginx.pid;
        error_log {workdir}/nginx-error.log;
        events {{ worker_connections 64; }}
        http {{
            access_log off;
            client_body_temp_path {workdir}/body;
            proxy_temp_path {workdir}/proxy;
            include {workdir}/site.conf;
        }}
    """)
    process = subprocess.Popen(["nginx", "-c", str(workdir / "nginx.conf"), "-p", str(workdir)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wait_for_port(port, workdir / "nginx-error.log")
    return process


def start_apache(workdir: Path, port: int, upstream: int) -> subprocess.Popen:
    require_tool("apache2", "from Debian's apache2 package")
    modules = Path("/usr/lib/apache2/modules")
    site = contrib("apache.conf", LISTEN=str(port), SERVER_NAME="localhost", BOOTRULES=f"127.0.0.1:{upstream}")
    (workdir / "site.conf").write_text(site)
    load = "\n".join(f"LoadModule {name}_module {modules}/mod_{name}.so"
                     for name in ("mpm_event", "authz_core", "proxy", "proxy_http", "headers"))
    (workdir / "apache2.conf").write_text(f"""
ServerRoot {workdir}
PidFile {workdir}/apache.pid
Mutex file:{workdir}
ErrorLog {workdir}/apache-error.log
LogLevel warn
{load}
User www-data
Group www-data
ServerName localhost
Listen 127.0.0.1:{port}
Include {workdir}/site.conf
""")
    # Its own session: on shutdown apache signals its whole process group, which would
    # otherwise be pytest's.
    process = subprocess.Popen(["apache2", "-f", str(workdir / "apache2.conf"), "-DFOREGROUND"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_port(port, workdir / "apache-error.log")
    return process


@pytest.fixture(params=["nginx", "apache"])
def proxy_kind(request):
    return request.param


@pytest.mark.proxy
@pytest.mark.parametrize("trusted", [True, False], ids=["trusted-proxy", "untrusted-proxy"])
def test_decisions_arrive_through_the_proxy_with_the_real_client_address(proxy_kind, trusted, tmp_path):
    """Through nginx/apache: the decision arrives, the entry script points at the proxy, and
    bootrules sees the real client (127.0.0.2) only when the proxy is trusted."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    upstream, port = free_port(), free_port()
    args = ("--trusted-proxy", "127.0.0.1") if trusted else ()
    with BootrulesServer(rules, upstream, tmp_path / "bootrules.log", args=args) as server:
        start = start_nginx if proxy_kind == "nginx" else start_apache
        proxy = start(tmp_path, port, upstream)
        try:
            host = f"boot.example.com:{port}"
            status, headers, body = get(port, "/ipxe?mac=52:54:00:12:34:56", host, {"X-Forwarded-For": "10.6.6.6"})
            assert status == 200 and body.startswith("#!ipxe\n")
            expected = "real-client" if trusted else "seen-as-proxy"
            assert headers["X-Bootrules-Rule"] == expected, server.log()

            status, _headers, body = get(port, "/boot.ipxe", host)
            assert status == 200
            assert f"chain --replace --autofree http://{host}/ipxe?mac=" in body
        finally:
            proxy.terminate()
            proxy.wait(timeout=10)
    address = "127.0.0.2" if trusted else "127.0.0.1"
    assert f"client={address} mac=52:54:00:12:34:56 rule={expected}" in server.log()


def test_systemd_unit_verifies_and_is_locked_down(tmp_path):
    """systemd-analyze accepts the unit, and its offline security review rates it OK or better."""
    require_tool("systemd-analyze", "from Debian's systemd package")
    unit = tmp_path / "bootrules.service"
    unit.write_text(contrib("bootrules.service", INSTALL_DIR=str(ROOT), RULES=str(ROOT / "rules.yaml")))
    python = ROOT / ".venv" / "bin" / "python"
    if not python.exists():
        pytest.skip("the unit runs .venv/bin/python, which tests/run creates")
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    assert "bootrules.service" not in verify.stderr, verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True, text=True)
    match = re.search(r"Overall exposure level for bootrules.service: ([0-9.]+) (\w+)", security.stdout)
    assert match, security.stdout + security.stderr
    assert float(match.group(1)) <= 2.0 and match.group(2) in ("OK", "SAFE"), security.stdout
    unit_text = unit.read_text()
    assert "DynamicUser=yes" in unit_text and "ProtectSystem=strict" in unit_text
