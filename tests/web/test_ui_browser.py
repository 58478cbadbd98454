"""The status page in a real browser: Debian's headless Chromium, driven through chromedriver,
reading what a person would see on pages served by a real bootrules after real /ipxe requests.

Screenshots go to tests/artifacts/ (or $BOOTRULES_ARTIFACTS); with BOOTRULES_UPDATE_SCREENSHOTS=1
the overview and machines pages are also written to docs/ for the README.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import IN_CI, ROOT, BootrulesServer, free_port, http_get, require_tool, wait_until

pytestmark = pytest.mark.browser

HOSTILE = "<script>alert(1)</script>"
ARTIFACTS = Path(os.environ.get("BOOTRULES_ARTIFACTS", ROOT / "tests" / "artifacts"))
# Real-looking machines for the bundled rules.yaml: (MAC, serial, product, manufacturer, platform).
MACHINES = [
    ("00:12:34:56:78:90", "LAB-0001", "ProLiant DL360 Gen10", "HPE", "pcbios"),
    ("00:11:22:33:44:55", "DB01-A", "PowerEdge R750", "Dell Inc.", "efi"),
    *[(f"f4:ee:08:1c:20:{n:02x}", f"7QX{n:02d}K3", "PowerEdge R650", "Dell Inc.", "efi") for n in range(1, 9)],
    ("00:0c:29:4f:8e:35", "VMware-56 4d 1c 8e", "VMware7,1", "VMware, Inc.", "efi"),
    ("00:0c:29:a1:b2:c3", "VMware-56 4d 77 01", "VMware7,1", "VMware, Inc.", "pcbios"),
    ("3c:ec:ef:12:9a:01", "S41299X", "SYS-1029P-WTR", "Supermicro", "efi"),  # no rule names it: unknown
    ("52:54:00:6b:3c:58", HOSTILE, "Standard PC (Q35 + ICH9, 2009)", "QEMU", "pcbios"),  # unknown, hostile
]


def hexed(text: str) -> str:
    return text.encode().hex()


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        if IN_CI:
            raise
        pytest.skip("selenium is not installed (pip install -r tests/requirements.txt)")
    chromium = require_tool("chromium", "Debian's chromium package")
    driver_path = require_tool("chromedriver", "Debian's chromium-driver package")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,860", "--hide-scrollbars", "--force-device-scale-factor=1",
                     "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(30)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """bootrules on the bundled rules.yaml, after every machine of MACHINES has booted."""
    work = tmp_path_factory.mktemp("ui")
    rules = work / "rules.yaml"
    shutil.copy(ROOT / "rules.yaml", rules)
    # Run from its directory, so the pages show the names an operator would see.
    server = BootrulesServer(Path("rules.yaml"), free_port(), work / "server.log", cwd=work,
                             args=("--workers", "2", "--state", "bootrules-state.db")).start()
    try:
        for mac, serial, product, manufacturer, platform in MACHINES:
            query = (f"mac={mac}&serial_hex={hexed(serial)}&product_hex={hexed(product)}"
                     f"&manufacturer_hex={hexed(manufacturer)}&platform={platform}&buildarch=x86_64")
            assert http_get(f"{server.url}/ipxe?{query}")[0] == 200
        http_get(f"{server.url}/ipxe?mac=00:11:22:33:44:55&platform=efi")  # db01 again

        def all_recorded() -> bool:
            return json.loads(http_get(f"{server.url}/api/machines")[2])["total"] == len(MACHINES)

        assert wait_until(all_recorded, timeout=10), server.log()
        yield server, rules
    finally:
        server.stop()


def shoot(driver, name: str, readme: bool = False) -> None:
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    if readme and os.environ.get("BOOTRULES_UPDATE_SCREENSHOTS") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(path, ROOT / "docs" / f"{name}.png")


def visible_rows(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [row.text for row in driver.find_elements(By.CSS_SELECTOR, "table.machines tbody tr")]


def no_script_ran(driver) -> bool:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    try:
        driver.switch_to.alert
    except NoAlertPresentException:
        return not driver.find_elements(By.TAG_NAME, "script")
    return False


def test_the_overview_shows_each_rule_its_hits_and_the_decisions_chart(browser, served):
    """In Chromium, the overview shows each rule, its hits and the decisions chart."""
    from selenium.webdriver.common.by import By

    server, _rules = served
    browser.get(f"{server.url}/ui/")
    cards = browser.find_element(By.CSS_SELECTOR, ".cards").text
    assert "RULES\n7\nrules.yaml\n" in cards and "MACHINES SEEN\n14\n2 unknown" in cards
    rows = {row.find_elements(By.TAG_NAME, "td")[1].text: row.text
            for row in browser.find_elements(By.CSS_SELECTOR, "table.rules tbody tr")}
    assert rows["dell-uefi-installer"].endswith(" 8") and rows["db01-iscsi"].endswith(" 2")
    assert rows["diskless-kiosk"].endswith("NEVER HIT") and rows["test-rack"].endswith("NEVER HIT")
    assert rows["everyone-else"].endswith(" 2")
    assert browser.find_elements(By.CSS_SELECTOR, "svg.chart rect.a-boot")
    assert "change-me" not in browser.page_source  # the CHAP password of db01-iscsi
    shoot(browser, "overview", readme=True)


def test_the_machines_page_lists_unknown_machines_and_its_filters_work(browser, served):
    """In Chromium, the machines page marks unknown machines and its filters narrow the list."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    server, _rules = served
    browser.get(f"{server.url}/ui/machines")
    rows = visible_rows(browser)
    assert len(rows) == len(MACHINES)
    assert rows[0].startswith("") and any("52:54:00:6b:3c:58 UNKNOWN" in row for row in rows)
    hostile = [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, "table.machines td")
               if cell.text == HOSTILE]
    assert hostile == [HOSTILE] and no_script_ran(browser)  # shown as text, run nowhere
    shoot(browser, "machines", readme=True)

    browser.find_element(By.NAME, "unknown").click()
    browser.find_element(By.CSS_SELECTOR, ".filters button").click()
    assert wait_until(lambda: "unknown=1" in browser.current_url, timeout=5)
    rows = visible_rows(browser)
    assert len(rows) == 2 and all("UNKNOWN" in row for row in rows)
    assert {row.split()[3] for row in rows} == {"3c:ec:ef:12:9a:01", "52:54:00:6b:3c:58"}

    browser.get(f"{server.url}/ui/machines")
    Select(browser.find_element(By.NAME, "rule")).select_by_visible_text("dell-uefi-installer")
    browser.find_element(By.CSS_SELECTOR, ".filters button").click()
    assert wait_until(lambda: "rule=dell-uefi-installer" in browser.current_url, timeout=5)
    rows = visible_rows(browser)
    assert len(rows) == 8 and all("dell-uefi-installer boot" in row for row in rows)

    browser.get(f"{server.url}/ui/machines")
    search = browser.find_element(By.NAME, "q")
    search.send_keys("7qx05")
    search.submit()
    assert wait_until(lambda: "q=7qx05" in browser.current_url, timeout=5)
    rows = visible_rows(browser)
    assert len(rows) == 1 and "f4:ee:08:1c:20:05" in rows[0]


def test_an_unknown_machines_rule_to_paste_passes_check_and_then_answers_it(browser, served, tmp_path):
    """The rule to paste, copied from the browser, passes check and then answers that machine."""
    from selenium.webdriver.common.by import By

    server, rules = served
    browser.get(f"{server.url}/ui/machines?unknown=1")
    browser.find_element(By.LINK_TEXT, "3c:ec:ef:12:9a:01").click()
    assert wait_until(lambda: "/ui/machines/mac:3c:ec:ef:12:9a:01" in browser.current_url, timeout=5)
    snippet = browser.find_element(By.CSS_SELECTOR, ".paste pre").text
    assert snippet.splitlines()[0] == "  - name: sys-1029p-wtr-s41299x"  # indented to go under rules:
    curl = [pre.text for pre in browser.find_elements(By.TAG_NAME, "pre") if pre.text.startswith("curl ")]
    assert curl and no_script_ran(browser)
    shoot(browser, "machine")

    # Pasted into a copy of the rules above the catch-all, its action filled in:
    filled = snippet.replace("exit: true  # placeholder", "chain: http://pxe.example.com/supermicro.ipxe  #")
    text = rules.read_text().replace("  # Everyone else boots", filled + "\n\n  # Everyone else boots")
    pasted = tmp_path / "rules.yaml"
    pasted.write_text(text)
    checked = subprocess.run([sys.executable, str(ROOT / "app.py"), "check", "--strict", str(pasted)],
                             capture_output=True, text=True, cwd=ROOT)
    assert checked.returncode == 0, checked.stderr
    preview = subprocess.run([sys.executable, str(ROOT / "app.py"), "preview", "--rules", str(pasted),
                              "--mac", "3c:ec:ef:12:9a:01"], capture_output=True, text=True, cwd=ROOT)
    assert "rule 'sys-1029p-wtr-s41299x'" in preview.stderr and "supermicro.ipxe" in preview.stdout

    # The curl command on the page asks as the machine did.
    url = curl[0].split("'")[1]
    assert http_get(url)[1]["X-Bootrules-Rule"] == "everyone-else"


def test_a_broken_edit_shows_its_file_and_line_on_the_overview(browser, served):
    """In Chromium, a broken edit shows its file:line on the overview."""
    from selenium.webdriver.common.by import By

    server, rules = served
    good = rules.read_text()
    try:
        rules.write_text(good.replace("    match: {ip: 10.20.30.0/24", "    match: {ipp: 10.20.30.0/24"))
        assert wait_until(lambda: json.loads(http_get(server.url + "/healthz")[2])["reload_error"], timeout=10)
        browser.get(f"{server.url}/ui/")
        error = browser.find_element(By.CSS_SELECTOR, ".panel.error").text
        assert "The rules file does not load".upper() in error.upper()
        line = next(number for number, text in enumerate(good.splitlines(), 1) if "match: {ip: 10.20.30.0/24" in text)
        assert f"rules.yaml:{line}:" in error and "ipp" in error
        assert "FAILED" in browser.find_element(By.CSS_SELECTOR, ".cards").text.upper()
        shoot(browser, "overview-reload-error")
    finally:
        rules.write_text(good)
        time.sleep(0)
    assert wait_until(lambda: not json.loads(http_get(server.url + "/healthz")[2])["reload_error"], timeout=10)
