"""The status page and the API (bootrules/ui.py): who may see them, what they show, and that
nothing a machine sent can run or leak a secret."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.parse

import pytest

from app import create_app
from support import BootrulesServer, free_port, http_get
from bootrules.services import services

RULES = """
rules:
  - name: db01-iscsi
    match: {mac: "00:11:22:33:44:55"}
    set:
      username: db01
      password: {secret: true, value: "S3cret-CHAP-pass"}
    sanboot: iscsi:10.0.0.5::::iqn.2026-01.com.example:db01
  - name: install-debian
    match: {mac: "52:54:00:12:34:*"}
    once: true
    boot:
      kernel: http://mirror.example.com/linux
      args: bootrules.done=${bootrules-done}
  - name: never-asked
    match: {serial: "nobody"}
    exit: true
  - name: everyone-else
    exit: true
"""
HOSTILE = "<script>alert(1)</script>"
ADMIN = {"REMOTE_ADDR": "127.0.0.1"}


def hexed(text: str) -> str:
    return text.encode().hex()


@pytest.fixture
def lab(write_rules, tmp_path, monkeypatch):
    def make(**environment: str):
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        app = create_app(str(write_rules(RULES)), poll_interval=0)
        made.append(app)
        return app, app.test_client()

    made: list = []
    yield make
    for app in made:
        services(app).stop()


def get(client, path: str, peer: str) -> tuple[int, str]:
    with client.get(path, environ_base={"REMOTE_ADDR": peer}) as response:
        return response.status_code, response.get_data(as_text=True)


def booted(app, client, *queries: str) -> None:
    for query in queries:
        assert client.get("/ipxe?" + query).status_code == 200
    services(app).recorder.flush()


def test_pages_answer_this_host_and_admin_networks_only(lab):
    """The pages and the API answer this host and --admin-allow networks, and 403 anyone else."""
    app, client = lab(BOOTRULES_ADMIN_ALLOW="10.9.0.0/16")
    booted(app, client, "mac=52:54:00:99:00:01&serial_hex=" + hexed("SN-SECRET-SIGHTING"))
    for path in ("/ui/", "/ui/machines", "/ui/machines/mac:52:54:00:99:00:01", "/api/machines",
                 "/api/machines/mac:52:54:00:99:00:01", "/ui/static/ui.css"):
        for outsider in ("10.0.0.1", "127.0.0.2", "::ffff:10.8.0.1"):
            status, body = get(client, path, outsider)
            assert status == 403 and "sn-secret-sighting" not in body, (path, outsider)
        for insider in ("127.0.0.1", "10.9.3.4", "::1"):
            assert get(client, path, insider)[0] == 200, (path, insider)
    # The boot endpoints stay open to everyone.
    assert client.get("/ipxe?mac=52:54:00:99:00:02", environ_base={"REMOTE_ADDR": "10.0.0.1"}).status_code == 200


def test_behind_a_proxy_the_real_client_is_judged(lab):
    """Behind a trusted proxy, the client it names is judged, not the proxy."""
    app, client = lab(BOOTRULES_TRUSTED_PROXIES="127.0.0.1")
    through = {"REMOTE_ADDR": "127.0.0.1"}
    assert client.get("/ui/", environ_base=through, headers={"X-Forwarded-For": "10.0.0.7"}).status_code == 403
    app2, client2 = lab(BOOTRULES_TRUSTED_PROXIES="127.0.0.1", BOOTRULES_ADMIN_ALLOW="10.0.0.0/24")
    assert client2.get("/ui/", environ_base=through, headers={"X-Forwarded-For": "10.0.0.7"}).status_code == 200


def test_a_proxy_bootrules_does_not_trust_gets_nothing(lab):
    """nginx on the same host, but no --trusted-proxy: every request would look local."""
    _app, client = lab()
    refused = client.get("/api/machines", environ_base=ADMIN, headers={"X-Forwarded-For": "203.0.113.9"})
    assert refused.status_code == 403 and "--trusted-proxy" in refused.get_data(as_text=True)


def test_a_hostile_serial_is_text_everywhere_and_no_page_may_run_a_script(lab):
    """A serial holding HTML is shown as text on every page, and the pages forbid every script."""
    app, client = lab()
    product = hexed('a"b<i>x</i>')
    booted(app, client, f"mac=52:54:00:66:00:01&serial_hex={hexed(HOSTILE)}&product_hex={product}")
    for path in ("/ui/", "/ui/machines", "/ui/machines?q=%3Cscript", "/ui/machines/mac:52:54:00:66:00:01"):
        response = client.get(path, environ_base=ADMIN)
        body = response.get_data(as_text=True)
        assert "<script" not in body.lower() and "<i>" not in body, path
        assert "script-src" not in response.headers["Content-Security-Policy"]  # default-src 'none': no script
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    page = client.get("/ui/machines/mac:52:54:00:66:00:01", environ_base=ADMIN).get_data(as_text=True)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert not re.search(r'href="[^"]*(script|alert)', page)  # never a link target
    api = client.get("/api/machines/mac:52:54:00:66:00:01", environ_base=ADMIN)
    assert api.content_type == "application/json" and api.json["facts"]["serial"] == HOSTILE


def test_no_secret_appears_on_any_page_or_in_the_api(lab):
    """No CHAP password or token appears on a page or in the API."""
    app, client = lab()
    answer = client.get("/ipxe?mac=52:54:00:12:34:56").get_data(as_text=True)
    token = re.search(r"/done/([A-Za-z0-9_-]{32})", answer).group(1)
    booted(app, client, "mac=00:11:22:33:44:55")
    shown = "".join(client.get(path, environ_base=ADMIN).get_data(as_text=True) for path in (
        "/ui/", "/ui/machines", "/ui/machines/mac:52:54:00:12:34:56", "/ui/machines/mac:00:11:22:33:44:55",
        "/api/machines", "/api/machines/mac:52:54:00:12:34:56"))
    assert token not in shown and token[:6] not in shown
    assert "S3cret-CHAP-pass" not in shown
    assert "install-debian: armed" in shown  # the once: state is shown, without its token


def test_the_overview_shows_rules_hits_never_hit_rules_and_the_reload_error(lab, write_rules):
    """The overview lists each rule with its hits, marks rules never hit, and shows a broken edit's
    file:line."""
    app, client = lab()
    booted(app, client, "mac=00:11:22:33:44:55", "mac=00:11:22:33:44:55", "mac=aa:bb:cc:00:00:01")
    page = client.get("/ui/", environ_base=ADMIN).get_data(as_text=True)
    rows = {name: row for name, row in re.findall(r'<tr[^>]*>\s*<td class="num">\d+</td>\s*<td><a [^>]*>([^<]+)</a>'
                                                  r'(.*?)</tr>', page, re.S)}
    assert '<td class="num">2</td>' in rows["db01-iscsi"] and "never hit" in rows["never-asked"]
    assert '<td class="num">1</td>' in rows["everyone-else"]
    assert len(re.findall(r'<rect class="a-', page)) >= 2  # this minute's bar: sanboot and exit
    write_rules(RULES.replace("match: {serial: \"nobody\"}", "match: {serail: nobody}"))
    assert not services(app).reloader.reload()
    page = client.get("/ui/", environ_base=ADMIN).get_data(as_text=True)
    assert "The rules file does not load" in page and re.search(r"rules\.yaml:\d+: rule &#39;never-asked&#39;", page)


def test_ui_without_its_slash_is_sent_to_the_page(lab):
    """/ui redirects to ui/, relative, so a proxy's prefix is kept."""
    _app, client = lab()
    response = client.get("/ui", environ_base=ADMIN)
    assert response.status_code in (301, 302, 308) and response.headers["Location"].endswith("ui/")


def test_the_api_pages_and_filters(lab):
    """The API pages and filters like the page; bad numbers take their defaults."""
    app, client = lab()
    booted(app, client, *[f"mac=aa:bb:cc:00:00:{n:02x}" for n in range(30)], "mac=00:11:22:33:44:55")
    first = client.get("/api/machines?per_page=20", environ_base=ADMIN).json
    assert (first["total"], first["pages"], len(first["machines"])) == (31, 2, 20)
    second = client.get("/api/machines?per_page=20&page=2", environ_base=ADMIN).json
    assert len(second["machines"]) == 11
    assert client.get("/api/machines?unknown=1", environ_base=ADMIN).json["total"] == 30
    assert client.get("/api/machines?rule=db01-iscsi", environ_base=ADMIN).json["total"] == 1
    assert client.get("/api/machines?q=aa:bb:cc:00:00:1", environ_base=ADMIN).json["total"] == 14  # :10 to :1d
    assert client.get("/api/machines?page=x&per_page=-3", environ_base=ADMIN).status_code == 200  # defaults
    assert client.get("/api/machines/mac:00:00:00:00:00:00", environ_base=ADMIN).status_code == 404
    machines_page = client.get("/ui/machines?unknown=1&per_page=10&page=2", environ_base=ADMIN).get_data(as_text=True)
    assert "page 2 of 3" in machines_page and machines_page.count('class="unknown"') == 10


def test_the_preview_url_on_a_machine_page_asks_as_the_machine_did(lab):
    """A machine's preview URL, fetched, is answered by the rule that answered the machine."""
    app, client = lab()
    booted(app, client, "mac=00:0c:29:00:00:01&serial_hex=" + hexed("Kiosk 7 &+#%") + "&platform=efi")
    detail = client.get("/api/machines/mac:00:0c:29:00:00:01", environ_base=ADMIN).json
    url = urllib.parse.urlsplit(detail["preview_url"])
    again = client.get(f"{url.path}?{url.query}")
    assert again.headers["X-Bootrules-Rule"] == "everyone-else"
    services(app).recorder.flush()
    facts = client.get("/api/machines/mac:00:0c:29:00:00:01", environ_base=ADMIN).json["facts"]
    assert facts == detail["facts"] and facts["serial"] == "kiosk 7 &+#%"


def test_a_client_outside_admin_allow_gets_403_on_a_real_socket(write_rules, tmp_path):
    """The server listens on 127.0.0.1; a client that connects from 127.0.0.2 is not this host's
    own address: 403 and no data. From 127.0.0.1, or a network given to --admin-allow: the page."""
    rules = write_rules(RULES)
    port = free_port()
    with BootrulesServer(rules, port, tmp_path / "server.log", args=("--admin-allow", "127.0.0.3/32")) as server:
        http_get(f"{server.url}/ipxe?mac=52:54:00:77:00:01&serial_hex={hexed('REAL-SOCKET-SERIAL')}")

        def get_from(source: str, path: str) -> tuple[int, str]:
            with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as sock:
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            return int(head.split()[1]), body.decode(errors="replace")

        for path in ("/ui/machines", "/api/machines"):
            status, body = get_from("127.0.0.2", path)
            assert status == 403 and "real-socket-serial" not in body
        deadline = time.monotonic() + 10
        while "real-socket-serial" not in get_from("127.0.0.1", "/api/machines")[1] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "real-socket-serial" in get_from("127.0.0.1", "/api/machines")[1]
        status, body = get_from("127.0.0.3", "/api/machines")
        assert status == 200 and json.loads(body)["total"] == 1


# --------------------------------------------------------------------------- round 3


@pytest.mark.parametrize("host, status", [
    ("attacker.example", 421), ("attacker.example:8080", 421), ("localhost", 200), ("localhost:8080", 200),
    ("127.0.0.1:8080", 200), ("[::1]:8080", 200), ("10.1.2.3", 200), ("boot.example.com", 200),
    ("pxe.example.com", 200), ("PXE.Example.COM:80", 200),
])
def test_pages_answer_only_to_a_host_name_of_this_server(lab, host, status):
    """DNS rebinding: a page on a domain pointed at this server reaches it with that domain in
    Host; /ui/ and /api/ answer addresses, localhost, --base-url's host and --admin-host names only."""
    _app, client = lab(BOOTRULES_BASE_URL="http://boot.example.com", BOOTRULES_ADMIN_HOSTS="pxe.example.com")
    for path in ("/ui/", "/api/machines"):
        assert client.get(path, headers={"Host": host}, environ_base=ADMIN).status_code == status, path
    assert client.get("/ipxe?mac=52:54:00:00:00:01", headers={"Host": host}).status_code == 200  # boots: any Host


def test_a_page_number_past_any_listing_is_a_clear_400(lab):
    """A page number past any listing is a 400 that says so, not a traceback."""
    app, client = lab()
    booted(app, client, "mac=52:54:00:00:00:01")
    for path in ("/api/machines?page=9223372036854775807", "/ui/machines?page=99999999999"):
        response = client.get(path, environ_base=ADMIN)
        assert response.status_code == 400 and "page must be at most" in response.get_data(as_text=True), path


@pytest.mark.parametrize("serial", ["\x1b]0;owned\x07", "\x1b[2J\x1b[31mred", "abc\u202edcba", "\u2066x\u2069"])
def test_terminal_and_bidi_controls_a_machine_sent_are_shown_written_out(lab, serial):
    """An ESC sequence or U+202E in a serial: the page shows `\\x1b`, `\\u202e`, never the character."""
    app, client = lab()
    booted(app, client, "mac=52:54:00:00:00:07&serial_hex=" + hexed(serial))
    for path in ("/ui/machines", "/ui/machines/mac:52:54:00:00:00:07"):
        page = client.get(path, environ_base=ADMIN).get_data(as_text=True)
        assert not any(char in page for char in "\x1b\x07\u202e\u2066\u2069"), path
        written = "".join(char if char.isprintable() else f"\\x{ord(char):02x}" if ord(char) < 256
                          else f"\\u{ord(char):04x}" for char in serial.casefold())
        assert written.replace("<", "&lt;") in page, path


def test_the_public_health_check_names_the_failing_part_but_not_the_database(lab, tmp_path):
    """/healthz says which store is failing to anyone; its error text (which may name the
    database's address) only to those who may see the status page."""
    _app, client = lab(BOOTRULES_STATE=f"postgresql://bootrules:pw@127.0.0.1:{free_port()}/x")
    client.get("/ipxe?mac=52:54:00:12:34:56")
    public = client.get("/healthz", environ_base={"REMOTE_ADDR": "10.9.9.9"}).get_json()
    assert public["status"] == "degraded" and public["state"] == {"store": "postgresql", "status": "error"}
    assert "127.0.0.1" not in json.dumps(public)
    admin = client.get("/healthz", environ_base=ADMIN).get_json()
    assert "127.0.0.1" in admin["state"]["error"]
