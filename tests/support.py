"""Helpers every test may use: tools and root, ports and waiting, a bootrules server on a real
port, PostgreSQL databases, and the `once:` rules many tests share. Fixtures are in conftest.py."""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pytest

from bootrules.services import services

if TYPE_CHECKING:
    from bootrules.state import MachineStore, OnceStore

ROOT = Path(__file__).resolve().parent.parent

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str, why: str = "") -> str:
    """Return the path of a system tool; skip without it on a laptop, fail without it in CI."""
    path = shutil.which(name) or (name if os.path.exists(name) else None)
    if path:
        return path
    message = f"{name} is not installed{': ' + why if why else ''} (the README's test set-up installs it)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


SERVERS = ("waitress", "granian")


def require_server(name: str) -> None:
    """Skip (laptop) or fail (CI) a test of `--server granian` where granian cannot serve."""
    if name == "waitress":
        return
    from bootrules.serve.granian_worker import missing

    reason = missing()
    if reason is None:
        return
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)



def require_root(why: str) -> None:
    """Skip (laptop) or fail (CI) unless running as root, which namespaces and daemons need."""
    if os.geteuid() == 0:
        return
    message = f"needs root: {why} (run tests/run as root)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def contrib(name: str, **values: str) -> str:
    """Return contrib/<name> with its @PLACEHOLDERS@ replaced, and nothing else changed."""
    text = (ROOT / "contrib" / name).read_text()
    for key, value in values.items():
        assert f"@{key}@" in text, f"contrib/{name} has no @{key}@"
        text = text.replace(f"@{key}@", value)
    left = set(re.findall(r"@[A-Z_]+@", text))
    assert not left, f"contrib/{name}: placeholders not substituted: {sorted(left)}"
    return text


def wait_until(condition: Callable[[], object], timeout: float, interval: float = 0.05) -> object:
    """Poll `condition` until it returns something true or `timeout` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SAMPLE_RULES = """
rules:
  - name: lab-rescue
    match: {mac: "00:12:34:56:78:90"}
    chain: http://pxe.example.com/pxelinux.0
  - name: vmware-guests
    match: {mac: "00:0c:29:*"}
    chain: http://boot.example.com/vmware.ipxe
  - name: everyone-else
    exit: true
"""





class Headers(dict):
    """Response headers by name, whatever its case (waitress sends `X-Bootrules-Rule`, granian
    `x-bootrules-rule`: HTTP names are case-insensitive)."""

    def __init__(self, items) -> None:
        super().__init__((name.lower(), value) for name, value in items)

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())

    def get(self, name: str, default=None):
        return super().get(name.lower(), default)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, Headers, str]:
    """GET `url`; return status, headers and body text, for any status."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, Headers(response.headers.items()), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, Headers(error.headers.items()), error.read().decode()


def first_answer(url: str, timeout: float = 15.0) -> tuple[int, dict[str, str], str]:
    """GET `url` until a server started in the background answers it (or `timeout` passes)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return http_get(url, timeout=1)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# What `serve` logs when new workers take over: the pids of the workers it retires.
RELOADED = re.compile(r"new rules: started workers [0-9 ]+, retiring ([0-9 ]+|none)$", re.MULTILINE)


def _running(pid: int) -> bool:
    """Whether process `pid` is alive (not exited, nor a zombie waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@dataclass
class BootrulesServer:
    """`python app.py serve` in a child process, logging to a file the test can read."""

    rules: Path
    port: int
    log_path: Path
    args: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    connect_host: str | None = None  # where clients connect, if not `host`
    netns: str | None = None
    cwd: Path | None = None  # where the server runs (relative paths in `rules` and `args` are from here)
    process: subprocess.Popen | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://{self.connect_host or self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> "BootrulesServer":
        command = [sys.executable, str(ROOT / "app.py"), "serve", "--rules", str(self.rules),
                   "--host", self.host, "--port", str(self.port), *self.args]
        if self.netns:
            command = ["ip", "netns", "exec", self.netns, *command]
        self._log = open(self.log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.cwd or ROOT,
                                        env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bootrules exited with {self.process.returncode}:\n{self.log()}")
            if self._answers():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"bootrules did not answer within {timeout}s:\n{self.log()}")

    def _answers(self) -> bool:
        if self.netns:  # only reachable from inside its namespace
            probe = f"import urllib.request; urllib.request.urlopen('{self.url}/healthz', timeout=1)"
            command = ["ip", "netns", "exec", self.netns, sys.executable, "-c", probe]
            return subprocess.run(command, capture_output=True).returncode == 0
        try:
            return http_get(self.url + "/healthz", timeout=1)[0] in (200, 503)
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_once_it_says(self, text: str, timeout: float = 5.0) -> str:
        """The log, once `text` is in it or `timeout` has passed: workers write their lines in
        batches, a moment after the request."""
        deadline = time.monotonic() + timeout
        while text not in (log := self.log()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return log

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def reloads(self) -> int:
        """How many times new workers have taken over from old ones so far."""
        return len(RELOADED.findall(self.log()))

    def wait_for_reload(self, reloads_before: int, timeout: float = 15.0) -> None:
        """Wait for a reload after the first `reloads_before`, and for every worker it retired
        to exit. Until they have, a retiring worker may still answer with the old rules: a
        new worker's answer alone does not say the old ones are gone."""
        deadline = time.monotonic() + timeout
        while len(found := RELOADED.findall(self.log())) <= reloads_before:
            assert time.monotonic() < deadline, f"no reload within {timeout} s:\n{self.log()}"
            time.sleep(0.1)
        for pid in [int(word) for word in found[-1].split() if word.isdigit()]:
            while _running(pid):
                assert time.monotonic() < deadline, f"retired worker {pid} still running:\n{self.log()}"
                time.sleep(0.05)

    def stop(self) -> int | None:
        """Stop the server (SIGTERM, then SIGKILL) and return its exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def __enter__(self) -> "BootrulesServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- PostgreSQL


def pg_tool(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else require_tool(name, "from Debian's postgresql package")


def new_database(postgres: str) -> str:
    """The URL of a database of its own in the session's PostgreSQL: tests share the server,
    never each other's rows."""
    import uuid

    import psycopg

    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{postgres}/postgres", autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    return f"{postgres}/{name}"


# --------------------------------------------------------------------------- once:


MAC_A, MAC_B, MAC_C = "52:54:00:12:34:56", "52:54:00:12:34:57", "52:54:00:99:99:99"
UUID = "4c4c4544-0042-3510-8052-b4c04f4d4e31"
ONCE_RULES = """
rules:
  - name: install-debian
    match: {mac: ["52:54:00:12:34:56", "52:54:00:12:34:57", "52:54:00:99:99:99"]}
    once: LABEL
    boot:
      kernel: http://mirror.example.com/debian/linux
      args: auto=true bootrules.done=${bootrules-done}
  - name: local-disk
    exit: true
"""
DONE_LINE = re.compile(r"^set bootrules-done (http://[^/]+)/done/([A-Za-z0-9_-]+)$", re.M)


def write_once_rules(path: Path, label: str = "true") -> Path:
    path.write_text(textwrap.dedent(ONCE_RULES).lstrip().replace("LABEL", label))
    return path


def ask(client, mac: str = MAC_A, uuid: str | None = None):
    query = f"/ipxe?mac={mac}" + (f"&uuid={uuid}" if uuid else "")
    response = client.get(query)
    assert response.status_code == 200
    found = DONE_LINE.search(response.get_data(as_text=True))
    return response.headers["X-Bootrules-Rule"], (found.group(2) if found else None)


def rows(state: Path) -> list[tuple]:
    with sqlite3.connect(state) as db:
        return db.execute("SELECT machine, rule, label, state FROM bootrules_once ORDER BY machine").fetchall()


def lose_unwritten_rows(app) -> None:
    """What a worker killed before its batch was written loses."""
    services(app).once.arms._pending.clear()


# --------------------------------------------------------------------------- stores


def once_store(location) -> "OnceStore":
    """The `once:` store at a SQLite path or a postgresql:// URL, as the command line opens it."""
    from bootrules.state import OnceStore
    from bootrules.state.database import open_database

    return OnceStore(open_database(str(location), patient=True))


def machine_store(location) -> "MachineStore":
    """The machines-seen store at a SQLite path or a postgresql:// URL."""
    from bootrules.state import MachineStore
    from bootrules.state.database import open_database

    return MachineStore(open_database(str(location), patient=True))
