"""Marker programs for real-boot tests: a few hand-assembled x86 bytes, generated here.

Each program writes a marker to QEMU's debug console (I/O port 0x402) and ends QEMU through
the isa-debug-exit device (port 0xf4), so a test sees at once what booted, and a passing
test does not wait. The boot-sector marker also copies the text screen (VGA memory at
0xb8000) to the debug console, so the test can read what iPXE printed before it.

Nothing is downloaded: the bytes below are the whole programs.
"""

from __future__ import annotations

import struct
from typing import Union

DEBUGCON_PORT = 0x402
EXIT_PORT = 0xF4
SCREEN_CHARS = 80 * 25

Item = Union[bytes, tuple[str, str]]


def assemble(items: list[Item], origin: int) -> bytes:
    """Lay out bytes and labels: ("label", n) marks a spot; ("rel8"|"rel16"|"abs16", n) refers to it."""
    sizes = {"label": 0, "rel8": 1, "rel16": 2, "abs16": 2}
    labels: dict[str, int] = {}
    offset = 0
    for item in items:
        if isinstance(item, bytes):
            offset += len(item)
        else:
            kind, name = item
            if kind == "label":
                labels[name] = offset
            offset += sizes[kind]
    out = bytearray()
    for item in items:
        if isinstance(item, bytes):
            out += item
            continue
        kind, name = item
        if kind == "rel8":
            out += struct.pack("<b", labels[name] - (len(out) + 1))
        elif kind == "rel16":
            out += struct.pack("<h", labels[name] - (len(out) + 2))
        elif kind == "abs16":
            out += struct.pack("<H", origin + labels[name])
    return bytes(out)


# Shared routines, in 16-bit real mode with DX = 0x402 and DS addressing the strings.
PUTS: list[Item] = [  # print the NUL-terminated string at DS:SI
    ("label", "puts"),
    b"\xAC",  # lodsb
    b"\x08\xC0",  # or al, al
    b"\x74", ("rel8", "puts_end"),  # jz puts_end
    b"\xEE",  # out dx, al
    b"\xEB", ("rel8", "puts"),  # jmp puts
    ("label", "puts_end"),
    b"\xC3",  # ret
]
PUTHEX32: list[Item] = [  # print EAX as 8 lowercase hex digits
    ("label", "puthex32"),
    b"\xB9\x08\x00",  # mov cx, 8
    ("label", "hex_loop"),
    b"\x66\xC1\xC0\x04",  # rol eax, 4
    b"\x66\x50",  # push eax
    b"\x24\x0F",  # and al, 0x0f
    b"\x04\x30",  # add al, '0'
    b"\x3C\x3A",  # cmp al, '9'+1
    b"\x72\x02",  # jb +2
    b"\x04\x27",  # add al, 'a'-'0'-10
    b"\xEE",  # out dx, al
    b"\x66\x58",  # pop eax
    b"\xE2", ("rel8", "hex_loop"),  # loop hex_loop
    b"\xC3",  # ret
]


def _exit_qemu(code: int) -> list[Item]:
    return [
        b"\xBA" + struct.pack("<H", EXIT_PORT),  # mov dx, 0xf4
        b"\xB0" + bytes([code]),  # mov al, code
        b"\xEE",  # out dx, al   -> QEMU exits with status (code << 1) | 1
        ("label", "halt"),
        b"\xF4",  # hlt
        b"\xEB", ("rel8", "halt"),  # jmp halt
    ]


def boot_sector(marker: str, exit_code: int) -> bytes:
    """A 512-byte MBR that prints `marker`, then the text screen, then ends QEMU."""
    items: list[Item] = [
        b"\x31\xC0",  # xor ax, ax
        b"\x8E\xD8",  # mov ds, ax
        b"\xFC",  # cld
        b"\xBA" + struct.pack("<H", DEBUGCON_PORT),  # mov dx, 0x402
        b"\xBE", ("abs16", "message"),  # mov si, message
        b"\xE8", ("rel16", "puts"),  # call puts
        b"\xB8\x00\xB8",  # mov ax, 0xb800
        b"\x8E\xD8",  # mov ds, ax
        b"\x31\xF6",  # xor si, si
        b"\xB9" + struct.pack("<H", SCREEN_CHARS),  # mov cx, 2000
        ("label", "screen"),
        b"\xAC",  # lodsb      (character)
        b"\xEE",  # out dx, al
        b"\x46",  # inc si     (skip the attribute byte)
        b"\xE2", ("rel8", "screen"),  # loop screen
        *_exit_qemu(exit_code),
        *PUTS,
        ("label", "message"),
        marker.encode() + b"\n\0",
    ]
    code = assemble(items, origin=0x7C00)
    assert len(code) <= 440, "the boot sector code must leave room for the partition table"
    return code.ljust(510, b"\0") + b"\x55\xAA"


def disk_image(marker: str, exit_code: int, size: int = 16 * 1024 * 1024) -> bytes:
    """A disk whose first sector is the marker boot sector.

    16 MiB because iPXE's INT 13 emulation guesses 255 heads and 63 sectors for a disk
    without partitions: a disk smaller than one such cylinder (8 MiB) has zero cylinders
    and every CHS read of it fails with "Input/output error".
    """
    return boot_sector(marker, exit_code).ljust(size, b"\0")


def marker_kernel(marker: str, exit_code: int) -> bytes:
    """A Linux bzImage (boot protocol 2.06) whose setup code prints what the loader gave it.

    It prints `<marker> initrd=<size as 8 hex digits> cmdline=<command line>`, proving that
    iPXE fetched the initrd, passed the arguments and ran the kernel, then ends QEMU.
    iPXE loads the setup code at segment 0x1000 and jumps to 0x1020:0000 (file offset
    0x200) with DS = 0x1000, so header fields are read at their file offsets.
    """
    setup: list[Item] = [
        b"\xFC",  # cld
        b"\xBA" + struct.pack("<H", DEBUGCON_PORT),  # mov dx, 0x402
        b"\xBE", ("abs16", "label_initrd"),  # mov si, "<marker> initrd="
        b"\xE8", ("rel16", "puts"),
        b"\x66\xA1\x1C\x02",  # mov eax, [0x21c]  (ramdisk_size)
        b"\xE8", ("rel16", "puthex32"),
        b"\xBE", ("abs16", "label_cmdline"),  # mov si, " cmdline="
        b"\xE8", ("rel16", "puts"),
        b"\x8B\x36\x28\x02",  # mov si, [0x228]  (cmd_line_ptr; its low word is the DS offset)
        b"\xE8", ("rel16", "puts"),
        b"\xB0\x0A\xEE",  # mov al, '\n'; out dx, al
        *_exit_qemu(exit_code),
        *PUTS,
        *PUTHEX32,
        ("label", "label_initrd"),
        marker.encode() + b" initrd=\0",
        ("label", "label_cmdline"),
        b" cmdline=\0",
    ]
    code_offset = 0x280
    code = assemble(setup, origin=code_offset)
    image = bytearray(0x400 + 512)  # boot sector, one setup sector, a token protected-mode part
    image[0x1F1] = 1  # setup_sects
    image[0x1FE:0x200] = b"\x55\xAA"  # boot_flag
    image[0x200:0x202] = b"\xEB" + bytes([code_offset - 0x202])  # jmp short to the code
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x0206)  # boot protocol version
    image[0x211] = 0x01  # loadflags: LOADED_HIGH (a bzImage)
    struct.pack_into("<I", image, 0x214, 0x100000)  # code32_start
    struct.pack_into("<I", image, 0x22C, 0x7FFFFFFF)  # initrd_addr_max
    struct.pack_into("<I", image, 0x238, 255)  # cmdline_size
    image[code_offset : code_offset + len(code)] = code
    assert code_offset + len(code) <= 0x400
    return bytes(image)
