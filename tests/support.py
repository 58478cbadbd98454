"""Helpers for tests that run real processes: a bootrules server on a real port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

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
