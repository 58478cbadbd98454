"""Shared fixtures: a fresh app per test, built from a rules file the test writes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
from pathlib import Path
from typing import Callable

import pytest

from app import cli, create_app
from bootrules.services import services
from support import SAMPLE_RULES, SERVERS, free_port, pg_tool, require_root, require_server

def pytest_addoption(parser) -> None:
    parser.addoption("--slow", action="store_true",
                     help="also run the slow combinations (marked slow): each repeats a boot path another test proves")


def pytest_collection_modifyitems(config, items) -> None:
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="a slow combination of a path proved elsewhere: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=SERVERS)
def http_server(request) -> tuple[str, ...]:
    """`serve`'s arguments for each HTTP server: waitress (the default) and granian (the extra)."""
    require_server(request.param)
    return ("--server", request.param)


@pytest.fixture
def write_rules(tmp_path: Path) -> Callable[[str], Path]:
    """Write a rules file (dedented YAML) into the test's temp dir and return its path."""

    def write(text: str, name: str = "rules.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    return write


@pytest.fixture
def rules_path(write_rules: Callable[[str], Path]) -> Path:
    return write_rules(SAMPLE_RULES)


@pytest.fixture
def app(rules_path: Path):
    """An app on the sample rules, without the background watcher (tests reload by hand)."""
    app = create_app(str(rules_path), poll_interval=0)
    app.config["TESTING"] = True
    yield app
    services(app).stop()


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


class PostgresServer(str):
    """The server's URL (without a database), and where its data directory is."""

    def __new__(cls, url: str, data: Path) -> "PostgresServer":
        made = super().__new__(cls, url)
        made.data = data
        return made

    def processes(self) -> list[int]:
        """The postmaster and every process it started (to freeze them with SIGSTOP)."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == postmaster:
                children.append(int(stat.parent.name))
        return [postmaster, *children]


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
        yield PostgresServer(f"postgresql://postgres@127.0.0.1:{port}", data)
    finally:
        stopped = subprocess.run([*as_postgres, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"],
                                 capture_output=True)
        if stopped.returncode != 0 and (data / "postmaster.pid").exists():
            os.kill(int((data / "postmaster.pid").read_text().split()[0]), signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)
