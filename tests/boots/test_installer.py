"""From bare metal to installed with bootrules alone: Debian's real installer in QEMU gets its
per-machine preseed from bootrules' files URL, applies a templated value, reports done through
the once: callback from the preseed, and the next boot of the same VM is its disk. Then two
machines of one inventory get their own hostname in their arguments and their files.

The installer's VM, bootrules and a file server for the installer's kernel run inside a
network namespace of the test's own: the installer can reach nothing else (no mirror, no
DNS), and nothing leaves the namespace.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

import linux_guest
from markers import disk_image
from netlab import NetLab
from support import BootrulesServer, free_port, require_root, require_tool
from vm import HOST_FROM_GUEST, VIRTIO_ROM, Machine, boot

pytestmark = pytest.mark.qemu

INSTALLER = Path("/usr/lib/debian-installer/images/12/amd64/text/debian-installer/amd64")
LOCAL_DISK = "LOCALDISK-OK"
MARKER = "BOOTRULES-PRESEED-OK"
PRESEED = f"""\
d-i debian-installer/locale string en_US.UTF-8
d-i keyboard-configuration/xkb-keymap select us
d-i netcfg/choose_interface select auto
d-i netcfg/get_hostname string {{{{ hostname }}}}
d-i netcfg/get_domain string example.com
d-i preseed/early_command string echo {MARKER} hostname={{{{ hostname }}}} disk={{{{ disk }}}} > /dev/ttyS0; \\
    wget -q -O /dev/null --post-data= {{{{ done }}}}
"""
RULES = """\
inventory: inventory.csv
rules:
  - name: install-debian
    match: {{role: installer}}
    once: bookworm-test
    files: [preseed.cfg]
    boot:
      kernel: http://10.0.2.2:{files}/linux
      initrd: http://10.0.2.2:{files}/initrd.gz
      args: auto=true priority=critical url={{{{ files }}}}preseed.cfg hostname={{{{ hostname }}}} console=ttyS0,115200
  - name: local-disk
    exit: true
"""


def test_debian_s_installer_fetches_its_preseed_reports_done_and_the_next_boot_is_its_disk(tmp_path):
    """Debian's netboot installer (debian-installer-12-netboot-amd64), booted by iPXE through a
    templated boot rule: it fetches its own preseed.cfg from /files/, runs its early_command
    (which prints the machine's templated hostname and disk on the serial console and POSTs
    the done URL), and the VM's next boot falls through to the local-disk rule."""
    require_root("the installer runs in a network namespace of its own")
    require_tool("qemu-system-x86_64", "from Debian's qemu-system-x86 package")
    for name in ("linux", "initrd.gz"):
        if not (INSTALLER / name).exists():
            require_tool(str(INSTALLER / name), "from Debian's debian-installer-12-netboot-amd64 package")
    if not VIRTIO_ROM.exists():
        require_tool(str(VIRTIO_ROM), "from Debian's ipxe-qemu package")
    machine = Machine(mac="52:54:00:d1:00:01")
    (tmp_path / "inventory.csv").write_text(f"mac,hostname,disk,role\n{machine.mac},web-42,/dev/vda,installer\n")
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "preseed.cfg").write_text(PRESEED)
    tftp = tmp_path / "tftp"
    tftp.mkdir()
    disk = tmp_path / "local.img"
    disk.write_bytes(disk_image(LOCAL_DISK, 0x10))
    lab = NetLab(tmp_path)
    namespace = lab.switch
    try:
        files_port, port = free_port(), free_port()
        lab.start(namespace, [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory",
                              str(INSTALLER), str(files_port)], "installer-files.log")
        rules = tmp_path / "rules.yaml"
        rules.write_text(RULES.format(files=files_port))
        (tftp / "boot.ipxe").write_text(f"#!ipxe\nchain http://{HOST_FROM_GUEST}:{port}/boot.ipxe\n")
        with BootrulesServer(rules, port, tmp_path / "bootrules.log", netns=namespace, cwd=tmp_path) as server:
            serial = tmp_path / "serial.txt"

            def reported_done() -> bool:
                return "once: done machine=mac:52:54:00:d1:00:01 rule=install-debian" in server.log()

            started = time.monotonic()
            # A TFTP boot file, not a URL: the installer's own DHCP gets the same file name,
            # and would load a URL there as a preseed file before url= (field notes).
            first = boot(tmp_path, "boot.ipxe", machine, disk=disk, tftp_root=tftp, serial=serial, netns=namespace,
                         memory=1024, stop_when=reported_done, timeout=300)
            elapsed = time.monotonic() - started
            printed = serial.read_text(errors="replace") if serial.exists() else ""
            assert reported_done(), f"{first.describe()}\n--- serial\n{printed[-3000:]}\n--- bootrules\n{server.log()[-3000:]}"
            assert f"{MARKER} hostname=web-42 disk=/dev/vda" in printed, printed[-3000:]
            assert re.search(r"files: token=\S+ machine=mac:52:54:00:d1:00:01 file=preseed.cfg status=200",
                             server.log()), server.log()
            print(f"installer: preseed fetched, applied and done reported {elapsed:.0f} s after power-on")
            second = boot(tmp_path, "boot.ipxe", machine, disk=disk, tftp_root=tftp, netns=namespace, timeout=120)
            assert second.marker() == LOCAL_DISK, second.describe()
            decisions = [line.split("rule=", 1)[1] for line in server.log().splitlines()
                         if " mac=52:54:00:d1:00:01 rule=" in line]
            assert decisions == ["install-debian action=boot", "local-disk action=exit"], decisions
    finally:
        lab.close()


def test_two_machines_of_one_inventory_get_their_own_hostname_in_args_and_files(tmp_path):
    """Debian's kernel and a busybox initramfs print the command line each VM got: each has its
    own hostname and its own files URL; fetching each URL as an installer would gives that
    machine's file."""
    require_tool("qemu-system-x86_64", "from Debian's qemu-system-x86 package")
    kernel, initrd = linux_guest.kernel_and_initramfs()
    files = tmp_path / "guest"
    files.mkdir()
    (files / "vmlinuz").write_bytes(kernel)
    (files / "initrd.img").write_bytes(initrd)
    files_port, port = free_port(), free_port()
    web = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(files),
                            str(files_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (tmp_path / "inventory.csv").write_text("mac,hostname\n52:54:00:d2:00:01,alpha\n52:54:00:d2:00:02,beta\n")
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "meta-data").write_text("local-hostname: {{ hostname }}\n")
    rules = tmp_path / "rules.yaml"
    rules.write_text(textwrap.dedent(f"""\
        inventory: inventory.csv
        rules:
          - name: linux
            match: {{mac: "52:54:00:d2:*"}}
            files: [meta-data]
            boot:
              kernel: http://{HOST_FROM_GUEST}:{files_port}/vmlinuz
              initrd: http://{HOST_FROM_GUEST}:{files_port}/initrd.img
              args: console=ttyS0 quiet panic=-1 hostname={{{{ hostname }}}} ds=nocloud-net;s={{{{ files }}}}
        """))
    try:
        with BootrulesServer(rules, port, tmp_path / "bootrules.log", cwd=tmp_path):
            for mac, hostname in (("52:54:00:d2:00:01", "alpha"), ("52:54:00:d2:00:02", "beta")):
                serial = tmp_path / f"serial-{hostname}.txt"

                def printed() -> str:
                    return serial.read_text(errors="replace") if serial.exists() else ""

                result = boot(tmp_path, f"http://{HOST_FROM_GUEST}:{port}/boot.ipxe", Machine(mac=mac), serial=serial,
                              stop_when=lambda: linux_guest.MARKER in printed() and "\n" in printed().split(
                                  linux_guest.MARKER, 1)[1], timeout=240)
                line = next((text for text in printed().splitlines() if text.startswith(linux_guest.MARKER)), None)
                assert line is not None, result.describe() + printed()[-2000:]
                arguments = dict(word.split("=", 1) for word in line.split("cmdline=", 1)[1].split() if "=" in word)
                assert arguments["hostname"] == hostname, line
                url = arguments["ds"].split(";s=", 1)[1].replace(HOST_FROM_GUEST, "127.0.0.1")
                with urllib.request.urlopen(url + "meta-data", timeout=10) as response:
                    assert response.read().decode() == f"local-hostname: {hostname}\n"
    finally:
        web.terminate()
        web.wait(timeout=10)
