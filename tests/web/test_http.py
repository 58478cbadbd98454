"""The HTTP layer through Flask's test client: entry script, decisions, health, proxies."""

from __future__ import annotations

import json

import pytest

from app import create_app
from bootrules.decide.render import render_entry, render_no_match
from bootrules.services import services


def test_entry_script_points_back_at_this_server(client):
    """/boot.ipxe chains to /ipxe on the host the machine used to reach us."""
    response = client.get("/boot.ipxe", base_url="http://10.0.0.5:8080")
    assert response.status_code == 200
    assert response.content_type == "text/plain; charset=utf-8"
    assert response.text == render_entry("http://10.0.0.5:8080/ipxe")


def test_proxy_dhcp_file_name_serves_the_same_entry_script(client):
    """/boot.ipxe.0 (what proxy-DHCP firmware asks for) is the same entry script."""
    assert client.get("/boot.ipxe.0", base_url="http://boot.lan").text == render_entry("http://boot.lan/ipxe")


def test_every_host_name_gets_its_own_entry_script(client):
    """Entry scripts are kept rendered per host name; each of many hosts still gets its own."""
    for round_ in range(2):
        for number in range(150):
            host = f"boot-{number}.lan:8080"
            assert client.get("/boot.ipxe", base_url=f"http://{host}").text == render_entry(f"http://{host}/ipxe")


def test_configured_base_url_wins_over_the_host_header(rules_path):
    """With --base-url, the entry script uses it whatever the request says."""
    app = create_app(str(rules_path), base_url="https://boot.example.com/pxe/", poll_interval=0)
    body = app.test_client().get("/boot.ipxe", base_url="http://127.0.0.1:8080").text
    assert body == render_entry("https://boot.example.com/pxe/ipxe")


def test_a_host_header_that_is_no_host_name_is_refused(client):
    """A Host header that would inject text into the entry script gets a 400, not a script."""
    response = client.get("/boot.ipxe", headers={"Host": "evil.com/x?&||shell"})
    assert response.status_code == 400
    assert "#!ipxe" not in response.text


@pytest.mark.parametrize(
    "query,rule,action",
    [
        ("mac=00:12:34:56:78:90", "lab-rescue", "chain"),
        ("mac=00-12-34-56-78-90", "lab-rescue", "chain"),
        ("mac=001234567890", "lab-rescue", "chain"),
        ("mac=0012.3456.7890", "lab-rescue", "chain"),
        ("mac=00:0C:29:AA:BB:CC", "vmware-guests", "chain"),
        ("mac=00:99:99:99:99:99", "everyone-else", "exit"),
        ("", "everyone-else", "exit"),
        ("mac=&uuid=&serial=", "everyone-else", "exit"),
    ],
)
def test_decision_names_the_rule_in_headers_and_sends_its_script(client, app, query, rule, action):
    """/ipxe answers 200 with the rule's script; headers name the rule and action."""
    response = client.get(f"/ipxe?{query}")
    assert response.status_code == 200
    assert response.text.startswith("#!ipxe\n")
    assert response.headers["X-Bootrules-Rule"] == rule
    assert response.headers["X-Bootrules-Action"] == action
    assert response.headers["Cache-Control"] == "no-store"
    snapshot = services(app).reloader.snapshot
    expected_rule = next(r for r in snapshot.ruleset.rules if r.name == rule)
    assert response.headers["X-Bootrules-Source"] == f"rules.yaml:{expected_rule.line}"  # the base name only


def test_no_rule_matching_is_an_explicit_exit_script_not_a_404(write_rules):
    """Without a catch-all, an unknown machine still gets 200 and an `exit` script."""
    path = write_rules("rules:\n  - name: only\n    match: {mac: 00:11:22:33:44:55}\n    exit: true\n")
    client = create_app(str(path), poll_interval=0).test_client()
    response = client.get("/ipxe?mac=00:11:22:33:44:66")
    assert response.status_code == 200
    assert response.text == render_no_match()
    assert response.headers["X-Bootrules-Rule"] == "(none)"


def test_hex_serial_with_query_breaking_characters_matches_exactly(write_rules):
    """A serial full of & + # and spaces, sent as :hexraw, meets its rule exactly."""
    path = write_rules(
        """
        rules:
          - name: odd-serial
            match: {serial: "S&N+1#x y"}
            chain: http://x/odd
          - name: rest
            exit: true
        """
    )
    client = create_app(str(path), poll_interval=0).test_client()
    hexed = "S&N+1#x y".encode().hex()
    assert client.get(f"/ipxe?serial_hex={hexed}").headers["X-Bootrules-Rule"] == "odd-serial"
    # What old iPXE does with :uristring splits the value; it must not match by accident.
    assert client.get("/ipxe?serial=S&N+1%23x").headers["X-Bootrules-Rule"] == "rest"
    # A person typing the value with curl can URL-encode it instead.
    assert client.get("/ipxe?serial=S%26N%2B1%23x%20y").headers["X-Bootrules-Rule"] == "odd-serial"


@pytest.mark.parametrize(
    "query,reason",
    [
        ("mac=not-a-mac", "mac: 'not-a-mac' is not a MAC address"),
        ("uuid=xyz", "uuid: 'xyz' is not a UUID"),
        ("ip=300.1.1.1", "ip: '300.1.1.1' is not an IP address"),
        ("serial_hex=zz", "serial_hex: 'zz' is not hex"),
    ],
)
def test_a_value_that_cannot_be_what_it_claims_gets_a_one_line_400(client, query, reason):
    """Malformed values are refused with 400 and one line saying why."""
    response = client.get(f"/ipxe?{query}")
    assert response.status_code == 400
    assert response.text.startswith(reason)
    assert response.text.count("\n") == 1


def test_client_input_never_reaches_the_script(client):
    """Whatever a request carries, the script is one of the rules' own scripts."""
    hostile = "mca=${shell}&serial=%0Ashell%0A&product=||%20shell&hostname_hex=0a7368656c6c0a"
    response = client.get(f"/ipxe?{hostile}")
    assert response.status_code == 200
    assert "shell" not in response.text
    assert response.headers["X-Bootrules-Ignored"] == "mca"


def test_unknown_paths_and_methods_get_plain_one_line_errors(client):
    """404 and 405 are one plain line, not an HTML page."""
    missing = client.get("/nope")
    assert missing.status_code == 404 and missing.text == "404 Not Found\n"
    assert client.post("/ipxe").status_code == 405


def test_healthz_reports_rule_count_and_load_time(client):
    """/healthz is 200 with the number of rules and when they were loaded."""
    response = client.get("/healthz")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok" and body["rules"] == 3 and body["reload_error"] is None
    assert body["loaded_at"].endswith("+00:00")


def test_healthz_shows_a_broken_edit_while_the_old_rules_keep_serving(app, client, rules_path):
    """After a bad edit: still 200 and the old rules, plus the file:line errors."""
    rules_path.write_text("rules:\n  - name: broken\n    match: {mac: nope}\n    exit: true\n")
    assert services(app).reloader.reload() is False
    body = client.get("/healthz").get_json()
    assert body["status"] == "degraded" and body["rules"] == 3
    assert body["reload_error"] == ["rules.yaml:3: rule 'broken': match mac: 'nope' is not a MAC address (expected e.g. 00:11:22:33:44:55, 00-11-22-33-44-55, 0011.2233.4455 or 001122334455)"]
    assert client.get("/ipxe?mac=00:12:34:56:78:90").headers["X-Bootrules-Rule"] == "lab-rescue"


def test_starting_on_a_broken_file_serves_exit_and_reports_503(write_rules):
    """With no valid rules ever loaded, machines are sent on (exit) and /healthz is 503."""
    path = write_rules("rules:\n  - name: x\n")
    client = create_app(str(path), poll_interval=0).test_client()
    assert client.get("/ipxe?mac=00:12:34:56:78:90").text == render_no_match()
    health = client.get("/healthz")
    assert health.status_code == 503
    assert json.loads(health.text)["status"] == "no-rules"


# ------------------------------------------------------------------ reverse proxies

CLIENT_RULES = """
rules:
  - name: from-lab
    match: {client: 10.9.0.0/16}
    chain: http://x/lab
  - name: rest
    exit: true
"""


def test_forwarded_headers_are_believed_only_from_trusted_proxies(write_rules):
    """X-Forwarded-* changes the client address and entry URL only when the peer is trusted."""
    path = write_rules(CLIENT_RULES)
    forwarded = {
        "X-Forwarded-For": "10.9.1.2",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "boot.example.com",
        "X-Forwarded-Prefix": "/pxe",
    }
    trusting = create_app(str(path), trusted_proxies=["127.0.0.1"], poll_interval=0).test_client()
    answer = trusting.get("/ipxe", headers=forwarded, environ_base={"REMOTE_ADDR": "127.0.0.1"})
    assert answer.headers["X-Bootrules-Rule"] == "from-lab"
    entry = trusting.get("/boot.ipxe", headers=forwarded, environ_base={"REMOTE_ADDR": "127.0.0.1"})
    assert entry.text == render_entry("https://boot.example.com/pxe/ipxe")

    untrusting = create_app(str(path), poll_interval=0).test_client()
    answer = untrusting.get("/ipxe", headers=forwarded, environ_base={"REMOTE_ADDR": "127.0.0.1"})
    assert answer.headers["X-Bootrules-Rule"] == "rest"
    entry = untrusting.get("/boot.ipxe", headers=forwarded, base_url="http://127.0.0.1:8080")
    assert entry.text == render_entry("http://127.0.0.1:8080/ipxe")


def test_the_client_is_the_last_address_a_trusted_proxy_did_not_add(write_rules):
    """A client cannot spoof its address by prepending to X-Forwarded-For."""
    path = write_rules(CLIENT_RULES)
    client = create_app(str(path), trusted_proxies=["127.0.0.1", "10.8.0.0/16"], poll_interval=0).test_client()
    headers = {"X-Forwarded-For": "10.9.1.2, 192.168.5.5, 10.8.0.1"}
    answer = client.get("/ipxe", headers=headers, environ_base={"REMOTE_ADDR": "127.0.0.1"})
    assert answer.headers["X-Bootrules-Rule"] == "rest"  # 192.168.5.5 is the real client
