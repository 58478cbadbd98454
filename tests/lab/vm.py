"""Real-boot harness: Debian's iPXE in QEMU, a file server for what rules point at, tgtd.

QEMU runs with user-mode networking. The guest gets DHCP from QEMU itself, with the boot
file set to bootrules' /boot.ipxe, and reaches the host's loopback as 10.0.2.2. No root,
no namespace and no real interface are involved.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import socket
import socketserver
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from markers import SCREEN_CHARS

HOST_FROM_GUEST = "10.0.2.2"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# QEMU's own default ROM for virtio-net: Debian's iPXE for both BIOS and UEFI. It must be
# left as the default: with an explicit romfile= (even this same file) SeaBIOS 1.16 does
# not run it as the NIC's option ROM, and the VM never network-boots.
# bookworm's ipxe-qemu puts it in /usr/lib/ipxe/qemu/, trixie's in /usr/share/qemu/.
VIRTIO_ROM = next((path for path in (Path("/usr/lib/ipxe/qemu/efi-virtio.rom"), Path("/usr/share/qemu/efi-virtio.rom"))
                   if path.exists()), Path("/usr/lib/ipxe/qemu/efi-virtio.rom"))
BOOT_TIMEOUT = float(os.environ.get("BOOTRULES_VM_TIMEOUT", "120"))


# --------------------------------------------------------------------------- file server


@dataclass
class Request:
    method: str
    path: str
    range: str | None


class FileServer:
    """An HTTP server for chained scripts, kernels and disk images; it records every request.

    Supports HEAD and single byte ranges, which iPXE's HTTP SAN boot relies on.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[Request] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _serve(self, with_body: bool) -> None:
                path = self.path.split("?", 1)[0]
                server.requests.append(Request(self.command, self.path, self.headers.get("Range")))
                body = server.files.get(path)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status, start, end = 200, 0, len(body) - 1
                match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if match:
                    status, start = 206, int(match.group(1))
                    end = min(int(match.group(2)) if match.group(2) else end, len(body) - 1)
                self.send_response(status)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(end - start + 1))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
                self.end_headers()
                if with_body:
                    self.wfile.write(body[start : end + 1])

            def do_GET(self) -> None:
                self._serve(True)

            def do_HEAD(self) -> None:
                self._serve(False)

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        """The URL of `path` as the guest sees it."""
        return f"http://{HOST_FROM_GUEST}:{self.port}{path}"

    def paths(self) -> list[str]:
        return [request.path.split("?", 1)[0] for request in self.requests]

    def __enter__(self) -> "FileServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


# --------------------------------------------------------------------------- QEMU


@dataclass
class Machine:
    """What the guest looks like to iPXE: NIC MAC and SMBIOS identity."""

    mac: str = "52:54:00:12:34:56"
    uuid: str | None = None
    serial: str | None = None
    product: str | None = None
    manufacturer: str | None = None
    asset: str | None = None


@dataclass
class BootResult:
    """What a boot left behind: QEMU's status, the debug console, and the screen."""

    status: int | None
    debugcon: str
    elapsed: float
    markers: list[str] = field(default_factory=list)
    screen: list[str] = field(default_factory=list)

    def marker(self) -> str | None:
        """The first marker line a marker program printed, if any."""
        return self.markers[0] if self.markers else None

    def screen_text(self) -> str:
        """The screen as text, with lines that wrapped at column 80 joined again."""
        text = ""
        for row in self.screen:
            text += row if len(row) == 80 else row + "\n"
        return "\n".join(line for line in text.splitlines() if line)

    def describe(self) -> str:
        """Everything useful for a failure message."""
        return f"status={self.status} elapsed={self.elapsed:.1f}s markers={self.markers}\nscreen:\n{self.screen_text()}"


MARKER_LINE = re.compile(r"^([A-Z][A-Z0-9-]*-OK\b.*)$", re.M)


def parse_debugcon(text: str) -> tuple[list[str], list[str]]:
    """Split the debug console into marker lines and, after a disk marker, the screen rows."""
    markers = MARKER_LINE.findall(text)
    screen: list[str] = []
    for found in MARKER_LINE.finditer(text):
        rest = text[found.end() + 1 :]
        if len(rest) >= SCREEN_CHARS:
            raw = rest[:SCREEN_CHARS]
            screen = [raw[i : i + 80].rstrip(" \0") for i in range(0, SCREEN_CHARS, 80)]
            break
    return markers, screen


def kvm_requested() -> bool:
    """KVM is opt-in: on these machines it was seen to reset the guest while iPXE started."""
    return os.environ.get("BOOTRULES_TEST_KVM") == "1" and os.access("/dev/kvm", os.W_OK)


def boot(
    workdir: Path,
    boot_url: str,
    machine: Machine,
    *,
    disk: Path | None = None,
    uefi: bool = False,
    stop_when: Callable[[], bool] | None = None,
    timeout: float = BOOT_TIMEOUT,
    tap: tuple[str, str] | None = None,
    tftp_root: Path | None = None,
    keys: tuple[str, ...] = (),
    keys_when: Callable[[], bool] | None = None,
    rom_dir: Path | None = None,
    serial: Path | None = None,
    netns: str | None = None,
    memory: int = 256,
    firmware: tuple[str, list[str]] | None = None,
    nic_options: str = "",
) -> BootResult:
    """Power on a VM that network-boots `boot_url` first, then its disk; wait for it to finish.

    Ends when a marker program exits QEMU, when `stop_when()` turns true (QEMU is then
    killed), or at `timeout` (killed too). QEMU never outlives this call.
    With `tap=(namespace, device)` the NIC is that tap device instead of QEMU's user-mode
    network (QEMU then runs in that namespace, and `boot_url` is unused: DHCP decides).
    With `tftp_root`, QEMU's own TFTP server serves that directory and `boot_url` may be
    a file name in it.
    `serial`: a file that receives the VM's first serial port (a Linux guest's console).
    `rom_dir`: a directory whose efi-virtio.rom the NIC runs instead of the host's (an iPXE
    build of another generation: tests/ipxe_builds.py).
    `netns`: run QEMU (and its user-mode network) inside that namespace: a guest there reaches
    only what listens in the namespace (its 10.0.2.2 is the namespace's loopback).
    `memory`: MB of RAM (Debian's installer wants 1024).
    `firmware`: QEMU's machine type and its flash arguments, instead of SeaBIOS or plain OVMF
    (tests/lab/uefi.py);
    `nic_options` are added to the NIC's -device (its PCI slot, an empty romfile=).
    `keys` (QEMU key names: `down`, `ret`, `a`…) are typed at the console through QEMU's
    monitor, KEY_DELAY seconds after `keys_when()` first turns true (say, once the server
    answered with a menu), so that iPXE has drawn what they answer.
    """
    qemu = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
    debugcon = workdir / f"debugcon-{time.monotonic_ns()}.txt"
    nic = f"virtio-net-pci,netdev=n0,mac={machine.mac}" + (f",{nic_options}" if nic_options else "")
    command = [
        qemu, "-machine", firmware[0] if firmware else "pc", "-m", str(memory), "-display", "none", "-vga", "std",
        "-no-reboot", "-serial", f"file:{serial}" if serial else "none", "-parallel", "none",
        "-netdev", f"tap,id=n0,ifname={tap[1]},script=no,downscript=no" if tap
        else f"user,id=n0,bootfile={boot_url}" + (f",tftp={tftp_root}" if tftp_root else ""),
        "-debugcon", f"file:{debugcon}", "-global", "isa-debugcon.iobase=0x402",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]
    if rom_dir is not None:
        command += ["-L", str(rom_dir)]  # searched before QEMU's own directories
    monitor = workdir / f"monitor-{time.monotonic_ns()}.sock"
    command += ["-monitor", f"unix:{monitor},server=on,wait=off" if keys else "none"]
    if kvm_requested():
        command += ["-enable-kvm"]
    if firmware is not None:
        command += firmware[1]
    elif uefi:
        variables = workdir / "OVMF_VARS.fd"
        shutil.copyfile(OVMF_VARS, variables)
        command += [
            "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,file={variables}",
        ]
    else:
        command += ["-boot", "order=nc"]
    command += ["-device", nic]
    if disk is not None:
        command += ["-drive", f"file={disk},format=raw,if=ide"]
    if machine.uuid:
        command += ["-uuid", machine.uuid]
    system = [f"{key}={value}" for key, value in (
        ("serial", machine.serial), ("product", machine.product), ("manufacturer", machine.manufacturer)
    ) if value is not None]
    if system:
        # QEMU's option syntax escapes a comma by doubling it.
        command += ["-smbios", "type=1," + ",".join(item.replace(",", ",,") for item in system)]
    if machine.asset is not None:
        command += ["-smbios", f"type=3,asset={machine.asset.replace(',', ',,')}"]

    if tap or netns:
        command = ["ip", "netns", "exec", tap[0] if tap else netns, *command]
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    status: int | None = None
    keys_due: float | None = None
    try:
        while True:
            status = process.poll()
            if status is not None:
                break
            if keys and keys_due is None and (keys_when is None or keys_when()):
                keys_due = time.monotonic() + KEY_DELAY
            if keys and keys_due is not None and time.monotonic() >= keys_due:
                _type_keys(monitor, keys)
                keys = ()
            if stop_when is not None and stop_when():
                break
            if time.monotonic() - started > timeout:
                break
            time.sleep(0.1)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
        if process.stderr:
            process.stderr.close()
    elapsed = time.monotonic() - started
    text = debugcon.read_bytes().decode("latin-1") if debugcon.exists() else ""
    if status is not None and not text and not (serial is not None and serial.exists() and serial.stat().st_size):
        raise RuntimeError(f"QEMU failed with status {status}: {stderr}")
    markers, screen = parse_debugcon(text)
    return BootResult(status=status, debugcon=text, elapsed=elapsed, markers=markers, screen=screen)


KEY_DELAY = 2.0  # seconds from keys_when() to the first key


def _type_keys(monitor: Path, keys: tuple[str, ...]) -> None:
    """Type `keys` at the VM's console through QEMU's human monitor."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(monitor))
        sock.settimeout(5)
        try:
            for key in keys:
                sock.sendall(f"sendkey {key}\n".encode())
                time.sleep(0.3)
        except BrokenPipeError:
            pass  # the last key ended the VM (a marker program powers it off at once)


# --------------------------------------------------------------------------- iSCSI target


class IscsiTarget:
    """tgtd serving one LUN on 127.0.0.1 only, admitting a single initiator IQN."""

    def __init__(self, workdir: Path, image: Path, target_iqn: str, initiator_iqn: str, port: int) -> None:
        self.workdir = workdir
        self.image = image
        self.target_iqn = target_iqn
        self.initiator_iqn = initiator_iqn
        self.port = port
        # tgtd's management socket is /var/run/tgtd/socket.<N>; a distinct N per run keeps
        # this tgtd apart from any other one on the machine.
        self.control_port = 1000 + os.getpid() % 20000
        self.process: subprocess.Popen | None = None

    def _admin(self, *args: str) -> None:
        subprocess.run(["tgtadm", "-C", str(self.control_port), "--lld", "iscsi", *args], check=True,
                       capture_output=True, timeout=10)

    def __enter__(self) -> "IscsiTarget":
        self._log = open(self.workdir / "tgtd.log", "wb")
        self.process = subprocess.Popen(
            ["tgtd", "-f", "-C", str(self.control_port), "--iscsi", f"portal=127.0.0.1:{self.port}"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                self._admin("--mode", "target", "--op", "show")
                break
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.__exit__()
                    raise RuntimeError("tgtd did not start: " + (self.workdir / "tgtd.log").read_text()) from None
                time.sleep(0.1)
        self._admin("--mode", "target", "--op", "new", "--tid", "1", "--targetname", self.target_iqn)
        self._admin("--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", "1", "--backing-store", str(self.image))
        self._admin("--mode", "target", "--op", "bind", "--tid", "1", "--initiator-name", self.initiator_iqn)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
