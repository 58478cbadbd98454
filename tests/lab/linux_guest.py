"""A real Linux for `boot` rules: Debian's own kernel (linux-image-amd64's vmlinuz, which has an
EFI stub, so one file boots under SeaBIOS and OVMF alike) and a tiny initramfs built here
around busybox-static, whose /init quiets the kernel's console messages, prints a marker and
/proc/cmdline to the serial console, then powers the VM off.

The two .debs are fetched once from Debian's mirror into the test cache (the kernel package
is about 70 MB) and only the files needed are taken out of them; nothing is installed.
"""

from __future__ import annotations

import io
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from ipxe_builds import CACHE, fetch_deb, package_record
from support import IN_CI

SUITE = "bookworm"
MARKER = "BOOTRULES-LINUX-OK"
# The kernel's own messages are kept off the console first: printed while the marker line
# is written, one lands in the middle of it (seen: `rule=efi-linux[    2.219481] tsc: …`).
INIT = f"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox dmesg -n 1
echo "{MARKER} cmdline=$(/bin/busybox cat /proc/cmdline)" > /dev/ttyS0
/bin/busybox sync
/bin/busybox poweroff -f
"""


def kernel() -> Path:
    """Debian's amd64 kernel (the version linux-image-amd64 names), extracted once."""
    meta = package_record(SUITE, "linux-image-amd64", "amd64")
    image = meta["Depends"].split(",")[0].split()[0]  # linux-image-6.1.0-NN-amd64
    target = CACHE / f"vmlinuz-{meta['Version']}"
    if not target.exists():
        deb = fetch_deb(package_record(SUITE, image, "amd64"))
        target.write_bytes(_member(deb, lambda name: name.startswith("./boot/vmlinuz-")))
    return target


def kernel_and_initramfs() -> tuple[bytes, bytes]:
    """The kernel and the marker initramfs; a skip without them on a laptop with no network
    and nothing cached, a failure in CI."""
    try:
        return kernel().read_bytes(), initramfs()
    except OSError as error:
        if IN_CI:
            raise
        pytest.skip(f"cannot fetch Debian's kernel or busybox: {error}")


def busybox() -> Path:
    record = package_record(SUITE, "busybox-static", "amd64")
    target = CACHE / f"busybox-{record['Version']}"
    if not target.exists():
        target.write_bytes(_member(fetch_deb(record), lambda name: name == "./bin/busybox"))
    return target


def initramfs() -> bytes:
    """A newc cpio (what the kernel unpacks as its first root): /init, busybox, /dev nodes."""
    entries = [
        ("dev", stat.S_IFDIR | 0o755, b"", 0), ("proc", stat.S_IFDIR | 0o755, b"", 0),
        ("bin", stat.S_IFDIR | 0o755, b"", 0),
        ("dev/console", stat.S_IFCHR | 0o600, b"", (5, 1)), ("dev/ttyS0", stat.S_IFCHR | 0o600, b"", (4, 64)),
        ("bin/busybox", stat.S_IFREG | 0o755, busybox().read_bytes(), 0),
        ("init", stat.S_IFREG | 0o755, INIT.encode(), 0),
    ]
    out = io.BytesIO()
    for number, (name, mode, data, device) in enumerate(entries, 1):
        _cpio_entry(out, number, name, mode, data, device)
    _cpio_entry(out, 0, "TRAILER!!!", 0, b"", 0)
    return out.getvalue()


def _cpio_entry(out: io.BytesIO, inode: int, name: str, mode: int, data: bytes, device: object) -> None:
    major, minor = device if isinstance(device, tuple) else (0, 0)
    encoded = name.encode() + b"\0"
    fields = [inode, mode, 0, 0, 1, 0, len(data), 0, 0, major, minor, len(encoded), 0]
    out.write(b"070701" + b"".join(f"{field:08x}".encode() for field in fields) + encoded)
    out.write(b"\0" * (-out.tell() % 4))
    out.write(data)
    out.write(b"\0" * (-out.tell() % 4))


def _member(deb: Path, wanted) -> bytes:
    """One file out of a .deb's data archive (dpkg-deb --fsys-tarfile, read as it streams)."""
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as process:
        assert process.stdout is not None
        with tarfile.open(fileobj=process.stdout, mode="r|") as archive:
            for member in archive:
                if member.isfile() and wanted(member.name):
                    found = archive.extractfile(member)
                    assert found is not None
                    data = found.read()
                    process.kill()
                    return data
    raise RuntimeError(f"{deb.name}: no such file")
