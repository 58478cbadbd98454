"""The command line: check and preview work without a server."""

from __future__ import annotations

from app import cli
from support import ROOT


def test_check_accepts_a_valid_file(runner, rules_path):
    """`check` on a good file exits 0 and says how many rules it has."""
    result = runner.invoke(cli, ["check", str(rules_path)])
    assert result.exit_code == 0, result.output
    assert result.output == f"{rules_path}: 3 rules, no errors, 0 warnings\n"


def test_check_lists_every_problem_and_exits_1(runner, write_rules):
    """`check` on a bad file prints each problem as file:line and exits 1, no traceback."""
    path = write_rules(
        """
        rules:
          - name: a
            match: {mack: 00:11:22:33:44:55}
            exit: true
          - name: b
            chain: ftp//oops
        """
    )
    result = runner.invoke(cli, ["check", str(path)])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"{path}:3: rule 'a': match: unknown key 'mack' (did you mean 'mac'? expected one of: mac, uuid, serial, product, manufacturer, asset, hostname, platform, buildarch, loader, ip, ip6, client)",
        f"{path}:6: rule 'b': chain: 'ftp//oops' is not a URL (expected http://, https://, tftp://, ftp://, nfs://, file://, or a path starting with /)",
    ]
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_check_on_a_missing_file_is_one_line(runner, tmp_path):
    """A missing file is reported in one line with exit 1."""
    result = runner.invoke(cli, ["check", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1
    assert result.output == f"{tmp_path / 'nope.yaml'}: file not found\n"


def test_preview_prints_the_script_and_the_rule_that_answered(runner, rules_path):
    """`preview --mac` prints exactly the script the server would send, and the rule."""
    result = runner.invoke(cli, ["preview", "--rules", str(rules_path), "--mac", "00-12-34-56-78-90"])
    assert result.exit_code == 0, result.output
    assert result.stderr == f"# answered by rule 'lab-rescue' ({rules_path}:2), action chain\n"
    assert result.stdout.startswith("#!ipxe\n# bootrules: rule 'lab-rescue' (line 2)\nchain --replace")


def test_preview_matches_the_http_answer(runner, rules_path, client):
    """What `preview` prints is byte for byte what /ipxe sends for the same machine."""
    result = runner.invoke(cli, ["preview", "--rules", str(rules_path), "--mac", "00:0c:29:00:00:01"])
    assert result.stdout == client.get("/ipxe?mac=00:0c:29:00:00:01").text


def test_preview_refuses_a_bad_value(runner, rules_path):
    """A malformed --mac is an error line and exit 1."""
    result = runner.invoke(cli, ["preview", "--rules", str(rules_path), "--mac", "xx"])
    assert result.exit_code == 1
    assert "Error: mac: 'xx' is not a MAC address" in result.output


# --------------------------------------------------------------------------- preview --explain


def test_preview_explain_says_why_each_earlier_rule_did_not_match(runner):
    """--explain lists each rule above the answer with the first selector that failed."""
    result = runner.invoke(cli, ["preview", "--rules", str(ROOT / "rules.yaml"), "--explain", "--mac", "52:54:00:12:34:56",
                                 "--manufacturer", "Dell Inc.", "--product", "PowerEdge R740", "--platform", "efi"])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "# rule 'lab-rescue' (line 16) did not match: mac 52:54:00:12:34:56 does not match 00:12:34:56:78:90",
        "# rule 'db01-iscsi' (line 21) did not match: mac 52:54:00:12:34:56 does not match any of 00:11:22:33:44:55, 00:11:22:33:44:56",
        "# rule 'diskless-kiosk' (line 31) did not match: no serial was sent",
        "# rule 'dell-uefi-installer' (line 39) did not match: product poweredge r740 does not match poweredge r6* (glob)",
        "# rule 'test-rack' (line 47) did not match: no ip was sent",
        "# rule 'vmware-guests' (line 52) did not match: mac 52:54:00:12:34:56 does not match 00:0c:29:* (glob)",
        f"# answered by rule 'everyone-else' ({ROOT / 'rules.yaml'}:57), action exit",
    ]


def test_the_bootrules_command_is_installed_with_the_project(tmp_path):
    """`pip install .` (tests/run does it, editable) gives `bootrules`, the same CLI as `python app.py`."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from support import require_tool

    command = shutil.which("bootrules", path=str(Path(sys.executable).parent)) or require_tool(
        "bootrules", "pip install . installs it")
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: everyone\n    exit: true\n")
    result = subprocess.run([command, "check", str(rules)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout == f"{rules}: 1 rules, no errors, 0 warnings\n"


def test_check_and_preview_show_a_menu(runner, write_rules):
    """check accepts a menu rule and preview prints its whole script."""
    path = write_rules(
        """
        rules:
          - name: lab-menu
            match: {mac: "52:54:00:*"}
            once: true
            menu:
              title: Lab machines
              timeout: 10s
              default: local
              items:
                - {key: local, label: Boot from local disk, exit: true}
                - {key: rescue, label: Rescue, chain: "https://boot.netboot.xyz"}
          - name: local
            exit: true
        """
    )
    checked = runner.invoke(cli, ["check", "--strict", str(path)])
    assert checked.exit_code == 0 and checked.output == f"{path}: 2 rules, no errors, 0 warnings\n", checked.output
    shown = runner.invoke(cli, ["preview", "--rules", str(path), "--mac", "52:54:00:00:00:01"])
    assert shown.exit_code == 0
    assert "item bootrules-item-rescue Rescue || goto bootrules_failed" in shown.stdout
    assert "choose --timeout 10000 --default bootrules-item-local bootrules-choice" in shown.stdout
    assert f"# answered by rule 'lab-menu' ({path}:2), action menu" in shown.stderr
