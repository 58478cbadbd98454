"""UEFI firmware for the HTTP Boot tests: OVMF as Debian ships it, with a variables store
whose boot order starts with the NIC's HTTP entry, and Debian's signed shim and GRUB.

OVMF makes a NIC's boot entries itself, in the order PXEv4, PXEv6, HTTPv4, HTTPv6, and each
PXE entry waits about a minute before the next is tried. `http_boot_vars` boots OVMF once
(isolated user-mode network: nothing leaves QEMU), reads the entries it wrote with
virt-fw-vars, and writes the HTTP one and a BootOrder naming it alone onto a fresh copy of
Debian's store, the one with Microsoft's keys for Secure Boot. The entries name the NIC's
MAC and PCI slot, so every VM here has the same NIC: MAC, in slot NIC_SLOT, on q35.

The signed binaries come from Debian's mirror into the test cache, like trixie's iPXE:
bookworm's shim-signed (signed by Microsoft) and trixie's grub-efi-amd64-signed, whose
grubnetx64 has the `http` module (bookworm's signed GRUB 2.06 has none).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ipxe_builds import CACHE, fetch_deb, package_record
from linux_guest import _member

MAC = "52:54:00:4b:00:01"
NIC_SLOT = "0x3"
OVMF = Path("/usr/share/OVMF")
CODE = OVMF / "OVMF_CODE_4M.fd"
SECURE_CODE = OVMF / "OVMF_CODE_4M.secboot.fd"
PLAIN_VARS = OVMF / "OVMF_VARS_4M.fd"
MICROSOFT_VARS = OVMF / "OVMF_VARS_4M.ms.fd"
EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
DISCOVERY_TIMEOUT = 180.0


def virt_fw_vars() -> str:
    """virt-fw-vars from the virt-firmware package in this Python's environment."""
    found = Path(sys.executable).parent / "virt-fw-vars"
    return str(found) if found.exists() else (shutil.which("virt-fw-vars") or "virt-fw-vars")


def firmware(vars_file: Path, secure: bool = False) -> tuple[str, list[str]]:
    """QEMU's machine type and flash for OVMF (with Secure Boot: SMM and the secure flash)."""
    if secure:
        return "q35,smm=on", ["-global", "driver=cfi.pflash01,property=secure,value=on",
                              "-global", "ICH9-LPC.disable_s3=1",
                              "-drive", f"if=pflash,format=raw,readonly=on,file={SECURE_CODE}",
                              "-drive", f"if=pflash,format=raw,file={vars_file}"]
    return "q35", ["-drive", f"if=pflash,format=raw,readonly=on,file={CODE}",
                   "-drive", f"if=pflash,format=raw,file={vars_file}"]


NIC_OPTIONS = f"addr={NIC_SLOT},romfile="  # no option ROM: the firmware's own network stack


def http_boot_vars(workdir: Path, family: int = 4, secure: bool = False) -> Path:
    """A variables store for this VM whose only boot entry is OVMF's own UEFI HTTPv4 (or v6)."""
    entries = _boot_entries()
    wanted = f"UEFI HTTPv{family} "
    entry = next((each for each in entries if _description(each).startswith(wanted)), None)
    if entry is None:
        raise RuntimeError(f"OVMF made no {wanted.strip()} entry: {[_description(each) for each in entries]}")
    number = int(entry["name"][4:], 16)
    order = {"name": "BootOrder", "guid": EFI_GLOBAL, "attr": 7, "data": number.to_bytes(2, "little").hex()}
    settings = workdir / f"boot-http-v{family}.json"
    settings.write_text(json.dumps({"version": 2, "variables": [entry, order]}))
    target = workdir / f"OVMF_VARS-http-v{family}{'-secure' if secure else ''}.fd"
    subprocess.run([virt_fw_vars(), "--input", str(MICROSOFT_VARS if secure else PLAIN_VARS), "--output", str(target),
                    "--set-json", str(settings)], check=True, capture_output=True, timeout=120)
    return target


def _description(entry: dict) -> str:
    """An EFI_LOAD_OPTION's description: UTF-16 after its attributes and path length."""
    raw = bytes.fromhex(entry["data"])[6:]
    end = next(index for index in range(0, len(raw), 2) if raw[index:index + 2] == b"\0\0")
    return raw[:end].decode("utf-16-le")


def _boot_entries() -> list[dict]:
    """The Boot#### entries OVMF made for this NIC (found once per OVMF version, then cached)."""
    version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "ovmf"], capture_output=True, text=True).stdout
    cached = CACHE / f"ovmf-boot-entries-{version.strip() or 'unknown'}-{MAC.replace(':', '')}-{NIC_SLOT}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    CACHE.mkdir(parents=True, exist_ok=True)
    scratch = Path(subprocess.run(["mktemp", "-d", "-p", str(CACHE)], capture_output=True, text=True,
                                  check=True).stdout.strip())
    try:
        store = scratch / "vars.fd"
        shutil.copyfile(PLAIN_VARS, store)
        http_v6 = "UEFI HTTPv6".encode("utf-16-le")
        machine, flash = firmware(store)
        command = ["qemu-system-x86_64", "-machine", machine, *flash, "-m", "256", "-display", "none", "-serial", "none",
                   "-monitor", "none", "-no-reboot", "-netdev", "user,id=n0,restrict=on",
                   "-device", f"virtio-net-pci,netdev=n0,mac={MAC},{NIC_OPTIONS}"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + DISCOVERY_TIMEOUT
            while http_v6 not in store.read_bytes():  # the last of the four entries is written
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("OVMF wrote no network boot entries")
                time.sleep(0.5)
            time.sleep(1)  # BootOrder is written after the entries
        finally:
            process.kill()
            process.wait(timeout=10)
        dump = scratch / "vars.json"
        subprocess.run([virt_fw_vars(), "--input", str(store), "--output-json", str(dump)], check=True,
                       capture_output=True, timeout=120)
        entries = [each for each in json.loads(dump.read_text())["variables"]
                   if each["name"].startswith("Boot") and each["name"][4:].isalnum() and len(each["name"]) == 8
                   and each["guid"] == EFI_GLOBAL]
        cached.write_text(json.dumps(entries))
        return entries
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def signed_shim() -> Path:
    """bookworm's shimx64.efi.signed (Microsoft's signature), out of shim-signed."""
    return _signed("bookworm", "shim-signed", "shimx64.efi.signed")


def signed_grub() -> Path:
    """trixie's grubnetx64.efi.signed (Debian's signature, trusted through shim), with `http`."""
    return _signed("trixie", "grub-efi-amd64-signed", "grubnetx64.efi.signed")


def _signed(suite: str, package: str, name: str) -> Path:
    record = package_record(suite, package, "amd64")
    target = CACHE / f"{package}_{record['Version']}_{name}"
    if not target.exists():
        target.write_bytes(_member(fetch_deb(record), lambda member: member.endswith("/" + name)))
    return target
