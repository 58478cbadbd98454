"""Proof by real boots: Debian's iPXE in QEMU runs what bootrules sends, action by action.

Each test writes rules, starts `python app.py serve` on a free loopback port, and powers
on a VM whose DHCP boot file is that server's /boot.ipxe. The test watches two things: the
requests the servers receive, and the markers the guest's marker programs write to the
QEMU debug console (the local-disk marker also copies the screen, so a test can read what
iPXE printed just before).
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from bootrules.decide.render import render_entry
from support import IN_CI, ROOT, BootrulesServer, free_port, http_get, require_server, require_tool
from ipxe_builds import IpxeBuild, debian_build, host_build
import linux_guest
from markers import disk_image, marker_kernel
from vm import HOST_FROM_GUEST, OVMF_CODE, OVMF_VARS, VIRTIO_ROM, FileServer, IscsiTarget, Machine, boot

pytestmark = pytest.mark.qemu

LOCAL_DISK = "LOCALDISK-OK"
SAN_DISK = "SANBOOT-OK"
KERNEL = "KERNEL-OK"


def require_file(path: Path, package: str) -> None:
    if not path.exists():
        require_tool(str(path), f"from Debian's {package} package")


class Lab:
    """One test's servers and VM: bootrules, a file server, a local disk, and the iPXE build
    the VM's NIC runs."""

    def __init__(self, tmp_path: Path, files: FileServer, ipxe: IpxeBuild | None = None,
                 server_args: tuple[str, ...] = ()) -> None:
        self.tmp = tmp_path
        self.server_args = server_args
        self.files = files
        self.ipxe = ipxe
        self.rules = tmp_path / "rules.yaml"
        self.server: BootrulesServer | None = None
        self.disk = tmp_path / "local.img"
        self.disk.write_bytes(disk_image(LOCAL_DISK, 0x10))

    def write_rules(self, text: str) -> None:
        self.rules.write_text(textwrap.dedent(text).lstrip("\n").replace("FILES", f"http://{HOST_FROM_GUEST}:{self.files.port}"))

    def serve(self, text: str) -> BootrulesServer:
        self.write_rules(text)
        self.server = BootrulesServer(self.rules, free_port(), self.tmp / "bootrules.log", args=self.server_args).start()
        return self.server

    def boot_url(self) -> str:
        assert self.server is not None
        return f"http://{HOST_FROM_GUEST}:{self.server.port}/boot.ipxe"

    def boot(self, machine: Machine | None = None, **options):
        ipxe = self.ipxe
        boot_url = options.pop("boot_url", None) or self.boot_url()
        if ipxe is not None and ipxe.efi_binary is not None and options.get("uefi"):
            # The firmware fetches this build's ipxe.efi by TFTP; it runs autoexec.ipxe from there.
            tftp = self.tmp / f"tftp-{ipxe.name}"
            tftp.mkdir(exist_ok=True)
            shutil.copyfile(ipxe.efi_binary, tftp / "ipxe.efi")
            (tftp / "autoexec.ipxe").write_text(f"#!ipxe\ndhcp\nchain {boot_url}\n")
            options["tftp_root"], boot_url = tftp, "ipxe.efi"
        return boot(self.tmp, boot_url, machine or Machine(), disk=self.disk,
                    rom_dir=ipxe.rom_dir if ipxe is not None else None, **options)

    def decisions(self, mac: str = Machine.mac, expected: int = 1) -> list[str]:
        """The `rule=… action=…` part of each decision bootrules logged for the VM's MAC.

        bootrules writes its log in batches (at most half a second late), so this waits up
        to three seconds for `expected` lines before answering.
        """
        assert self.server is not None
        deadline = time.monotonic() + 3
        while True:
            found = [line.split("rule=", 1)[1] for line in self.server.log().splitlines() if f" mac={mac} rule=" in line]
            if len(found) >= expected or time.monotonic() > deadline:
                return found
            time.sleep(0.1)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


# Two generations of iPXE: the host's (bookworm: built January 2019) and trixie's (May 2025),
# which changed what `:uristring` escapes and how EFI boots a local disk. Test ids and
# markers name the generation: `tests/run -m ipxe_trixie`.
GENERATIONS = [
    pytest.param("host", marks=pytest.mark.ipxe_host, id="ipxe-host"),
    pytest.param("trixie", marks=pytest.mark.ipxe_trixie, id="ipxe-trixie"),
]


# For a case whose commands both generations run alike: the host's generation by default,
# trixie's a slow combination (`tests/run --slow`). The cases where the generations differ
# (what the entry script reports, exit, UEFI, sanboot over iSCSI, menus, real Linux under
# OVMF) run on both.
ALIKE_ON_BOTH = [
    pytest.param("host", marks=pytest.mark.ipxe_host, id="ipxe-host"),
    pytest.param("trixie", marks=[pytest.mark.ipxe_trixie, pytest.mark.slow], id="ipxe-trixie"),
]
alike_on_both = pytest.mark.parametrize("lab", ALIKE_ON_BOTH, indirect=True)


@pytest.fixture(scope="session")
def trixie_ipxe():
    try:
        return debian_build("trixie")
    except OSError as error:  # no network to Debian's mirror, and nothing in the cache
        if IN_CI:
            raise
        pytest.skip(f"cannot fetch trixie's ipxe-qemu: {error}")


@pytest.fixture(params=GENERATIONS)
def lab(request, tmp_path):
    """A lab whose VM runs each generation of iPXE in turn."""
    ipxe = request.getfixturevalue("trixie_ipxe") if request.param == "trixie" else host_build()
    yield from _lab(tmp_path, ipxe)


@pytest.fixture
def host_lab(tmp_path):
    """A lab on the host's iPXE only: for what does not depend on iPXE's generation."""
    yield from _lab(tmp_path, None)


@pytest.fixture
def granian_lab(tmp_path):
    """A lab on the host's iPXE whose bootrules runs `--server granian`."""
    require_server("granian")
    yield from _lab(tmp_path, None, ("--server", "granian"))


def _lab(tmp_path: Path, ipxe: IpxeBuild | None, server_args: tuple[str, ...] = ()):
    require_tool("qemu-system-x86_64", "from Debian's qemu-system-x86 package")
    require_file(VIRTIO_ROM, "ipxe-qemu")
    with FileServer() as files:
        lab = Lab(tmp_path, files, ipxe, server_args)
        yield lab
        lab.close()


def test_entry_script_reports_the_machines_true_identity(lab):
    """MAC, UUID, SMBIOS strings (a serial full of & + # and a space), platform and
    buildarch all reach /ipxe exactly: one rule requiring every one of them matches."""
    lab.files.files["/facts-ok.ipxe"] = b"#!ipxe\nexit 1\n"
    lab.serve(
        """
        rules:
          - name: every-fact
            match:
              mac: 52-54-00-AB-CD-EF
              uuid: 8C2F3F5E-1B2A-4C3D-9E8F-0A1B2C3D4E5F
              serial: "S&N+1#x y"
              product: "ProLiant DL360 Gen10"
              manufacturer: HPE
              asset: "IT-42 rack 7"
              platform: pcbios
              buildarch: i386
            chain: FILES/facts-ok.ipxe
          - name: rest
            exit: true
        """
    )
    machine = Machine(
        mac="52:54:00:ab:cd:ef", uuid="8c2f3f5e-1b2a-4c3d-9e8f-0a1b2c3d4e5f", serial="S&N+1#x y",
        product="ProLiant DL360 Gen10", manufacturer="HPE", asset="IT-42 rack 7",
    )
    result = lab.boot(machine)
    assert lab.decisions("52:54:00:ab:cd:ef") == ["every-fact action=chain"], result.describe() + "\n" + lab.server.log()
    assert lab.files.paths() == ["/facts-ok.ipxe"]
    assert result.marker() == LOCAL_DISK


@alike_on_both
def test_chain_runs_the_chained_script_which_fetches_a_third(lab):
    """`chain`: the VM fetches the chained script, and that script runs (it fetches another)."""
    lab.files.files["/second.ipxe"] = f"#!ipxe\nchain {lab.files.url('/third.ipxe')}\n".encode()
    lab.files.files["/third.ipxe"] = b"#!ipxe\necho third script ran\nexit 1\n"
    lab.serve("""
        rules:
          - name: to-second
            match: {mac: "52:54:00:12:34:56"}
            chain: FILES/second.ipxe
        """)
    result = lab.boot()
    assert lab.files.paths() == ["/second.ipxe", "/third.ipxe"], result.describe()
    assert "third script ran" in result.screen_text()
    assert result.marker() == LOCAL_DISK


@alike_on_both
def test_sanboot_over_http_boots_the_disk_image(lab):
    """`sanboot` of an HTTP disk image (Range requests) boots the image's boot sector."""
    lab.files.files["/disk.img"] = disk_image(SAN_DISK, 0x11)
    lab.serve("""
        rules:
          - name: http-disk
            sanboot: FILES/disk.img
        """)
    result = lab.boot()
    assert result.marker() == SAN_DISK, result.describe()
    assert any(request.range for request in lab.files.requests), lab.files.requests


def test_sanboot_over_iscsi_needs_the_rules_initiator_name(lab, tmp_path):
    """`sanboot` over iSCSI with `set: initiator-iqn`: tgtd admits only that initiator,
    so the marker proves both the setting and the login; without it the boot fails over."""
    require_tool("tgtd", "from Debian's tgt package")
    image = tmp_path / "lun.img"
    image.write_bytes(disk_image(SAN_DISK, 0x11))
    target = "iqn.2026-11.test.bootrules:lun"
    initiator = "iqn.2026-11.test.bootrules:vm-0042"
    port = free_port()
    with IscsiTarget(tmp_path, image, target, initiator, port):
        lab.serve(f"""
            rules:
              - name: with-iqn
                match: {{mac: "52:54:00:00:00:01"}}
                set: {{initiator-iqn: "{initiator}"}}
                sanboot: iscsi:{HOST_FROM_GUEST}::{port}:1:{target}
              - name: without-iqn
                match: {{mac: "52:54:00:00:00:02"}}
                sanboot: iscsi:{HOST_FROM_GUEST}::{port}:1:{target}
            """)
        admitted = lab.boot(Machine(mac="52:54:00:00:00:01"))
        refused = lab.boot(Machine(mac="52:54:00:00:00:02"))
    assert admitted.marker() == SAN_DISK, admitted.describe()
    assert refused.marker() == LOCAL_DISK, refused.describe()
    assert "bootrules: rule 'without-iqn': sanboot failed; falling back to the next boot device" in refused.screen_text()


def test_exit_hands_over_to_the_local_disk(lab):
    """`exit`: iPXE returns to the BIOS, which boots the local disk."""
    lab.serve("""
        rules:
          - name: go-local
            exit: true
        """)
    result = lab.boot()
    assert result.marker() == LOCAL_DISK, result.describe()
    assert "bootrules: rule 'go-local': booting from the next boot device" in result.screen_text()
    if lab.ipxe is not None:  # and it was this generation of iPXE that ran
        assert f"iPXE {lab.ipxe.version} -- Open Source Network Boot Firmware" in result.screen_text()


@alike_on_both
def test_boot_fetches_kernel_and_initrd_and_runs_the_kernel_with_its_args(lab):
    """`boot`: both files are fetched and the kernel runs with the initrd and arguments."""
    initrd = b"INITRD" * 100
    lab.files.files["/vmlinuz"] = marker_kernel(KERNEL, 0x12)
    lab.files.files["/initrd.img"] = initrd
    lab.serve("""
        rules:
          - name: kernel
            boot:
              kernel: FILES/vmlinuz
              initrd: FILES/initrd.img
              args: quiet bootrules=yes
        """)
    result = lab.boot()
    assert lab.files.paths() == ["/vmlinuz", "/initrd.img"]
    assert result.marker() == f"{KERNEL} initrd={len(initrd):08x} cmdline=initrd=initrd.img quiet bootrules=yes", \
        result.describe()


@alike_on_both
def test_no_matching_rule_runs_the_explicit_default(lab):
    """No rule matches: the default script exits and the local disk boots."""
    lab.serve("""
        rules:
          - name: someone-else
            match: {mac: "00:11:22:33:44:55"}
            chain: FILES/never.ipxe
        """)
    result = lab.boot()
    assert result.marker() == LOCAL_DISK, result.describe()
    assert "bootrules: no rule matched this machine; booting from the next boot device" in result.screen_text()
    assert lab.files.paths() == []


@alike_on_both
def test_a_chain_that_404s_prints_why_and_falls_through(lab):
    """A chained URL that 404s: the machine says so and boots its local disk."""
    lab.serve("""
        rules:
          - name: broken-chain
            chain: FILES/missing.ipxe
        """)
    result = lab.boot()
    assert result.marker() == LOCAL_DISK, result.describe()
    assert "bootrules: rule 'broken-chain': chain failed; falling back to the next boot device" in result.screen_text()


@alike_on_both
def test_an_iscsi_target_that_is_down_prints_why_and_falls_through(lab):
    """An iSCSI target nobody listens on: sanboot fails, the machine boots its local disk."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    lab.serve(f"""
        rules:
          - name: san-down
            sanboot: iscsi:{HOST_FROM_GUEST}::{port}:1:iqn.2026-11.test:nobody
        """)
    result = lab.boot()
    assert result.marker() == LOCAL_DISK, result.describe()
    assert "bootrules: rule 'san-down': sanboot failed; falling back to the next boot device" in result.screen_text()


@alike_on_both
def test_an_unreachable_decision_url_prints_why_and_falls_through(lab):
    """The entry script cannot reach /ipxe: it says so and the local disk boots."""
    dead = free_port()
    lab.files.files["/boot.ipxe"] = render_entry(f"http://{HOST_FROM_GUEST}:{dead}/ipxe").encode()
    result = lab.boot(boot_url=lab.files.url("/boot.ipxe"))
    assert result.marker() == LOCAL_DISK, result.describe()
    assert f"bootrules: could not fetch the boot decision from http://{HOST_FROM_GUEST}:{dead}/ipxe" in result.screen_text()


def test_uefi_firmware_reports_efi_and_a_platform_rule_answers(lab, tmp_path):
    """UEFI (OVMF + the EFI iPXE ROM): /ipxe sees platform=efi, buildarch=x86_64."""
    require_file(OVMF_CODE, "ovmf")
    require_file(OVMF_VARS, "ovmf")
    lab.files.files["/efi.ipxe"] = b"#!ipxe\necho efi rule answered\nexit 1\n"
    lab.serve("""
        rules:
          - name: bios
            match: {platform: pcbios}
            exit: true
          - name: uefi-x64
            match: {platform: efi, buildarch: x86_64}
            chain: FILES/efi.ipxe
        """)
    result = lab.boot(uefi=True, stop_when=lambda: "/efi.ipxe" in lab.files.paths())
    assert lab.files.paths() == ["/efi.ipxe"], result.describe() + "\n" + lab.server.log()
    assert lab.decisions() == ["uefi-x64 action=chain"]


def test_an_edit_made_while_the_machine_is_off_applies_at_its_next_boot(host_lab):
    """Edit rules.yaml between two boots: the second boot follows the new rule, no restart."""
    lab = host_lab
    lab.files.files["/after-edit.ipxe"] = b"#!ipxe\nexit 1\n"
    server = lab.serve("""
        rules:
          - name: before-edit
            exit: true
        """)
    first = lab.boot()
    assert first.marker() == LOCAL_DISK and lab.files.paths() == []
    reloads = server.reloads()
    lab.write_rules("""
        rules:
          - name: after-edit
            chain: FILES/after-edit.ipxe
        """)
    server.wait_for_reload(reloads)
    assert http_get(server.url + "/ipxe")[1]["X-Bootrules-Rule"] == "after-edit"
    second = lab.boot()
    assert lab.files.paths() == ["/after-edit.ipxe"], second.describe()
    assert lab.decisions(expected=2) == ["before-edit action=exit", "after-edit action=chain"]
    assert server.process.poll() is None  # the same server process answered both boots


def test_the_contrib_pxelinux_entry_chainloads_ipxe_which_reaches_bootrules(host_lab, tmp_path):
    """contrib/pxelinux.cfg in a real pxelinux: its entry loads undionly.0, that iPXE (told
    apart by its `undionly` NIC driver) reaches bootrules, and the rule's sanboot runs."""
    lab = host_lab
    pxelinux = Path("/usr/lib/PXELINUX/pxelinux.0")
    ldlinux = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")
    undionly = Path("/usr/lib/ipxe/undionly.kpxe")
    require_file(pxelinux, "pxelinux")
    require_file(ldlinux, "syslinux-common")
    require_file(undionly, "ipxe")
    server = lab.serve("""
        rules:
          - name: after-pxelinux
            sanboot: FILES/disk.img
        """)
    lab.files.files["/disk.img"] = disk_image(SAN_DISK, 0x11)
    root = tmp_path / "tftp"
    (root / "pxelinux.cfg").mkdir(parents=True)
    shutil.copy(pxelinux, root / "pxelinux.0")
    shutil.copy(ldlinux, root / "ldlinux.c32")
    shutil.copy(undionly, root / "undionly.0")
    entry = (ROOT / "contrib" / "pxelinux.cfg").read_text()
    (root / "pxelinux.cfg" / "default").write_text("DEFAULT bootrules\nPROMPT 0\nTIMEOUT 0\n" + entry)
    # The NIC's own firmware here is iPXE, standing in for a plain PXE ROM: it starts
    # pxelinux. The iPXE that pxelinux then loads drives the NIC through UNDI, which is how
    # this script tells the two apart, and it goes on to bootrules.
    (root / "start.ipxe").write_text(
        "#!ipxe\n"
        "iseq ${netX/chip} undionly && goto from_pxelinux ||\n"
        "chain pxelinux.0\n"
        ":from_pxelinux\n"
        f"chain http://{HOST_FROM_GUEST}:{server.port}/boot.ipxe\n"
    )
    result = lab.boot(boot_url="start.ipxe", tftp_root=root)
    assert result.marker() == SAN_DISK, result.describe() + "\n" + server.log()
    assert "using undionly" in result.screen_text(), result.describe()  # pxelinux's iPXE, not the ROM
    assert lab.decisions() == ["after-pxelinux action=sanboot"]


@alike_on_both
def test_a_once_rule_installs_then_boots_from_disk_until_its_label_changes(lab):
    """Boot 1: the installer (the marker kernel) gets the done URL in its arguments; the test
    POSTs it as an installer would. Boot 2: the local disk. A new label: boot 3 installs again."""
    install_once_cycle(lab)


def test_under_granian_a_machine_installs_once_then_boots_from_disk(granian_lab):
    """The same cycle with bootrules served by granian: entry script, decision, done callback,
    SIGHUP (new workers) and the next boots, all through granian."""
    install_once_cycle(granian_lab)
    assert "granian worker(s)" in granian_lab.server.log()


# What the log says when a once: rule lets a machine fall through because the state file
# stayed locked by another writer (bootrules.state.database.LOCK_TIMEOUT).
STORE_LOCKED = "state store unavailable (still locked by another writer"
# What the marker kernel prints when the once: rule's installer runs: the done URL it was given.
INSTALLER_RAN = re.compile(rf"{KERNEL} initrd=0000003c cmdline=initrd=initrd.img auto=true bootrules.done=(\S+)")


def install_once_cycle(lab: Lab) -> None:
    lab.files.files["/vmlinuz"] = marker_kernel(KERNEL, 0x12)
    lab.files.files["/initrd.img"] = b"INITRD" * 10
    rules = """
        rules:
          - name: install
            match: {mac: "52:54:00:12:34:56"}
            once: LABEL
            boot:
              kernel: FILES/vmlinuz
              initrd: FILES/initrd.img
              args: auto=true bootrules.done=${bootrules-done}
          - name: local-disk
            exit: true
        """
    server = lab.serve(rules.replace("LABEL", "debian13-2026-11"))
    first = lab.boot()
    found = INSTALLER_RAN.fullmatch(first.marker() or "")
    assert found, first.describe()
    done_url = found.group(1)
    assert done_url.startswith(f"http://{HOST_FROM_GUEST}:{server.port}/done/")
    request = urllib.request.Request(done_url.replace(HOST_FROM_GUEST, "127.0.0.1"), data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200

    second = lab.boot()
    assert second.marker() == LOCAL_DISK, second.describe()

    reloads = server.reloads()
    lab.write_rules(rules.replace("LABEL", "debian13-2026-12"))
    server.signal(signal.SIGHUP)
    server.wait_for_reload(reloads)
    third = lab.boot()
    again = INSTALLER_RAN.fullmatch(third.marker() or "")
    decisions = ["install action=boot", "local-disk action=exit", "install action=boot"]
    if again is None and STORE_LOCKED in server.log():
        # Seen once in CI: another connection held the state file's lock past
        # LOCK_TIMEOUT, so that boot safely went to the disk (docs/install-once.md). The
        # label's install must then come at the next boot.
        assert third.marker() == LOCAL_DISK, third.describe()
        print(f"install once: the store was locked at the third boot:\n{server.log()}")
        third = lab.boot()
        again = INSTALLER_RAN.fullmatch(third.marker() or "")
        decisions[2:2] = ["local-disk action=exit"]
    assert again and again.group(1) != done_url, third.describe()
    assert lab.decisions(expected=len(decisions)) == decisions


MENU_RULES = """
    rules:
      - name: lab-menu
        match: {mac: "52:54:00:12:34:56"}
        menu:
          title: Lab machines
          timeout: TIMEOUT
          default: disk
          items:
            - {key: disk, label: Boot from local disk, exit: true}
            - {key: image, label: Boot the test image, sanboot: FILES/disk.img}
    """


def test_a_menu_runs_its_default_item_when_nobody_chooses(lab):
    """`menu:` with a 2 s timeout and no key pressed: the default item (the local disk) runs."""
    lab.files.files["/disk.img"] = disk_image(SAN_DISK, 0x11)
    lab.serve(MENU_RULES.replace("TIMEOUT", "2s"))
    result = lab.boot()
    assert result.marker() == LOCAL_DISK, result.describe()
    assert "bootrules: rule 'lab-menu', item 'disk': booting from the next boot device" in result.screen_text()
    assert lab.files.paths() == [] and lab.decisions() == ["lab-menu action=menu"]


def test_a_key_typed_at_the_menu_picks_another_item(lab):
    """The same menu, waiting 60 s: the arrow key down and Enter, typed through QEMU's
    monitor once the menu is on screen, pick the second item (sanboot of the test image)."""
    lab.files.files["/disk.img"] = disk_image(SAN_DISK, 0x11)
    server = lab.serve(MENU_RULES.replace("TIMEOUT", "60s"))
    result = lab.boot(keys=("down", "ret"), keys_when=lambda: " rule=lab-menu " in server.log(), timeout=60)
    assert result.marker() == SAN_DISK, result.describe()
    assert result.elapsed < 50  # chosen, not timed out into the default


@pytest.mark.parametrize("lab, firmware", [
    pytest.param("host", "seabios", marks=pytest.mark.ipxe_host, id="ipxe-host-seabios"),
    pytest.param("trixie", "seabios", marks=[pytest.mark.ipxe_trixie, pytest.mark.slow], id="ipxe-trixie-seabios"),
    pytest.param("host", "ovmf", marks=pytest.mark.ipxe_host, id="ipxe-host-ovmf"),
    pytest.param("trixie", "ovmf", marks=pytest.mark.ipxe_trixie, id="ipxe-trixie-ovmf"),
], indirect=["lab"])
def test_boot_starts_debian_s_own_linux_with_its_arguments_intact(lab, firmware):
    """`boot` of Debian's real kernel (EFI stub and all) with an initramfs built here: its
    /init prints /proc/cmdline to the serial console. Args with `=`, `,` and an iPXE
    expansion (${netX/mac}) arrive as written, and expanded."""
    if firmware == "ovmf":
        require_file(OVMF_CODE, "ovmf")
    kernel, initrd = linux_guest.kernel_and_initramfs()
    lab.files.files["/vmlinuz"] = kernel
    lab.files.files["/initrd.img"] = initrd
    lab.serve("""
        rules:
          - name: linux
            boot:
              kernel: FILES/vmlinuz
              initrd: FILES/initrd.img
              args: console=ttyS0 quiet panic=-1 bootrules.list=a=b,c=d bootrules.mac=${netX/mac}
        """)
    serial = lab.tmp / f"serial-{firmware}.txt"

    def printed() -> str:
        return serial.read_text(errors="replace") if serial.exists() else ""

    result = lab.boot(uefi=firmware == "ovmf", serial=serial, stop_when=lambda: "\n" in printed().split(
        linux_guest.MARKER, 1)[-1] if linux_guest.MARKER in printed() else False, timeout=240)
    line = next((text for text in printed().splitlines() if text.startswith(linux_guest.MARKER)), None)
    assert line is not None, result.describe() + "\n" + printed()[-2000:]
    arguments = line.split("cmdline=", 1)[1].split()
    assert "bootrules.list=a=b,c=d" in arguments and "bootrules.mac=52:54:00:12:34:56" in arguments, line
    assert lab.files.paths() == ["/vmlinuz", "/initrd.img"]
