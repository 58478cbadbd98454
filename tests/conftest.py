"""Shared fixtures: a fresh app per test, built from a rules file the test writes."""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Callable

import pytest

from app import cli, create_app

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


@pytest.fixture(params=SERVERS)
def http_server(request) -> tuple[str, ...]:
    """`serve`'s arguments for each HTTP server: waitress (the default) and granian (the extra)."""
    require_server(request.param)
    return ("--server", request.param)


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


@pytest.fixture
def write_rules(tmp_path: Path) -> Callable[[str], Path]:
    """Write a rules file (dedented YAML) into the test's temp dir and return its path."""

    def write(text: str, name: str = "rules.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    return write


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


@pytest.fixture
def rules_path(write_rules: Callable[[str], Path]) -> Path:
    return write_rules(SAMPLE_RULES)


@pytest.fixture
def app(rules_path: Path):
    """An app on the sample rules, without the background watcher (tests reload by hand)."""
    app = create_app(str(rules_path), poll_interval=0)
    app.config["TESTING"] = True
    yield app
    app.extensions["bootrules"].stop()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner():
    from click.testing import CliRunner

    return CliRunner()


@pytest.fixture
def cli_app():
    return cli


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


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL of the test's own: its own data directory, listening on 127.0.0.1 only."""
    require_root("PostgreSQL runs as the postgres user")
    initdb, pg_ctl = pg_tool("initdb"), pg_tool("pg_ctl")
    work = Path(tempfile.mkdtemp(prefix="bootrules-pg-"))
    work.chmod(0o755)
    data, sockets = work / "data", work / "sockets"
    sockets.mkdir()
    shutil.chown(work, "postgres")
    shutil.chown(sockets, "postgres")
    port = free_port()
    as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_postgres, initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
                   check=True, capture_output=True)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} -c fsync=off"
    subprocess.run([*as_postgres, pg_ctl, "-D", str(data), "-o", options, "-l", str(work / "log"), "-w", "start"],
                   check=True, capture_output=True)
    try:
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True) as db:
            db.execute("CREATE DATABASE readonly")
            db.execute("ALTER DATABASE readonly SET default_transaction_read_only = on")
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        stopped = subprocess.run([*as_postgres, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"],
                                 capture_output=True)
        if stopped.returncode != 0 and (data / "postmaster.pid").exists():
            os.kill(int((data / "postmaster.pid").read_text().split()[0]), signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)
