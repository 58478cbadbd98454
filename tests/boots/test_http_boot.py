"""Today's firmware, for real: OVMF's own UEFI HTTP Boot, with no TFTP server anywhere, fetches
its first program from bootrules; over IPv4 and over IPv6 only; and with Secure Boot on,
through Debian's signed shim and GRUB to Debian's signed kernel.

Each VM is on a tap in a network namespace of the test's own, with the contrib DHCP server
(dnsmasq for IPv4, Kea and radvd for IPv6) and bootrules on the namespace's bridge. The
rule boots Debian's kernel with a busybox initramfs that prints its command line on the
serial console (tests/lab/linux_guest.py), so a test sees that the rule's script ran.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import linux_guest
import uefi
from ipxe_builds import debian_build
from netlab import NetLab
from support import IN_CI, BootrulesServer, contrib, require_root, require_tool
from vm import BootResult, Machine, boot

pytestmark = pytest.mark.qemu

SERVER4 = "10.77.0.1"
SERVER6 = "fd00:77::1"
FILES_PORT = 8000
MAC = uefi.MAC


@dataclass
class Lab:
    """The namespace LAN of one test: its bridge's address, bootrules, the guest's files."""

    net: NetLab
    namespace: str
    tap: str
    server: str  # bootrules' address, as a URL host
    workdir: Path

    def url(self, path: str = "", port: int | None = None) -> str:
        return f"http://{self.server}{f':{port}' if port else ''}{path}"

    def start(self, argv: list[str], log_name: str) -> None:
        self.net.start(self.namespace, argv, log_name)

    def fetch(self, url: str, data: bytes | None = None) -> tuple[int, str]:
        """GET (or POST `data`) from inside the namespace, as a machine would."""
        code = ("import sys, urllib.request, urllib.error\n"
                "try:\n"
                f"    r = urllib.request.urlopen(urllib.request.Request({url!r}, data={data!r}), timeout=10)\n"
                "    print(r.status); print(r.read().decode())\n"
                "except urllib.error.HTTPError as e:\n"
                "    print(e.code); print(e.read().decode())\n")
        result = subprocess.run(["ip", "netns", "exec", self.namespace, sys.executable, "-c", code],
                                capture_output=True, text=True, timeout=30)
        status, _, body = result.stdout.partition("\n")
        return int(status), body


def open_lab(tmp_path: Path, family: int) -> Lab:
    require_root("the VM's tap, the DHCP server and bootrules run in a network namespace of the test's own")
    require_tool("qemu-system-x86_64", "from Debian's qemu-system-x86 package")
    net = NetLab(tmp_path)
    namespace = net.switch
    address = f"{SERVER4}/24" if family == 4 else f"{SERVER6}/64"
    subprocess.run(["ip", "-n", namespace, "addr", "add", address, "dev", "br0", *(["nodad"] if family == 6 else [])],
                   check=True)
    # A port that is up gives the bridge its carrier before the VM's tap is: Kea opens its
    # sockets once, at start, and not on an interface that is down.
    net.host("peer")
    return Lab(net, namespace, net.tap(), SERVER4 if family == 4 else f"[{SERVER6}]", tmp_path)


def serve_guest(lab: Lab, family: int) -> None:
    """Debian's kernel and the marker initramfs, from a plain file server in the namespace."""
    kernel, initrd = linux_guest.kernel_and_initramfs()
    files = lab.workdir / "guest"
    files.mkdir()
    (files / "vmlinuz").write_bytes(kernel)
    (files / "initrd.img").write_bytes(initrd)
    lab.start([sys.executable, "-m", "http.server", "--bind", SERVER4 if family == 4 else SERVER6,
               "--directory", str(files), str(FILES_PORT)], "files.log")


def linux_rule(lab: Lab, name: str, match: str, extra_args: str = "") -> str:
    return (f"  - name: {name}\n    match: {match}\n    boot:\n"
            f"      kernel: {lab.url('/vmlinuz', FILES_PORT)}\n"
            f"      initrd: {lab.url('/initrd.img', FILES_PORT)}\n"
            # initrd=: bookworm's iPXE under UEFI hands the kernel its initrd by name only
            f"      args: console=ttyS0 panic=-1 initrd=initrd.img rule={name}{extra_args}\n")


def start_dnsmasq(lab: Lab, secure_boot_macs: str = "52:54:00:ff:ff:ff") -> None:
    require_tool("dnsmasq", "from Debian's dnsmasq-base package")
    config = contrib("dnsmasq-httpboot.conf", INTERFACE="br0", RANGE_START="10.77.0.100", RANGE_END="10.77.0.200",
                     NETMASK="255.255.255.0", ROUTER=SERVER4, BOOTRULES_URL=lab.url(),
                     SECURE_BOOT_MACS=secure_boot_macs)
    assert "enable-tftp" not in config
    (lab.workdir / "dnsmasq.conf").write_text(config)
    lab.start(["dnsmasq", "--keep-in-foreground", f"--conf-file={lab.workdir / 'dnsmasq.conf'}", "--log-facility=-",
               "--log-dhcp", f"--dhcp-leasefile={lab.workdir / 'dnsmasq.leases'}",
               f"--pid-file={lab.workdir / 'dnsmasq.pid'}"], "dnsmasq.log")
    wait_for_log(lab, "dnsmasq.log", "DHCP, IP range")


def start_kea6_and_radvd(lab: Lab) -> None:
    require_tool("kea-dhcp6", "from Debian's kea-dhcp6-server package")
    require_tool("radvd", "from Debian's radvd package")
    work = lab.workdir
    (work / "radvd.conf").write_text(contrib("radvd.conf", INTERFACE="br0", PREFIX="fd00:77::/64"))
    (work / "kea-dhcp6.conf").write_text(contrib(
        "kea-dhcp6-httpboot.conf", INTERFACE="br0", PREFIX="fd00:77::/64", POOL="fd00:77::100-fd00:77::1ff",
        BOOTRULES_URL=lab.url(), LEASE_FILE=str(work / "kea-leases6.csv")))
    # radvd wants the namespace to route (it is the router here); the namespace's own setting.
    subprocess.run(["ip", "netns", "exec", lab.namespace, "sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"],
                   check=True)
    lab.start(["radvd", "--nodaemon", "--config", str(work / "radvd.conf"), "--pidfile", str(work / "radvd.pid"),
               "--logmethod", "stderr"], "radvd.log")
    wait_for_link_local(lab.namespace, "br0")
    os.environ["KEA_LOCKFILE_DIR"] = str(work)  # inherited by the daemon: its files stay here
    os.environ["KEA_PIDFILE_DIR"] = str(work)
    lab.start(["kea-dhcp6", "-c", str(work / "kea-dhcp6.conf")], "kea6.log")
    wait_for_log(lab, "kea6.log", "DHCP6_STARTED")


def wait_for_link_local(namespace: str, interface: str, timeout: float = 15) -> None:
    """Kea binds the link-local address, which is tentative for a second or two after the
    link comes up (duplicate address detection); on a loaded machine it may still be."""
    deadline = time.monotonic() + timeout
    while True:
        shown = subprocess.run(["ip", "-n", namespace, "-6", "-o", "addr", "show", "dev", interface, "scope", "link"],
                               capture_output=True, text=True, check=True).stdout
        if "fe80:" in shown and "tentative" not in shown:
            return
        assert time.monotonic() < deadline, f"{interface} has no usable link-local address: {shown!r}"
        time.sleep(0.1)


def wait_for_log(lab: Lab, name: str, text: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while text not in lab.net.log(name):
        assert time.monotonic() < deadline, f"{name} never showed {text!r}:\n{lab.net.log(name)}"
        time.sleep(0.1)


def boot_until_linux(lab: Lab, vars_file: Path, *, secure: bool = False, timeout: float = 180,
                     machine: Machine | None = None, until: str = linux_guest.MARKER) -> tuple[BootResult, str]:
    """Power the VM on; return when the serial console shows `until` on a whole line."""
    serial = lab.workdir / f"serial-{time.monotonic_ns()}.txt"

    def printed() -> str:
        return serial.read_text(errors="replace") if serial.exists() else ""

    name, flash = uefi.firmware(vars_file, secure=secure)
    # The firmware needs a moment after link-up before HTTPv6 works: the boot menu's wait gives it.
    flash = [*flash, "-boot", "menu=on,splash-time=3000"]
    result = boot(lab.workdir, "", machine or Machine(mac=MAC), tap=(lab.namespace, lab.tap), serial=serial,
                  firmware=(name, flash), nic_options=uefi.NIC_OPTIONS, memory=512, timeout=timeout,
                  stop_when=lambda: until in printed() and "\n" in printed().split(until, 1)[1])
    return result, printed()


def command_line(serial: str) -> dict[str, str]:
    line = next((text for text in serial.splitlines() if text.startswith(linux_guest.MARKER)), "")
    return dict(word.split("=", 1) for word in line.split("cmdline=", 1)[-1].split() if "=" in word)


def ipxe_dir(generation: str) -> Path:
    """The folder bootrules serves iPXE from: Debian's own package, or trixie's, unpacked."""
    if generation == "host":
        folder = Path("/usr/lib/ipxe")
        for name in ("ipxe.efi", "snponly.efi", "undionly.kpxe"):
            if not (folder / name).exists():
                require_tool(str(folder / name), "from Debian's ipxe package")
        return folder
    efi = debian_build(generation).efi_binary
    assert efi is not None
    folder = efi.parent
    for name in ("snponly.efi", "undionly.kpxe"):
        assert (folder / name).exists(), f"{folder} lacks {name}"
    return folder


GENERATIONS = [pytest.param("host", id="bookworm-ipxe"), pytest.param("trixie", id="trixie-ipxe")]


@pytest.mark.parametrize("generation", GENERATIONS)
def test_firmware_http_boot_fetches_ipxe_from_bootrules_and_runs_the_rule(tmp_path, generation):
    """IPv4, contrib/dnsmasq-httpboot.conf, no TFTP: OVMF's HTTP Boot fetches ipxe.efi from
    bootrules (HEAD, then GET); bookworm's iPXE asks DHCP again and gets /boot.ipxe, trixie's
    fetches /autoexec.ipxe; either reaches /ipxe with platform=efi and boots the rule's kernel."""
    lab = open_lab(tmp_path, 4)
    try:
        serve_guest(lab, 4)
        start_dnsmasq(lab)
        rules = tmp_path / "rules.yaml"
        rules.write_text("rules:\n" + linux_rule(lab, "efi-linux", f'{{mac: "{MAC}", platform: efi, ip: 10.77.0.0/24}}')
                         + "  - name: rest\n    exit: true\n")
        vars_file = uefi.http_boot_vars(tmp_path, 4)
        with BootrulesServer(rules, 80, tmp_path / "bootrules.log", host=SERVER4, netns=lab.namespace,
                             args=("--ipxe-dir", str(ipxe_dir(generation)))) as server:
            result, serial = boot_until_linux(lab, vars_file)
            log = server.log()
        dhcp = lab.net.log("dnsmasq.log")
    finally:
        lab.net.close()
    detail = f"{result.describe()}\n--- serial\n{serial[-2500:]}\n--- bootrules\n{log[-2500:]}\n--- dnsmasq\n{dhcp[-2500:]}"
    assert command_line(serial).get("rule") == "efi-linux", detail
    assert re.search(r"tags: .*\bhttpclient\b", dhcp) and f"http://{SERVER4}/ipxe.efi" in dhcp, detail
    assert "served file=ipxe.efi client=10.77.0." in log, detail
    assert f"mac={MAC} rule=efi-linux action=boot" in log, detail
    if generation == "trixie":
        assert "served file=autoexec.ipxe" in log, detail
    else:
        assert re.search(r"tags: .*\bipxe\b", dhcp), detail  # bookworm's iPXE asked DHCP again
    print(f"UEFI HTTP Boot, IPv4, {generation} iPXE: the rule's kernel printed its command line "
          f"{result.elapsed:.0f} s after power-on")


IPV6_GENERATIONS = [pytest.param("trixie", id="trixie-ipxe"),
                    pytest.param("host", id="bookworm-ipxe", marks=pytest.mark.slow)]


@pytest.mark.parametrize("generation", IPV6_GENERATIONS)
def test_ipv6_only_firmware_and_ipxe_reach_bootrules_and_run_the_rule(tmp_path, generation):
    """No IPv4 address anywhere: radvd and Kea (contrib/radvd.conf, kea-dhcp6-httpboot.conf) give
    the firmware its address and ipxe.efi's URL; iPXE reaches http://[fd00:77::1]/ipxe and
    sends its IPv6 address, which `ip6:` and `client:` rules match."""
    lab = open_lab(tmp_path, 6)
    try:
        serve_guest(lab, 6)
        start_kea6_and_radvd(lab)
        rules = tmp_path / "rules.yaml"
        rules.write_text("rules:\n" + linux_rule(lab, "v6-linux", '{ip6: "fd00:77::/64", client: "fd00:77::/64"}',
                                                 " family=v6") + "  - name: rest\n    exit: true\n")
        vars_file = uefi.http_boot_vars(tmp_path, 6)
        with BootrulesServer(rules, 80, tmp_path / "bootrules.log", host=SERVER6, connect_host=f"[{SERVER6}]",
                             netns=lab.namespace, args=("--ipxe-dir", str(ipxe_dir(generation)),
                                                        "--admin-allow", "fd00:77::/64")) as server:
            result, serial = boot_until_linux(lab, vars_file, timeout=240)
            log = server.log()
            status, machines = lab.fetch(lab.url("/api/machines"))
        addresses = subprocess.run(["ip", "-n", lab.namespace, "-4", "addr"], capture_output=True, text=True).stdout
        kea = lab.net.log("kea6.log")
    finally:
        lab.net.close()
    detail = f"{result.describe()}\n--- serial\n{serial[-2500:]}\n--- bootrules\n{log[-2500:]}\n--- kea\n{kea[-2500:]}"
    assert "inet " not in addresses.replace("inet 127.0.0.1", "")  # IPv6 only, but for loopback
    assert command_line(serial).get("rule") == "v6-linux", detail
    assert "served file=ipxe.efi client=fd00:77::" in log, detail
    assert re.search(r"client=fd00:77::\S+ mac=52:54:00:4b:00:01 rule=v6-linux action=boot", log), detail
    listed = json.loads(machines)
    assert status == 200, machines
    seen = next(each for each in listed["machines"] if each["facts"].get("mac") == MAC)
    assert seen["client"].startswith("fd00:77::") and seen["facts"]["ip6"].startswith("fd00:77::"), seen
    print(f"UEFI HTTP Boot, IPv6 only, {generation} iPXE: the rule's kernel printed its command line "
          f"{result.elapsed:.0f} s after power-on")


SECURE_RULES = """\
inventory: inventory.csv
rules:
{install}  - name: secure-rest
    match: {{loader: grub}}
    exit: true
  - name: rest
    exit: true
"""


def secure_lab(tmp_path: Path, secure_boot_macs: str) -> tuple[Lab, Path]:
    lab = open_lab(tmp_path, 4)
    serve_guest(lab, 4)
    start_dnsmasq(lab, secure_boot_macs)
    (tmp_path / "inventory.csv").write_text(f"mac,hostname\n{MAC},sb-web-01\n")
    rules = tmp_path / "rules.yaml"
    install = linux_rule(lab, "secure-install", '{loader: grub, serial: "SB-0001"}',
                         " hostname={{ hostname }} done=${bootrules-done}").replace(
        "    boot:\n", "    once: v1\n    boot:\n")
    rules.write_text(SECURE_RULES.format(install=install))
    return lab, rules


def signed_binaries() -> tuple[Path, Path]:
    try:
        return uefi.signed_shim(), uefi.signed_grub()
    except OSError as error:
        if IN_CI:
            raise
        pytest.skip(f"cannot fetch Debian's signed shim and GRUB: {error}")


def test_secure_boot_machines_boot_through_shim_and_grub_from_the_same_rules(tmp_path):
    """OVMF with Secure Boot on and Microsoft's keys: the firmware fetches Debian's signed shim
    from bootrules, shim fetches the signed GRUB, GRUB fetches /grub/grub.cfg and asks
    /grub/decide with its MAC and SMBIOS serial, and the rule (once:, a template from the
    inventory) boots Debian's signed kernel. Reporting done moves the machine on."""
    shim, grub = signed_binaries()
    lab, rules = secure_lab(tmp_path, MAC)
    try:
        vars_file = uefi.http_boot_vars(tmp_path, 4, secure=True)
        with BootrulesServer(rules, 80, tmp_path / "bootrules.log", host=SERVER4, netns=lab.namespace,
                             args=("--shim-file", str(shim), "--grub-file", str(grub))) as server:
            result, serial = boot_until_linux(lab, vars_file, secure=True, machine=Machine(mac=MAC, serial="SB-0001"))
            log = server.log()
            arguments = command_line(serial)
            done = arguments.get("done", "")
            posted = lab.fetch(done, b"") if done.startswith("http://") else (0, "")
            _status, after = lab.fetch(lab.url(f"/grub/decide?mac={MAC}&loader=grub&serial=SB-0001"))
    finally:
        lab.net.close()
    detail = f"{result.describe()}\n--- serial\n{serial[-3000:]}\n--- bootrules\n{log[-3000:]}"
    assert arguments.get("rule") == "secure-install" and arguments.get("hostname") == "sb-web-01", detail
    assert '"' not in serial.split(linux_guest.MARKER, 1)[1].splitlines()[0], detail  # each argument its own word
    assert "Secure boot enabled" in serial, detail  # the kernel's own word
    for served in ("shimx64.efi", "grubx64.efi", "grub/grub.cfg"):
        assert f"served file={served} client=10.77.0." in log, detail
    assert f"mac={MAC} rule=secure-install action=boot" in log, detail
    assert posted[0] == 200, posted
    assert "rule 'secure-rest'" in after, after  # done: the next boot goes back to the firmware
    print(f"Secure Boot through shim and GRUB: the rule's signed kernel printed its command line "
          f"{result.elapsed:.0f} s after power-on")


def test_the_same_secure_boot_vm_refuses_debians_unsigned_ipxe(tmp_path):
    """The proof that the test above proves something: the same VM, handed Debian's ipxe.efi
    instead of the shim, is refused by the firmware."""
    lab, rules = secure_lab(tmp_path, "52:54:00:ff:ff:ff")  # not this VM: it gets ipxe.efi
    try:
        vars_file = uefi.http_boot_vars(tmp_path, 4, secure=True)
        with BootrulesServer(rules, 80, tmp_path / "bootrules.log", host=SERVER4, netns=lab.namespace,
                             args=("--ipxe-dir", str(ipxe_dir("host")))) as server:
            result, serial = boot_until_linux(lab, vars_file, secure=True, until="Access Denied", timeout=120)
            log = server.log_once_it_says("served file=ipxe.efi")
    finally:
        lab.net.close()
    detail = f"{result.describe()}\n--- serial\n{serial[-3000:]}\n--- bootrules\n{log[-3000:]}"
    assert "served file=ipxe.efi" in log, detail
    assert re.search(r"failed to load Boot\w+ \"UEFI HTTPv4[^\n]*Access Denied", serial), detail
    assert "rule=" not in log, detail  # iPXE never ran
