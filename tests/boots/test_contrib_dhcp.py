"""contrib/ DHCP and TFTP files, run by the real daemons inside network namespaces.

For each of dnsmasq, dnsmasq in proxy mode, ISC dhcpd and Kea, the daemon is started on
the contrib file with only its placeholders substituted. A scripted client then asks the
way each kind of firmware asks, and the test checks the boot file and next-server it gets
and fetches that file over TFTP, comparing it byte for byte with the file served.
Everything runs in namespaces joined by a bridge that the test creates and deletes.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from support import contrib, require_root, require_tool
from netlab import NetLab

pytestmark = pytest.mark.netns

SERVER = "10.99.0.1"
ROUTER = "10.99.0.254"
BOOTRULES_URL = f"http://{SERVER}:8080"
IPXE_DIR = Path("/usr/lib/ipxe")

# (client kind, option 93 architecture) -> the boot file it must get.
CLIENTS = [
    pytest.param("pxe", 0, "undionly.kpxe", id="bios-pxe"),
    pytest.param("pxe", 7, "ipxe.efi", id="uefi-x64-arch7"),
    pytest.param("pxe", 9, "ipxe.efi", id="uefi-x64-arch9"),
    pytest.param("pxe", 11, "arm64/ipxe.efi", id="uefi-arm64"),
    pytest.param("ipxe", 0, f"{BOOTRULES_URL}/boot.ipxe", id="ipxe-bios"),
    pytest.param("ipxe", 7, f"{BOOTRULES_URL}/boot.ipxe", id="ipxe-uefi"),
    pytest.param("gpxe", 0, f"{BOOTRULES_URL}/boot.ipxe", id="gpxe"),
    pytest.param("ipxe-175-only", 0, f"{BOOTRULES_URL}/boot.ipxe", id="ipxe-option-175-only"),
    pytest.param("other-user-class", 0, "undionly.kpxe", id="pxe-with-another-user-class"),
]


def boot_file(packet: dict) -> str:
    return packet["option_67"] or packet["file"]


@pytest.fixture(scope="module")
def tftp_root():
    """A world-readable TFTP root (daemons drop to unprivileged users) with the iPXE files."""
    for name in ("undionly.kpxe", "ipxe.efi"):
        if not (IPXE_DIR / name).exists():
            require_tool(str(IPXE_DIR / name), "from Debian's ipxe package")
    root = Path(tempfile.mkdtemp(prefix="bootrules-tftp-"))
    root.chmod(0o755)
    shutil.copy(IPXE_DIR / "undionly.kpxe", root)
    shutil.copy(IPXE_DIR / "ipxe.efi", root)
    (root / "arm64").mkdir(mode=0o755)
    # Debian ships no arm64 iPXE; a stand-in file proves the path and the transfer.
    (root / "arm64" / "ipxe.efi").write_bytes(b"arm64 iPXE stand-in\n" * 4000)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield root
    shutil.rmtree(root)


class Network:
    """A lab running one DHCP setup: the server (and router) namespaces plus a client."""

    def __init__(self, lab: NetLab, tftp_root: Path) -> None:
        self.lab = lab
        self.tftp_root = tftp_root
        self.server = lab.host("srv", SERVER)
        self.client = lab.host("cli")
        self.daemon_log = ""

    def wait_for(self, log_name: str, pattern: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.lab.log(log_name)):
            assert time.monotonic() < deadline, f"{log_name} never showed {pattern!r}:\n{self.lab.log(log_name)}"
            time.sleep(0.1)


def start_dnsmasq(net: Network, config: str, name: str) -> None:
    work = net.lab.workdir
    (work / f"{name}.conf").write_text(config)
    net.lab.start(net.server, [
        "dnsmasq", "--keep-in-foreground", f"--conf-file={work / name}.conf", "--log-facility=-", "--log-dhcp",
        f"--dhcp-leasefile={work / name}.leases", f"--pid-file={work / name}.pid",
    ], f"{name}.log")
    net.daemon_log = f"{name}.log"
    net.wait_for(f"{name}.log", r"started, version|DHCP, proxy on subnet|DHCP, IP range")


def dnsmasq_full(net: Network, reorder: bool = False) -> None:
    config = contrib("dnsmasq.conf", INTERFACE="eth0", RANGE_START="10.99.0.100", RANGE_END="10.99.0.200",
                     NETMASK="255.255.255.0", ROUTER=ROUTER, TFTP_ROOT=str(net.tftp_root), BOOTRULES_URL=BOOTRULES_URL)
    if reorder:  # same lines, opposite order: the answers must not change
        lines = config.splitlines()
        boots = [line for line in lines if line.startswith(("dhcp-boot", "dhcp-match", "dhcp-userclass"))]
        rest = [line for line in lines if line not in boots]
        config = "\n".join(rest + boots[::-1]) + "\n"
    start_dnsmasq(net, config, "dnsmasq")


def dnsmasq_proxy(net: Network) -> None:
    # The DHCP server the user does not control: it leases addresses and knows nothing of PXE.
    router = net.lab.host("rtr", ROUTER)
    work = net.lab.workdir
    net.lab.start(router, [
        "dnsmasq", "--keep-in-foreground", "--port=0", "--interface=eth0", "--bind-interfaces", "--no-ping",
        "--dhcp-range=10.99.0.100,10.99.0.200,1h", "--log-facility=-", f"--dhcp-leasefile={work}/router.leases",
        f"--pid-file={work}/router.pid",
    ], "router.log")
    config = contrib("dnsmasq-proxy.conf", INTERFACE="eth0", NETWORK="10.99.0.0", TFTP_ROOT=str(net.tftp_root),
                     BOOTRULES_URL=BOOTRULES_URL)
    start_dnsmasq(net, config, "dnsmasq-proxy")


def tftpd(net: Network) -> None:
    """tftpd-hpa started as contrib/tftpd-hpa (the Debian defaults file) tells it to."""
    defaults = contrib("tftpd-hpa", TFTP_ROOT=str(net.tftp_root))
    settings = dict(re.findall(r'^(TFTP_\w+)="(.*)"$', defaults, re.M))
    address = settings["TFTP_ADDRESS"]
    net.lab.start(net.server, [
        "in.tftpd", "--foreground", "--listen", "--user", settings["TFTP_USERNAME"], "--address", address,
        *settings["TFTP_OPTIONS"].split(), settings["TFTP_DIRECTORY"],
    ], "tftpd.log")


def isc_dhcpd(net: Network) -> None:
    require_tool("dhcpd", "from Debian's isc-dhcp-server package")
    require_tool("in.tftpd", "from Debian's tftpd-hpa package")
    work = net.lab.workdir
    config = contrib("dhcpd.conf", SUBNET="10.99.0.0", NETMASK="255.255.255.0", RANGE_START="10.99.0.100",
                     RANGE_END="10.99.0.200", ROUTER=ROUTER, TFTP_SERVER=SERVER, BOOTRULES_URL=BOOTRULES_URL)
    (work / "dhcpd.conf").write_text(config)
    (work / "dhcpd.leases").write_text("")
    net.lab.start(net.server, ["dhcpd", "-4", "-f", "-d", "-cf", str(work / "dhcpd.conf"), "-lf", str(work / "dhcpd.leases"),
                               "-pf", str(work / "dhcpd.pid"), "eth0"], "dhcpd.log")
    net.daemon_log = "dhcpd.log"
    net.wait_for("dhcpd.log", r"Sending on\s+LPF/eth0")
    tftpd(net)


def kea(net: Network) -> None:
    require_tool("kea-dhcp4", "from Debian's kea-dhcp4-server package")
    require_tool("in.tftpd", "from Debian's tftpd-hpa package")
    work = net.lab.workdir
    config = contrib("kea-dhcp4.conf", INTERFACE="eth0", SUBNET="10.99.0.0/24", RANGE_START="10.99.0.100",
                     RANGE_END="10.99.0.200", ROUTER=ROUTER, TFTP_SERVER=SERVER, BOOTRULES_URL=BOOTRULES_URL,
                     LEASE_FILE=str(work / "kea-leases4.csv"))
    (work / "kea-dhcp4.conf").write_text(config)
    os.environ["KEA_LOCKFILE_DIR"] = str(work)  # inherited by the daemon: keep its files here
    os.environ["KEA_PIDFILE_DIR"] = str(work)
    net.lab.start(net.server, ["kea-dhcp4", "-c", str(work / "kea-dhcp4.conf")], "kea.log")
    net.daemon_log = "kea.log"
    net.wait_for("kea.log", r"DHCP4_STARTED")
    tftpd(net)


SETUPS = {
    "dnsmasq": dnsmasq_full,
    "dnsmasq-reordered": lambda net: dnsmasq_full(net, reorder=True),
    "dnsmasq-proxy": dnsmasq_proxy,
    "isc-dhcpd": isc_dhcpd,
    "kea": kea,
}


@pytest.fixture(scope="module", params=sorted(SETUPS))
def network(request, tftp_root, tmp_path_factory):
    require_root("network namespaces and DHCP daemons")
    require_tool("ip", "from Debian's iproute2 package")
    require_tool("dnsmasq", "from Debian's dnsmasq-base package")
    workdir = tmp_path_factory.mktemp(request.param)
    lab = NetLab(workdir)
    try:
        net = Network(lab, tftp_root)
        net.setup = request.param
        SETUPS[request.param](net)
        yield net
    finally:
        lab.close()


@pytest.mark.parametrize("kind,arch,expected", CLIENTS)
def test_each_firmware_gets_its_boot_file_and_the_file_arrives_intact(network, kind, arch, expected, tmp_path):
    """Legacy BIOS, UEFI x64 (7 and 9), arm64, iPXE and gPXE each get the right file from the
    right server; a TFTP file then arrives byte for byte."""
    # One MAC for every kind: the lease is then reused, so servers that ping a new address
    # before offering it (dnsmasq, dhcpd) do so once, and the answer still follows the kind.
    mac = "52:54:00:42:42:42"
    reply = network.lab.dhcp(network.client, kind, arch, mac)
    log = network.lab.log(network.daemon_log)[-3000:]
    assert reply["ack"] is not None, f"no lease for {kind}/{arch}: {reply}\n{log}"
    answer = reply.get("proxy_ack") if network.setup == "dnsmasq-proxy" else reply["ack"]
    assert answer is not None, f"no boot answer: {reply}\n{log}"
    assert boot_file(answer) == expected, f"{reply}\n{log}"
    assert answer["siaddr"] == SERVER  # next-server: where the boot file lives
    if expected.startswith("http://"):
        return
    network.lab.set_address(network.client, reply["ack"]["yiaddr"])
    fetched = network.lab.tftp(network.client, answer["siaddr"], expected, tmp_path / "fetched")
    assert "error" not in fetched, fetched
    assert (tmp_path / "fetched").read_bytes() == (network.tftp_root / expected).read_bytes()
    if expected in ("undionly.kpxe", "ipxe.efi"):
        assert (tmp_path / "fetched").read_bytes() == (IPXE_DIR / expected).read_bytes()


@pytest.mark.qemu
def test_a_real_ipxe_leases_from_contrib_dnsmasq_and_reaches_bootrules(tftp_root, tmp_path):
    """The whole chain once for real: a QEMU guest's iPXE on a tap in the namespace LAN gets
    its lease from dnsmasq on contrib/dnsmasq.conf, is recognised as iPXE, fetches
    /boot.ipxe and then /ipxe?mac=<its MAC> from bootrules inside the namespace."""
    require_root("network namespaces, a tap device and a DHCP daemon")
    require_tool("qemu-system-x86_64", "from Debian's qemu-system-x86 package")
    from markers import disk_image
    from support import BootrulesServer
    from vm import Machine, boot

    mac = "52:54:00:99:00:07"
    rules = tmp_path / "rules.yaml"
    rules.write_text(f'rules:\n  - name: chain-test\n    match: {{mac: "{mac}"}}\n    exit: true\n')
    disk = tmp_path / "local.img"
    disk.write_bytes(disk_image("LOCALDISK-OK", 0x10))
    with NetLab(tmp_path) as lab:
        net = Network(lab, tftp_root)
        dnsmasq_full(net)
        server = BootrulesServer(rules, 8080, tmp_path / "bootrules.log", host=SERVER, netns=net.server).start()
        try:
            result = boot(tmp_path, "", Machine(mac=mac), disk=disk, tap=(lab.switch, lab.tap()))
        finally:
            server.stop()
        dhcp_log = lab.log(net.daemon_log)
    log = server.log()
    assert "DHCPACK(eth0) 10.99.0." in dhcp_log and mac in dhcp_log, dhcp_log[-2000:]
    assert re.search(r"tags: .*\bipxe\b", dhcp_log), "dnsmasq did not tag the guest as iPXE"
    assert "client=10.99.0." in log and f"mac={mac} rule=chain-test action=exit" in log, log + result.describe()
    assert f"Filename: {BOOTRULES_URL}/boot.ipxe" in result.screen_text(), result.describe()
    assert result.marker() == "LOCALDISK-OK", result.describe()


# --------------------------------------------------------------------------- UEFI HTTP Boot

SECURE_MAC = "52:54:00:5b:00:01"
HTTP_CLIENTS = [
    pytest.param("httpclient", 16, "52:54:00:42:42:42", f"{BOOTRULES_URL}/ipxe.efi", id="uefi-http"),
    pytest.param("httpclient", 16, SECURE_MAC, f"{BOOTRULES_URL}/shimx64.efi", id="uefi-http-secure-boot"),
    pytest.param("ipxe", 7, "52:54:00:42:42:42", f"{BOOTRULES_URL}/boot.ipxe", id="ipxe"),
    pytest.param("ipxe", 7, SECURE_MAC, f"{BOOTRULES_URL}/boot.ipxe", id="ipxe-on-a-secure-boot-machine"),
    pytest.param("pxe", 7, "52:54:00:42:42:42", None, id="pxe-gets-no-file"),
]


def dnsmasq_httpboot(net: Network) -> None:
    config = contrib("dnsmasq-httpboot.conf", INTERFACE="eth0", RANGE_START="10.99.0.100", RANGE_END="10.99.0.200",
                     NETMASK="255.255.255.0", ROUTER=ROUTER, BOOTRULES_URL=BOOTRULES_URL, SECURE_BOOT_MACS=SECURE_MAC)
    start_dnsmasq(net, config, "dnsmasq-httpboot")


def kea_httpboot(net: Network) -> None:
    require_tool("kea-dhcp4", "from Debian's kea-dhcp4-server package")
    work = net.lab.workdir
    config = contrib("kea-dhcp4-httpboot.conf", INTERFACE="eth0", SUBNET="10.99.0.0/24", RANGE_START="10.99.0.100",
                     RANGE_END="10.99.0.200", ROUTER=ROUTER, BOOTRULES_URL=BOOTRULES_URL, SECURE_BOOT_MAC=SECURE_MAC,
                     LEASE_FILE=str(work / "kea-leases4.csv"))
    (work / "kea-dhcp4-httpboot.conf").write_text(config)
    os.environ["KEA_LOCKFILE_DIR"] = str(work)
    os.environ["KEA_PIDFILE_DIR"] = str(work)
    net.lab.start(net.server, ["kea-dhcp4", "-c", str(work / "kea-dhcp4-httpboot.conf")], "kea.log")
    net.daemon_log = "kea.log"
    net.wait_for("kea.log", r"DHCP4_STARTED")


HTTP_SETUPS = {"dnsmasq-httpboot": dnsmasq_httpboot, "kea-httpboot": kea_httpboot}


@pytest.fixture(scope="module", params=sorted(HTTP_SETUPS))
def http_network(request, tmp_path_factory):
    require_root("network namespaces and DHCP daemons")
    require_tool("ip", "from Debian's iproute2 package")
    require_tool("dnsmasq", "from Debian's dnsmasq-base package")
    lab = NetLab(tmp_path_factory.mktemp(request.param))
    try:
        net = Network(lab, Path("/nonexistent"))
        net.setup = request.param
        HTTP_SETUPS[request.param](net)
        yield net
    finally:
        lab.close()


@pytest.mark.parametrize("kind,arch,mac,expected", HTTP_CLIENTS)
def test_http_boot_clients_get_a_url_and_their_vendor_class_back(http_network, kind, arch, mac, expected):
    """The firmware's HTTP Boot client gets bootrules' iPXE (or, on a Secure Boot machine, the
    shim) as a URL, with option 60 saying HTTPClient back (or it ignores the offer); iPXE
    gets the entry script; a PXE client gets no file: there is no TFTP server."""
    reply = http_network.lab.dhcp(http_network.client, kind, arch, mac)
    log = http_network.lab.log(http_network.daemon_log)[-3000:]
    assert reply["ack"] is not None, f"no lease for {kind}: {reply}\n{log}"
    answer = reply["ack"]
    if expected is None:
        assert not boot_file(answer), f"{reply}\n{log}"
        return
    assert boot_file(answer) == expected, f"{reply}\n{log}"
    offer = next(each for each in reply["offers"] if each["yiaddr"] == answer["yiaddr"])
    if kind == "httpclient":
        assert offer["vendor_class"] == "HTTPClient" and answer["vendor_class"] == "HTTPClient", reply
    else:
        assert answer["vendor_class"] != "HTTPClient", reply
