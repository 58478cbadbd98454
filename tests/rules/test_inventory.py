"""The inventory (bootrules/rules/inventory.py): CSV, YAML and JSON files of machines, found by
the same identity rules as everywhere else, every problem at once as file:line, followed and
reloaded like the rules file."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from app import create_app
from bootrules.errors import RulesError
from bootrules.rules.loader import load_rules
from bootrules.services import services
from support import wait_until

CSV = """\
mac,uuid,serial,hostname,ip,role,disk
52:54:00:12:34:56,,SN-001,web-01,10.0.0.11,web,/dev/vda
52-54-00-12-34-57,4c4c4544-0042-3510-8052-b4c04f4d4e31,,web-02,10.0.0.12,web,
,,SN-003,db-01,10.0.0.21,db,/dev/sdb
"""
RULES = """\
inventory: [inventory/*.csv, inventory/lab.yaml]
rules:
  - name: web
    match: {role: web}
    exit: 3
  - name: db-by-glob
    match: {disk: "/dev/sd*", role: [db, database]}
    exit: 4
  - name: rest
    exit: true
"""


def lab(tmp_path: Path, csv: str = CSV, yaml_text: str = "[]\n", rules: str = RULES) -> Path:
    (tmp_path / "inventory").mkdir(exist_ok=True)
    (tmp_path / "inventory" / "rack.csv").write_text(csv)
    (tmp_path / "inventory" / "lab.yaml").write_text(yaml_text)
    path = tmp_path / "rules.yaml"
    path.write_text(rules)
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(RulesError) as error:
        load_rules(path)
    return list(error.value.problems)


def test_rows_are_read_from_csv_yaml_and_json_and_found_by_uuid_then_mac_then_serial(tmp_path):
    """Each row names its machine by mac, uuid or serial, in any notation; a machine is found by
    its UUID first, then its MAC, then its serial."""
    yaml_text = "- {mac: '00:0c:29:00:00:01', hostname: vm-01, role: vm}\n"
    path = lab(tmp_path, yaml_text=yaml_text)
    (tmp_path / "inventory" / "more.json").write_text(json.dumps([{"serial": "JSN-9", "hostname": "j-09"}]))
    path.write_text(RULES.replace("inventory/lab.yaml]", "inventory/lab.yaml, inventory/more.json]"))
    inventory = load_rules(path).inventory
    assert len(inventory) == 5 and {"hostname", "ip", "role", "disk"} <= inventory.columns
    assert inventory.find({"mac": "52:54:00:12:34:56"}).values["hostname"] == "web-01"
    assert inventory.find({"mac": "00:00:00:00:00:01", "uuid": "4c4c4544-0042-3510-8052-b4c04f4d4e31"}).line == 3
    assert inventory.find({"serial": "sn-003"}).values["hostname"] == "db-01"  # serials compare as rules do
    assert inventory.find({"serial": "jsn-9"}).where == "inventory/more.json:1"
    assert inventory.find({"mac": "00:0c:29:00:00:01"}).where == "inventory/lab.yaml:1"
    assert inventory.find({"mac": "99:99:99:99:99:99"}) is None


def test_rules_match_on_any_inventory_column_with_globs_and_lists(tmp_path):
    """A match: key that is a column of the inventory compares the machine's row."""
    app = create_app(str(lab(tmp_path)), poll_interval=0)
    client = app.test_client()
    assert client.get("/ipxe?mac=52:54:00:12:34:56").headers["X-Bootrules-Rule"] == "web"
    assert client.get("/ipxe?serial=sn-003").headers["X-Bootrules-Rule"] == "db-by-glob"
    assert client.get("/ipxe?mac=52:54:00:00:00:99").headers["X-Bootrules-Rule"] == "rest"  # not in the inventory
    services(app).stop()


def test_every_problem_of_every_file_is_reported_at_once_with_its_line(tmp_path):
    """Two rows with one MAC, a row naming no machine, a bad column name, a bad MAC, a CSV row
    with too many cells, a file of no known kind, a pattern matching nothing: all at once."""
    csv = textwrap.dedent("""\
        mac,host name,role
        52:54:00:12:34:56,a,web
        """)
    path = lab(tmp_path, csv=csv)
    assert problems(path) == ["inventory/rack.csv:1: column 2: 'host name' is not a variable name "
                              "(letters, digits and _, not starting with a digit)"]
    csv = textwrap.dedent("""\
        mac,hostname,note
        52:54:00:12:34:56,a,"a note
        on two lines"
        ,nobody,x
        52:54:00:12:34,bad,x
        52:54:00:12:34:57,b,x,extra
        """)
    yaml_text = "- {mac: '52-54-00-12-34-56', hostname: twin}\n- {files: x, mac: '52:54:00:00:00:01'}\n"
    path = lab(tmp_path, csv=csv, yaml_text=yaml_text)
    (tmp_path / "inventory" / "notes.txt").write_text("x")
    path.write_text(RULES.replace("[inventory/*.csv, inventory/lab.yaml]",
                                  "[inventory/*.csv, inventory/lab.yaml, inventory/notes.txt, racks/*.csv]"))
    assert problems(path) == [
        "inventory/rack.csv:4: this row names no machine (give mac, uuid or serial)",
        "inventory/rack.csv:5: mac: '52:54:00:12:34' is not a MAC address (expected e.g. 00:11:22:33:44:55, "
        "00-11-22-33-44-55, 0011.2233.4455 or 001122334455)",
        "inventory/rack.csv:6: 4 cells, but the header names 3 columns",
        "inventory/lab.yaml:2: machine: 'files' is one of bootrules' own variables (files, done, base, rule)",
        "inventory/notes.txt: not an inventory file (expected .csv, .yaml, .yml or .json)",
        f"{path}:1: inventory: no file matches 'racks/*.csv'",
        "inventory/lab.yaml:1: mac 52:54:00:12:34:56 is already the machine of inventory/rack.csv:2",
    ]


def test_a_match_key_that_is_no_selector_nor_column_is_an_error_with_a_suggestion(tmp_path):
    """A typo in a column name is caught like a typo in a selector."""
    path = lab(tmp_path, rules=RULES.replace("match: {role: web}", "match: {rol: web}"))
    assert problems(path) == [f"{path}:4: rule 'web': match: unknown key 'rol' (not a selector, nor a column of "
                              "the inventory) (did you mean 'role'? expected one of: disk, role, mac, uuid, serial, "
                              "product, manufacturer, asset, hostname, platform, buildarch, loader, ip, ip6, client)"]


def test_an_inventory_edit_is_picked_up_and_a_broken_one_keeps_the_last_good(tmp_path):
    """The inventory files are followed like rules.yaml: an edit reloads; a broken edit is
    reported and the last good rules and inventory keep serving; a new file matching the
    pattern is read too."""
    path = lab(tmp_path)
    app = create_app(str(path), poll_interval=0.05)
    client = app.test_client()
    rack = tmp_path / "inventory" / "rack.csv"
    rack.write_text(CSV.replace("SN-003,db-01,10.0.0.21,db", "SN-003,db-01,10.0.0.21,web"))
    assert wait_until(lambda: client.get("/ipxe?serial=sn-003").headers["X-Bootrules-Rule"] == "web", timeout=10)
    rack.write_text(CSV + "52:54:00:12:34:56,,,twin,,,\n")  # the same MAC twice: broken
    assert wait_until(lambda: client.get("/healthz").get_json()["reload_error"], timeout=10)
    assert "inventory/rack.csv:5: mac 52:54:00:12:34:56 is already the machine of inventory/rack.csv:2" in \
        client.get("/healthz").get_json()["reload_error"][0]
    assert client.get("/ipxe?serial=sn-003").headers["X-Bootrules-Rule"] == "web"  # the last good set
    rack.write_text(CSV)
    (tmp_path / "inventory" / "new.csv").write_text("mac,role\n52:54:00:77:77:77,db\n")
    assert wait_until(lambda: client.get("/ipxe?mac=52:54:00:77:77:77").headers["X-Bootrules-Rule"] == "rest"
                      and not client.get("/healthz").get_json()["reload_error"], timeout=10)
    services(app).stop()
