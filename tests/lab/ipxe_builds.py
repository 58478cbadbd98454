"""The iPXE builds the real-boot tests run: the host's own (Debian's ipxe-qemu, installed) and
trixie's (iPXE 1.21.1+git20250501), fetched from Debian's mirror into a cache directory and
unpacked there with `dpkg -x`, never installed over the system's.

QEMU finds a NIC's option ROM on its search path; `-L DIR` puts DIR first, so a VM given a
build's ROM directory runs that build's efi-virtio.rom (BIOS and UEFI images in one file),
while every other firmware file still comes from the system. (An explicit romfile= on the
NIC would make SeaBIOS skip the option ROM.)
"""

from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

def system_mirror() -> str:
    """The Debian archive this machine's apt uses (the first `debian` URI of its sources), so the
    tests fetch from wherever this machine's packages come from; BOOTRULES_DEBIAN_MIRROR wins."""
    given = os.environ.get("BOOTRULES_DEBIAN_MIRROR")
    if given:
        return given.rstrip("/")
    lines: list[str] = []
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        lines += [line.split(":", 1)[1] for line in path.read_text().splitlines() if line.startswith("URIs:")]
    sources_list = Path("/etc/apt/sources.list")
    if sources_list.exists():
        lines += [line.split()[1] for line in sources_list.read_text().splitlines()
                  if line.startswith("deb ") and len(line.split()) > 2 and "[" not in line.split()[1]]
    for uris in lines:
        for uri in uris.split():
            if uri.rstrip("/").endswith("/debian"):
                return uri.rstrip("/")
    raise RuntimeError("no Debian archive in /etc/apt/sources.list(.d); set BOOTRULES_DEBIAN_MIRROR")


MIRROR = system_mirror()
CACHE = Path(os.environ.get("BOOTRULES_TEST_CACHE", Path.home() / ".cache" / "bootrules-tests"))
ROM = "efi-virtio.rom"
HOST_ROM_DIRS = (Path("/usr/lib/ipxe/qemu"), Path("/usr/share/qemu"))


@dataclass(frozen=True)
class IpxeBuild:
    """One generation of iPXE: a name for test ids, the directory its virtio ROM is in (None:
    QEMU's default, the host's installed ipxe-qemu), and its ipxe.efi for UEFI machines.

    Under OVMF, trixie's NIC ROM only drives the NIC: the firmware's own PXE client boots,
    and it fetches its boot file by TFTP. So UEFI machines run that build's ipxe.efi, as a
    real UEFI fleet does: fetched by the firmware over TFTP, it runs `autoexec.ipxe` from
    beside itself. (bookworm's ROM still boots iPXE itself under OVMF: efi_binary None.)
    """

    name: str
    rom_dir: Path | None
    version: str
    efi_binary: Path | None = None

    def qemu_args(self) -> list[str]:
        return ["-L", str(self.rom_dir)] if self.rom_dir is not None else []


def host_build() -> IpxeBuild | None:
    for directory in HOST_ROM_DIRS:
        if (directory / ROM).exists():
            return IpxeBuild("host", None, _installed_version())
    return None


def _installed_version() -> str:
    found = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "ipxe-qemu"], capture_output=True, text=True)
    return found.stdout.strip() or "unknown"


def debian_build(suite: str) -> IpxeBuild:
    """Debian `suite`'s ipxe-qemu (the NIC ROM) and ipxe (ipxe.efi), unpacked under CACHE."""
    roms, version = _unpacked(suite, "ipxe-qemu", ROM)
    efi, _version = _unpacked(suite, "ipxe", "ipxe.efi")
    return IpxeBuild(suite, roms.parent, version, efi)


def _unpacked(suite: str, package: str, wanted: str) -> tuple[Path, str]:
    """The file `wanted` from `package` of Debian `suite` (fetched once, checked by SHA-256,
    unpacked with dpkg-deb under CACHE), and the package's version."""
    record = package_record(suite, package)
    version = record["Version"]
    target = CACHE / f"{package}_{version}"
    found = next(target.rglob(wanted), None) if target.exists() else None
    if found is None:
        deb = fetch_deb(record)
        unpacking = Path(tempfile.mkdtemp(prefix="unpack-", dir=CACHE))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacking)], check=True)
        shutil.rmtree(target, ignore_errors=True)
        unpacking.rename(target)
        found = next(target.rglob(wanted))
    return found, version


def package_record(suite: str, package: str, arch: str = "all") -> dict[str, str]:
    """The stanza of `package` in Debian `suite`'s index for `arch` (the index is cached a week)."""
    index = _fetch(f"{MIRROR}/dists/{suite}/main/binary-{arch}/Packages.xz", CACHE / f"Packages-{suite}-{arch}.xz",
                   None, max_age=7 * 86400)
    for stanza in lzma.decompress(index.read_bytes()).decode("utf-8", "replace").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line.startswith(" "))
        if fields.get("Package") == package:
            return fields
    raise RuntimeError(f"{package} is not in Debian {suite}'s package index")


def fetch_deb(record: dict[str, str]) -> Path:
    """The .deb a package stanza names, fetched once into CACHE and checked by SHA-256."""
    return _fetch(f"{MIRROR}/{record['Filename']}", CACHE / Path(record["Filename"]).name, record["SHA256"])


def _fetch(url: str, path: Path, sha256: str | None, max_age: float | None = None) -> Path:
    import time

    fresh = path.exists() and (max_age is None or time.time() - path.stat().st_mtime < max_age)
    if fresh and (sha256 is None or hashlib.sha256(path.read_bytes()).hexdigest() == sha256):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".part")
    with urllib.request.urlopen(url, timeout=120) as response, open(partial, "wb") as out:
        shutil.copyfileobj(response, out)
    if sha256 is not None and hashlib.sha256(partial.read_bytes()).hexdigest() != sha256:
        partial.unlink()
        raise RuntimeError(f"{url}: SHA-256 does not match Debian's index")
    partial.rename(path)
    return path
