"""The app factory under other WSGI servers: `waitress-serve --call app:create_app`, `flask --app app run`."""

from __future__ import annotations

import subprocess
import sys
import time

from support import ROOT, first_answer, free_port, http_get


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


def test_flask_run_serves_the_app_from_the_factory(rules_path, tmp_path):
    """`flask --app app run` finds create_app and serves the file named by BOOTRULES_RULES."""
    port = free_port()
    env = {"BOOTRULES_RULES": str(rules_path), "PATH": "/usr/bin:/bin"}
    with open(tmp_path / "flask.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "flask", "--app", "app", "run", "--port", str(port)],
                                   cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            status, headers, body = first_answer(f"http://127.0.0.1:{port}/ipxe?mac=00:12:34:56:78:90")
            assert status == 200 and headers["X-Bootrules-Rule"] == "lab-rescue"
            assert body.startswith("#!ipxe\n")
        finally:
            process.terminate()
            process.wait(timeout=10)
