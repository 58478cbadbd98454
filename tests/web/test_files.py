"""Installer files (GET /files/<token>/<name>, bootrules/web/boot.py): rendered per machine behind a
token bound to the machine and rule; cloud-init's NoCloud finds its files under the URL and
Debian's real cloud-init accepts them."""

from __future__ import annotations

import base64
import re
import subprocess
import time

import pytest

from app import create_app
from bootrules.services import services
from bootrules.state import tokens
from support import require_tool

CSV = "mac,hostname,role,ssh_key,root_password_hash\n" \
      "52:54:00:00:00:01,web-01,web,ssh-ed25519 AAAAC3Nz web01@ops,$6$salt$SECRETHASH\n" \
      "52:54:00:00:00:02,web-02,web,ssh-ed25519 AAAAC3Nz web02@ops,$6$salt$OTHERHASH\n"
USER_DATA = """\
#cloud-config
hostname: {{ hostname }}
fqdn: {{ hostname }}.example.com
ssh_authorized_keys:
  - {{ ssh_key }}
runcmd:
  - [curl, -fsS, --retry, "5", -X, POST, "{{ done }}"]
"""
META_DATA = "instance-id: {{ uuid | default(mac) }}\nlocal-hostname: {{ hostname }}\n"
PRESEED = """\
d-i netcfg/get_hostname string {{ hostname }}
d-i passwd/root-password-crypted password {{ root_password_hash }}
d-i preseed/late_command string wget -q -O /dev/null --post-data= {{ done }}
"""
RULES = """\
inventory: inventory.csv
rules:
  - name: cloud
    match: {role: web, platform: efi}
    once: v1
    files: [user-data, meta-data, vendor-data]
    boot:
      kernel: http://mirror.example.com/linux
      args: ds=nocloud-net;s={{ files }}
  - name: debian
    match: {role: web}
    once: v1
    files: [preseed.cfg]
    boot:
      kernel: http://mirror.example.com/debian/linux
      args: auto=true priority=critical url={{ files }}preseed.cfg hostname={{ hostname }}
  - name: rest
    exit: true
"""
FILES_URL = re.compile(r"http://localhost(/files/([A-Za-z0-9_-]+)/)")


@pytest.fixture
def lab(tmp_path):
    (tmp_path / "inventory.csv").write_text(CSV)
    (tmp_path / "templates").mkdir()
    for name, text in (("user-data", USER_DATA), ("meta-data", META_DATA), ("vendor-data", "#cloud-config\n{}\n"),
                       ("preseed.cfg", PRESEED)):
        (tmp_path / "templates" / name).write_text(text)
    (tmp_path / "rules.yaml").write_text(RULES)
    app = create_app(str(tmp_path / "rules.yaml"), poll_interval=0)
    yield app, app.test_client(), tmp_path
    services(app).stop()


def files_url(client, query: str) -> tuple[str, str]:
    script = client.get(f"/ipxe?{query}").get_data(as_text=True)
    found = FILES_URL.search(script)
    assert found, script
    return found.group(1), found.group(2)


def test_each_machine_gets_its_own_files_rendered_with_its_variables(lab):
    """Two machines of one inventory get their own hostname in their arguments and files."""
    _app, client, _tmp = lab
    for mac, hostname in (("52:54:00:00:00:01", "web-01"), ("52:54:00:00:00:02", "web-02")):
        script = client.get(f"/ipxe?mac={mac}").get_data(as_text=True)
        assert f"hostname={hostname}" in script
        path, _token = files_url(client, f"mac={mac}")
        preseed = client.get(path + "preseed.cfg")
        assert preseed.status_code == 200 and preseed.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert preseed.get_data(as_text=True).startswith(f"d-i netcfg/get_hostname string {hostname}\n")


def test_a_files_url_is_bound_to_its_machine_and_rule_and_a_made_up_one_opens_nothing(lab):
    """A token opens only the files of its rule, for its machine; altered, forged or another
    store's tokens, and files the rule does not serve, are 404."""
    _app, client, _tmp = lab
    path, token = files_url(client, "mac=52:54:00:00:00:01")
    assert client.get(path + "user-data").status_code == 404  # the cloud rule's file, not this rule's
    assert client.get(path + "../rules.yaml").status_code == 404
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[-1] ^= 1
    altered = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    other = tokens.issue(tokens.new_key(), ["mac:52:54:00:00:00:01"], "debian", "\x00files", time.time(),
                         time.time() + 60)
    for forged in (altered, other, "A" * 75, "x"):
        assert client.get(f"/files/{forged}/preseed.cfg").status_code == 404


def test_an_expired_files_url_is_gone(lab):
    """Past its expiry (the rule's once: expiry, or 24 h), a files URL answers 410."""
    app, client, _tmp = lab
    path, _token = files_url(client, "mac=52:54:00:00:00:01")
    gate = services(app).once
    real = gate.clock
    gate.clock = lambda: real() + 86400 + 1
    assert client.get(path + "preseed.cfg").status_code == 410
    gate.clock = real
    assert client.get(path + "preseed.cfg").status_code == 200


def test_cloud_init_finds_its_nocloud_files_under_the_url_and_accepts_them(lab):
    """ds=nocloud-net;s=<files URL>: meta-data, user-data and vendor-data are there, as cloud-init
    fetches them, and Debian's real `cloud-init schema` accepts the user-data."""
    cloud_init = require_tool("cloud-init", "from Debian's cloud-init package")
    _app, client, tmp = lab
    script = client.get("/ipxe?mac=52:54:00:00:00:01&platform=efi").get_data(as_text=True)
    assert "ds=nocloud-net;s=http://localhost/files/" in script
    path, token = files_url(client, "mac=52:54:00:00:00:01&platform=efi")
    assert f"set bootrules-done http://localhost/done/{token}" in script  # once: the same token
    fetched = {name: client.get(path + name, headers={"User-Agent": "Cloud-Init/22.4.2"})
               for name in ("meta-data", "user-data", "vendor-data")}
    assert all(response.status_code == 200 for response in fetched.values())
    user_data = fetched["user-data"].get_data(as_text=True)
    assert "hostname: web-01\n" in user_data and f"/done/{token}" in user_data
    assert fetched["meta-data"].get_data(as_text=True) == "instance-id: 52:54:00:00:00:01\nlocal-hostname: web-01\n"
    (tmp / "user-data").write_text(user_data)
    checked = subprocess.run([cloud_init, "schema", "--config-file", str(tmp / "user-data")], capture_output=True,
                             text=True)
    assert checked.returncode == 0 and "Valid cloud-config" in checked.stdout, checked.stdout + checked.stderr


def test_a_fetch_is_one_log_line_and_the_body_is_never_logged(lab, caplog):
    """The log says token prefix, machine, file and status; never what the file holds."""
    _app, client, _tmp = lab
    path, token = files_url(client, "mac=52:54:00:00:00:01")
    with caplog.at_level("INFO", logger="bootrules"):
        assert "SECRETHASH" in client.get(path + "preseed.cfg").get_data(as_text=True)
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("files:")]
    assert lines == [f"files: token={token[:6]}… machine=mac:52:54:00:00:00:01 file=preseed.cfg status=200"]
    assert "SECRETHASH" not in "\n".join(record.getMessage() for record in caplog.records)


def test_preview_renders_a_file_for_a_machine_and_says_where_each_variable_came_from(lab, runner):
    """`preview --file` renders a served file as the machine would get it, secrets masked;
    --explain names each variable's source."""
    from app import cli

    _app, _client, tmp = lab
    rules = str(tmp / "rules.yaml")
    shown = runner.invoke(cli, ["preview", "--rules", rules, "--mac", "52:54:00:00:00:01", "--explain",
                                "--file", "preseed.cfg"])
    assert shown.exit_code == 0, shown.output
    assert "d-i passwd/root-password-crypted password ********" in shown.output
    assert "# variable hostname = web-01: inventory (inventory.csv:2)" in shown.output
    assert "# variable files = http://BASE/files/TOKEN/: bootrules" in shown.output
    revealed = runner.invoke(cli, ["preview", "--rules", rules, "--mac", "52:54:00:00:00:01", "--show-secrets",
                                   "--file", "preseed.cfg"])
    assert "$6$salt$SECRETHASH" in revealed.output
    missing = runner.invoke(cli, ["preview", "--rules", rules, "--mac", "52:54:00:00:00:01", "--file", "user-data"])
    assert missing.exit_code == 1 and "serves no file 'user-data'" in missing.output


def test_machines_in_the_inventory_that_never_asked_are_listed(lab, runner):
    """Expected, not seen: on the page, in the API and with `machines --expected`."""
    from app import cli

    app, client, tmp = lab
    client.get("/ipxe?mac=52:54:00:00:00:02")
    services(app).recorder.flush()
    listed = client.get("/api/expected").get_json()
    assert listed["inventory"] == 2 and [row["names"] for row in listed["not_seen"]] == [["mac:52:54:00:00:00:01"]]
    assert listed["not_seen"][0]["columns"]["root_password_hash"] == "********"
    page = client.get("/ui/expected").get_data(as_text=True)
    assert "mac:52:54:00:00:00:01" in page and "mac:52:54:00:00:00:02" not in page
    result = runner.invoke(cli, ["machines", "--expected", "--rules", str(tmp / "rules.yaml")])
    assert result.exit_code == 0 and "mac:52:54:00:00:00:01" in result.output and "1 of 2 machines" in result.output
