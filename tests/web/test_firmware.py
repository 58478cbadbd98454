"""What firmware without iPXE gets (bootrules/web/boot.py, bootrules/decide/grub.py): the boot
programs over HTTP, the autoexec script iPXE runs when the firmware loaded it, GRUB's entry
script and decisions for Secure Boot machines, and IPv6 addresses as facts."""

from __future__ import annotations

import logging
import re
import os
import subprocess
import sys

import pytest

from app import create_app
from bootrules.decide.grub import grub_url, render_grub_entry
from bootrules.services import services
from bootrules.settings import Settings

RULES = """\
rules:
  - name: secure-install
    match: {loader: grub, mac: "52:54:00:00:00:01"}
    boot:
      kernel: http://mirror.example.com/debian/linux
      initrd: [http://mirror.example.com/debian/initrd.gz]
      args: auto=true hostname=web-01 url=http://10.0.0.1/preseed
  - name: secure-rest
    match: {loader: grub}
    exit: true
  - name: v6-lab
    match: {ip6: "fd00:77::/64"}
    chain: http://boot.example.com/v6.ipxe
  - name: v4-lab
    match: {ip: 10.77.0.0/24}
    chain: http://boot.example.com/v4.ipxe
  - name: rest
    exit: true
"""


@pytest.fixture
def binaries(tmp_path):
    folder = tmp_path / "ipxe"
    folder.mkdir()
    for name in ("ipxe.efi", "snponly.efi", "undionly.kpxe"):
        (folder / name).write_bytes(os.urandom(4096) + name.encode())
    (tmp_path / "shimx64.efi").write_bytes(b"MZ shim" + os.urandom(1000))
    (tmp_path / "grubnetx64.efi").write_bytes(b"MZ grub" + os.urandom(3000))
    return tmp_path


@pytest.fixture
def firmware_app(tmp_path, binaries):
    (tmp_path / "rules.yaml").write_text(RULES)
    settings = Settings.load({"rules": str(tmp_path / "rules.yaml"), "poll_interval": 0,
                              "ipxe_dir": str(binaries / "ipxe"), "shim_file": str(binaries / "shimx64.efi"),
                              "grub_file": str(binaries / "grubnetx64.efi")})
    app = create_app(settings=settings)
    yield app
    services(app).stop()


def test_the_boot_programs_are_served_with_their_length_and_a_head_first(firmware_app, binaries, caplog):
    """UEFI HTTP Boot asks HEAD for the size, then GET: both answer with the file's length; the
    GET is logged with the client."""
    client = firmware_app.test_client()
    caplog.set_level(logging.INFO, "bootrules")
    for path, file in (("/ipxe.efi", binaries / "ipxe" / "ipxe.efi"), ("/snponly.efi", binaries / "ipxe" / "snponly.efi"),
                       ("/undionly.kpxe", binaries / "ipxe" / "undionly.kpxe"),
                       ("/shimx64.efi", binaries / "shimx64.efi"), ("/grubx64.efi", binaries / "grubnetx64.efi"),
                       ("//grubx64.efi", binaries / "grubnetx64.efi")):  # shim asks with two slashes
        # (PATH_INFO set as is: the test client reads "//name" as a host)
        environ = {"REMOTE_ADDR": "10.77.0.50", "PATH_INFO": path}
        head = client.head("/", environ_overrides=environ)
        assert head.status_code == 200 and head.headers["Content-Length"] == str(file.stat().st_size)
        assert head.data == b""
        got = client.get("/", environ_overrides=environ)
        assert got.status_code == 200 and got.data == file.read_bytes(), path
        assert got.headers["Content-Type"] == "application/efi"
    assert "served file=ipxe.efi client=10.77.0.50" in caplog.text
    assert client.get("/grub.efi").status_code == 404


def test_a_boot_program_that_cannot_be_read_is_a_404_and_a_log_line(firmware_app, binaries, caplog):
    (binaries / "ipxe" / "snponly.efi").unlink()
    response = firmware_app.test_client().get("/snponly.efi")
    assert response.status_code == 404 and response.text.count("\n") == 1
    assert "snponly.efi" in response.text and str(binaries) not in response.text
    assert "cannot read" in caplog.text


def test_binaries_named_but_missing_stop_the_server_and_check_with_one_line_each(tmp_path):
    """--ipxe-dir without iPXE's files, or a shim that is not there, is said before serving."""
    (tmp_path / "rules.yaml").write_text("rules:\n  - name: rest\n    exit: true\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    for command in ("check", "serve"):
        extra = ("--port", "1") if command == "serve" else ()
        result = subprocess.run([sys.executable, "app.py", command, *(("--rules",) if command == "serve" else ()),
                                 str(tmp_path / "rules.yaml"), "--ipxe-dir", str(empty), "--shim-file", str(tmp_path / "nope.efi"), *extra],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        for name in ("ipxe.efi", "snponly.efi", "undionly.kpxe", "nope.efi"):
            assert f"{name}: not there" in result.stderr, (command, result.stderr)


def test_autoexec_opens_the_network_then_asks_this_server(firmware_app):
    """iPXE loaded over HTTP by the firmware runs autoexec.ipxe from where it came from, with its
    network device closed: the script opens it, takes DHCP only if it has no address, then
    sends everything it knows, IPv6 address included."""
    script = firmware_app.test_client().get("/autoexec.ipxe", base_url="http://10.77.0.1").text
    lines = script.splitlines()
    assert lines[0] == "#!ipxe"
    assert lines[2:4] == ["ifopen || goto bootrules_failed", "isset ${ip} || isset ${net0/ip6} || dhcp || goto bootrules_failed"]
    assert "http://10.77.0.1/ipxe?" in script and "ip6=${netX/ip6}" in script


def test_grub_gets_an_entry_script_that_asks_this_server_in_its_own_syntax(firmware_app):
    script = firmware_app.test_client().get("/grub/grub.cfg", base_url="http://10.77.0.1").text
    assert script == render_grub_entry("http://10.77.0.1/grub/decide")
    assert 'source "(http,10.77.0.1)/grub/decide?${bootrules_query}"' in script
    assert "loader=grub" in script and "mac=${net_default_mac}" in script
    assert grub_url("http://boot.lan:8080/a?b=c") == "(http,boot.lan:8080)/a?b=c"
    assert grub_url("https://boot.lan/a") is None


def test_grub_decisions_boot_a_kernel_or_give_the_machine_back_to_the_firmware(firmware_app):
    client = firmware_app.test_client()
    script = client.get("/grub/decide?mac=52:54:00:00:00:01&loader=grub&platform=efi").text
    assert script.splitlines() == [
        "# bootrules: rule 'secure-install' (line 2)",
        "if linux (http,mirror.example.com)/debian/linux 'auto=true' 'hostname=web-01' 'url=http://10.0.0.1/preseed'; then",
        "  if initrd (http,mirror.example.com)/debian/initrd.gz; then",
        "    boot",
        "  fi",
        "fi",
        "echo 'bootrules: rule secure-install: boot failed; falling back to the next boot device'",
        "exit",
    ]
    other = client.get("/grub/decide?mac=52:54:00:00:00:02&loader=grub")
    assert other.headers["X-Bootrules-Rule"] == "secure-rest" and other.text.rstrip().endswith("exit")
    # The iPXE endpoint never answers with a rule for GRUB.
    assert client.get("/ipxe?mac=52:54:00:00:00:01").headers["X-Bootrules-Rule"] == "rest"


def test_a_grub_rule_that_chains_is_refused_where_it_is_written(tmp_path):
    from bootrules.errors import RulesError
    from bootrules.rules.loader import load_rules
    (tmp_path / "rules.yaml").write_text("rules:\n  - name: sb\n    match: {loader: grub}\n"
                                         "    chain: http://x/y.efi\n")
    with pytest.raises(RulesError) as raised:
        load_rules(str(tmp_path / "rules.yaml"))
    assert "rules.yaml:4" in str(raised.value) and "GRUB cannot chain" in str(raised.value)


def test_hostile_values_from_grub_never_reach_its_script(firmware_app):
    """GRUB sends its query as written: a value that is not what it claims gets a 400, and
    nothing a machine sends is written into the script."""
    client = firmware_app.test_client()
    assert client.get("/grub/decide?mac=52:54:00:00:00:01%27;reboot&loader=grub").status_code == 400
    script = client.get("/grub/decide?mac=52:54:00:00:00:03&loader=grub&serial=%27%24%7Bx%7D").text
    assert "${x}" not in script and "'$" not in script


def test_an_ipv6_only_machine_matches_ip6_and_ip_rules_by_its_ipv6_address(firmware_app):
    client = firmware_app.test_client()
    assert client.get("/ipxe?mac=52:54:00:00:00:09&ip6=fd00:77::1234").headers["X-Bootrules-Rule"] == "v6-lab"
    assert client.get("/ipxe?mac=52:54:00:00:00:09&ip=10.77.0.9").headers["X-Bootrules-Rule"] == "v4-lab"
    response = client.get("/ipxe?mac=52:54:00:00:00:09&ip6=not-an-address")
    assert response.status_code == 400 and "ip6" in response.text


def test_a_once_rule_answers_grub_with_its_done_url_in_the_kernel_arguments(tmp_path):
    """once: works for GRUB machines: the done URL is written into the arguments (GRUB has no
    ${bootrules-done}); after done, the machine gets the next rule."""
    (tmp_path / "rules.yaml").write_text(
        "rules:\n  - name: install\n    match: {loader: grub}\n    once: v1\n    boot:\n"
        "      kernel: http://10.0.0.1/linux\n      args: auto=true done=${bootrules-done}\n"
        "  - name: disk\n    exit: true\n")
    app = create_app(str(tmp_path / "rules.yaml"), poll_interval=0)
    try:
        client = app.test_client()
        script = client.get("/grub/decide?mac=52:54:00:00:00:07&loader=grub", base_url="http://10.0.0.5").text
        done = re.search(r"'done=(http://10\.0\.0\.5/done/[A-Za-z0-9_-]+)'", script)
        assert done, script
        assert client.post(done.group(1).replace("http://10.0.0.5", "")).status_code == 200
        after = client.get("/grub/decide?mac=52:54:00:00:00:07&loader=grub", base_url="http://10.0.0.5")
        assert after.headers["X-Bootrules-Rule"] == "disk"
    finally:
        services(app).stop()


def test_client_and_ip_rules_take_ipv6_networks_and_the_machines_page_lists_ipv6_clients(tmp_path):
    (tmp_path / "rules.yaml").write_text(
        "rules:\n  - name: v6-rack\n    match: {client: \"2001:db8:7::/48\"}\n    exit: true\n"
        "  - name: v6-ip\n    match: {ip: \"2001:db8:9::/64\"}\n    exit: true\n  - name: rest\n    exit: true\n")
    app = create_app(str(tmp_path / "rules.yaml"), poll_interval=0)
    try:
        client = app.test_client()
        asked = client.get("/ipxe?mac=52:54:00:00:00:08&ip6=2001:db8:7::8",
                           environ_base={"REMOTE_ADDR": "2001:db8:7::8"})
        assert asked.headers["X-Bootrules-Rule"] == "v6-rack"
        other = client.get("/ipxe?mac=52:54:00:00:00:09&ip6=2001:db8:9::9", environ_base={"REMOTE_ADDR": "fe80::9"})
        assert other.headers["X-Bootrules-Rule"] == "v6-ip"
        services(app).recorder.flush()
        listed = client.get("/api/machines").get_json()["machines"]
        seen = next(each for each in listed if each["facts"]["mac"] == "52:54:00:00:00:08")
        assert seen["client"] == "2001:db8:7::8" and seen["facts"]["ip6"] == "2001:db8:7::8"
        assert "2001:db8:7::8" in client.get("/ui/machines").text
    finally:
        services(app).stop()


def test_a_rule_grub_cannot_follow_answers_with_a_message_and_gives_the_machine_back(tmp_path):
    (tmp_path / "rules.yaml").write_text("rules:\n  - name: lab\n    match: {mac: \"52:54:00:*\"}\n"
                                         "    chain: http://boot.example.com/lab.ipxe\n")
    app = create_app(str(tmp_path / "rules.yaml"), poll_interval=0)
    try:
        script = app.test_client().get("/grub/decide?mac=52:54:00:00:00:01&loader=grub").text
        assert "chain is not something GRUB can do" in script and script.rstrip().endswith("exit")
        assert "http://boot.example.com" not in script
    finally:
        services(app).stop()
