"""Settings: flags, BOOTRULES_* and defaults from one list, every problem at once (bootrules/settings.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from app import cli
from bootrules.settings import SETTINGS, Settings, SettingsError
from support import ROOT, free_port, http_get



def test_every_setting_can_come_from_the_environment(rules_path, tmp_path):
    """serve with no flags at all: rules, port, base URL, workers and log format from BOOTRULES_*."""
    port = free_port()
    env = {**os.environ, "BOOTRULES_RULES": str(rules_path), "BOOTRULES_PORT": str(port),
           "BOOTRULES_BASE_URL": "http://boot.example.com", "BOOTRULES_WORKERS": "1", "BOOTRULES_LOG_FORMAT": "json",
           "BOOTRULES_TRUSTED_PROXIES": "127.0.0.1"}
    log = tmp_path / "env.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "serve"], env=env, stdout=out,
                                   stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    status, _h, body = http_get(f"http://127.0.0.1:{port}/boot.ipxe", timeout=1)
                    break
                except OSError:
                    assert time.monotonic() < deadline and process.poll() is None, log.read_text()
                    time.sleep(0.1)
            assert "chain --replace --autofree http://boot.example.com/ipxe?" in body
        finally:
            process.terminate()
            process.wait(timeout=10)
    assert json.loads(log.read_text().splitlines()[0])["message"].startswith("loaded 3 rules")


def documented_settings_table() -> list[tuple[str, str, str, str]]:
    readme = (ROOT / "docs" / "operations.md").read_text()
    rows = re.findall(r"^\| `(BOOTRULES_[A-Z_]+)` \| `(--[a-z-]+)` \| (.+?) \| (.+?) \|$", readme, re.M)
    return rows


def test_the_documented_table_help_and_flags_all_come_from_the_one_list(runner):
    """The manual's settings table is SETTINGS, row for row; `--help` names every variable,
    and `serve` has every flag."""
    assert documented_settings_table() == [(s.env, s.flag, s.meaning, s.shown_default) for s in SETTINGS]
    shown = runner.invoke(cli, ["--help"]).output
    serve_help = runner.invoke(cli, ["serve", "--help"]).output
    for setting in SETTINGS:
        assert re.search(rf"^ +{setting.env} +{setting.flag}$", shown, re.M), setting.env
        assert setting.flag in serve_help and setting.env in serve_help


def test_every_wrong_setting_is_reported_at_once_by_its_flag_or_variable():
    """Every wrong setting is reported at once, each named by the flag or variable it came from."""
    environ = {"BOOTRULES_PORT": "eighty", "BOOTRULES_POLL_INTERVAL": "-1", "BOOTRULES_LOG_FORMAT": "xml"}
    given = {"base_url": "ftp://nope", "trusted_proxies": ("10.0.0.0/8", "not-a-net"), "workers": "65"}
    with pytest.raises(SettingsError) as error:
        Settings.load(given, environ)
    assert error.value.problems == (
        "BOOTRULES_PORT: 'eighty' is not a whole number",
        "--base-url: 'ftp://nope' must look like http://host[:port][/path]",
        "--trusted-proxy: 'not-a-net' is not an address or CIDR range",
        "--workers: 65 is out of range (0 to 64)",
        "BOOTRULES_LOG_FORMAT: 'xml' is not one of: text, json",
        "BOOTRULES_POLL_INTERVAL: '-1' is out of range (0 to 3600 seconds)",
    )


def test_a_flag_wins_over_its_variable_and_a_variable_over_the_default():
    """A flag wins over its BOOTRULES_* variable, which wins over the default."""
    environ = {"BOOTRULES_PORT": "8081", "BOOTRULES_HOST": "::1", "BOOTRULES_TRUSTED_PROXIES": "10.0.0.1, 10.0.0.2"}
    settings = Settings.load({"port": "9000"}, environ)
    assert settings.port == 9000 and settings.host == "::1" and settings.channel_timeout == 30
    assert [str(n) for n in settings.trusted_proxies] == ["10.0.0.1/32", "10.0.0.2/32"]
    assert Settings.load({}, {}) == Settings()


def test_serve_reports_every_wrong_setting_in_one_clean_error(runner):
    """`serve` with wrong settings exits 1 with one error listing them all, no traceback."""
    result = runner.invoke(cli, ["serve", "--port", "x", "--channel-timeout", "0"], env={"BOOTRULES_WORKERS": "-2"})
    assert result.exit_code == 1
    assert result.output.splitlines()[-4:] == [
        "Error: invalid settings:",
        "--port: 'x' is not a whole number",
        "BOOTRULES_WORKERS: -2 is out of range (0 to 64)",
        "--channel-timeout: 0 is out of range (1 to 3600)",
    ]
