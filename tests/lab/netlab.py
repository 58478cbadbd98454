"""A throw-away LAN of network namespaces for DHCP tests; nothing touches a real interface.

    switch namespace:  bridge br0 ── sw-<host> ┐
    <host> namespace:  eth0 (veth peer)  ◀─────┘   one per host: server, router, client…

Every interface is created inside a namespace the lab made, the processes the lab starts
run inside those namespaces, and `close()` kills them and deletes the namespaces (which
deletes their interfaces), also when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PROBE = Path(__file__).resolve().parent / "dhcp_probe.py"


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=30)


class NetLab:
    """Namespaces joined by a bridge; hosts get static addresses or none (DHCP clients)."""

    def __init__(self, workdir: Path, subnet: str = "10.99.0") -> None:
        self.workdir = workdir
        self.subnet = subnet
        self.tag = f"{os.getpid() % 100000}{int(time.monotonic() * 1000) % 1000}"
        self.switch = f"br-sw-{self.tag}"
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen] = []
        self._logs: list = []
        run("ip", "netns", "add", self.switch)
        self.namespaces.append(self.switch)
        run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.switch, "link", "set", "br0", "up")
        run("ip", "-n", self.switch, "link", "set", "lo", "up")

    def host(self, name: str, address: str | None = None) -> str:
        """Add a host namespace with interface eth0 on the bridge; return the namespace name."""
        namespace = f"br-{name}-{self.tag}"
        run("ip", "netns", "add", namespace)
        self.namespaces.append(namespace)
        port = f"sw-{name}"[:15]
        run("ip", "link", "add", "eth0", "netns", namespace, "type", "veth", "peer", "name", port, "netns", self.switch)
        run("ip", "-n", self.switch, "link", "set", port, "master", "br0", "up")
        run("ip", "-n", namespace, "link", "set", "lo", "up")
        run("ip", "-n", namespace, "link", "set", "eth0", "up")
        if address:
            run("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        return namespace

    def tap(self, name: str = "tapvm") -> str:
        """Add a tap device on the bridge (for a QEMU guest run in the switch namespace)."""
        run("ip", "-n", self.switch, "tuntap", "add", name, "mode", "tap")
        run("ip", "-n", self.switch, "link", "set", name, "master", "br0", "up")
        return name

    def start(self, namespace: str, argv: list[str], log_name: str) -> subprocess.Popen:
        """Start a daemon inside `namespace`, logging to a file; it is killed by close()."""
        log = open(self.workdir / log_name, "ab")
        self._logs.append(log)
        process = subprocess.Popen(["ip", "netns", "exec", namespace, *argv], stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def log(self, log_name: str) -> str:
        path = self.workdir / log_name
        return path.read_text(errors="replace") if path.exists() else ""

    def dhcp(self, namespace: str, kind: str, arch: int, mac: str, wait: float = 5.0) -> dict:
        """Run the scripted firmware DHCP exchange in `namespace`; return its offers and ack."""
        result = run("ip", "netns", "exec", namespace, sys.executable, str(PROBE), "dhcp", "--iface", "eth0",
                     "--mac", mac, "--kind", kind, "--arch", str(arch), "--wait", str(wait))
        return json.loads(result.stdout)

    def set_address(self, namespace: str, address: str) -> None:
        """Give the host's eth0 exactly this address (what a DHCP client does with its lease)."""
        run("ip", "-n", namespace, "addr", "flush", "dev", "eth0")
        run("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")

    def tftp(self, namespace: str, server: str, filename: str, out: Path) -> dict:
        """Fetch `filename` from `server` over TFTP from inside `namespace`."""
        result = run("ip", "netns", "exec", namespace, sys.executable, str(PROBE), "tftp", "--server", server,
                     "--file", filename, "--out", str(out))
        return json.loads(result.stdout)

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        # Anything still running in a namespace (a daemon that forked) dies with it.
        for namespace in self.namespaces:
            pids = run("ip", "netns", "pids", namespace, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for namespace in reversed(self.namespaces):
            run("ip", "netns", "del", namespace, check=False)
        for log in self._logs:
            log.close()

    def __enter__(self) -> "NetLab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
