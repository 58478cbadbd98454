"""A scripted PXE/iPXE DHCP client and TFTP client, run inside a test's client namespace.

    ip netns exec NS python dhcp_probe.py dhcp --iface veth-c --mac 52:54:00:00:00:01 --arch 0
    ip netns exec NS python dhcp_probe.py tftp --server 10.99.0.1 --file undionly.kpxe --out F

`dhcp` sends DISCOVER (and REQUEST for the offered lease) the way the chosen firmware
does: legacy PXE (vendor class PXEClient, option 93), UEFI, arm64, UEFI HTTP Boot (vendor
class HTTPClient), iPXE (user class "iPXE" plus option 175) or gPXE. It prints one JSON object with every OFFER and the ACK.
It must only ever run inside a namespace a test made: it broadcasts DHCP.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import socket
import struct
import subprocess
import sys
import time

DHCP_MAGIC = b"\x63\x82\x53\x63"
DISCOVER, OFFER, REQUEST, ACK, NAK = 1, 2, 3, 5, 6


def build_packet(kind: int, xid: int, mac: bytes, options: list[tuple[int, bytes]], ciaddr: str = "0.0.0.0") -> bytes:
    header = struct.pack(
        "!BBBBIHH4s4s4s4s16s64s128s",
        1, 1, 6, 0, xid, 0, 0x8000,  # BOOTREQUEST, Ethernet, broadcast flag
        socket.inet_aton(ciaddr), b"\0" * 4, b"\0" * 4, b"\0" * 4,
        mac.ljust(16, b"\0"), b"", b"",
    )
    body = bytes([53, 1, kind])
    for code, value in options:
        body += bytes([code, len(value)]) + value
    return header + DHCP_MAGIC + body + b"\xff"


def parse_packet(data: bytes) -> dict:
    fields = struct.unpack("!BBBBIHH4s4s4s4s16s64s128s", data[:236])
    options: dict[int, bytes] = {}
    rest = data[240:]
    i = 0
    while i < len(rest):
        code = rest[i]
        if code == 255:
            break
        if code == 0:
            i += 1
            continue
        length = rest[i + 1]
        options[code] = options.get(code, b"") + rest[i + 2 : i + 2 + length]
        i += 2 + length
    text = lambda raw: raw.split(b"\0", 1)[0].decode("latin-1")  # noqa: E731
    # Option overload (52) moves the file/sname into options; dnsmasq does not use it here.
    return {
        "xid": fields[4],
        "yiaddr": socket.inet_ntoa(fields[8]),
        "siaddr": socket.inet_ntoa(fields[9]),
        "sname": text(fields[12]),
        "file": text(fields[13]),
        "type": options.get(53, b"\0")[0],
        "server_id": socket.inet_ntoa(options[54]) if 54 in options else None,
        "option_66": text(options[66]) if 66 in options else None,
        "option_67": text(options[67]) if 67 in options else None,
        "vendor_class": text(options[60]) if 60 in options else None,
        "has_option_43": 43 in options,
        "pxe_menu_types": _menu_types(options.get(43, b"")),
    }


def _menu_types(vendor: bytes) -> list[int]:
    """Boot item types of the PXE boot menu (option 43, sub-option 9) in a proxy offer."""
    types = []
    i = 0
    while i + 1 < len(vendor) and vendor[i] != 255:
        code, length = vendor[i], vendor[i + 1]
        value = vendor[i + 2 : i + 2 + length]
        if code == 9:
            j = 0
            while j + 3 <= len(value):
                types.append(struct.unpack("!H", value[j : j + 2])[0])
                j += 3 + value[j + 2]
        i += 2 + length
    return types


def firmware_options(kind: str, arch: int | None, guid: bytes) -> list[tuple[int, bytes]]:
    """The options a client of this kind sends (see PXE 2.1 and iPXE's dhcp.c)."""
    arch_value = 0 if arch is None else arch
    options = [
        (55, bytes([1, 3, 6, 12, 15, 43, 60, 66, 67, 93, 94, 97, 128, 129, 175])),
        (57, struct.pack("!H", 1472)),
        (93, struct.pack("!H", arch_value)),
        (94, bytes([1, 3, 16])),  # UNDI 3.16
        (97, b"\0" + guid),
        (60, f"{'HTTPClient' if kind == 'httpclient' else 'PXEClient'}:Arch:{arch_value:05d}:UNDI:003016".encode()),
    ]
    if kind == "ipxe":
        options += [(77, b"iPXE"), (175, bytes([0x13, 1, 1, 0x11, 1, 1, 0xEB, 3, 1, 0, 0]))]
    elif kind == "gpxe":
        options += [(77, b"gPXE"), (175, bytes([0x13, 1, 1, 0x11, 1, 1]))]
    elif kind == "ipxe-175-only":
        options += [(175, bytes([0x13, 1, 1]))]
    elif kind == "other-user-class":
        options += [(77, b"MSFT 5.0")]
    return options


def receive(sock: socket.socket, xid: int, wanted: set[int], seconds: float, done=lambda replies: bool(replies)) -> list[dict]:
    """Collect replies of the wanted types until `done(replies)` or `seconds` have passed."""
    replies: list[dict] = []
    deadline = time.monotonic() + seconds
    while not done(replies):
        left = deadline - time.monotonic()
        if left <= 0:
            return replies
        ready, _, _ = select.select([sock], [], [], min(left, 0.1))
        if not ready:
            continue
        data, (address, _port) = sock.recvfrom(4096)
        if len(data) < 240 or data[236:240] != DHCP_MAGIC:
            continue
        packet = parse_packet(data)
        if packet["xid"] == xid and packet["type"] in wanted:
            packet["from"] = address
            packet["at"] = time.monotonic()
            replies.append(packet)
    return replies


def offers_complete(offers: list[dict]) -> bool:
    """An address offer is in, and a proxy-DHCP offer too or half a second to spare for one."""
    leases = [offer for offer in offers if offer["yiaddr"] != "0.0.0.0"]
    proxies = [offer for offer in offers if offer["yiaddr"] == "0.0.0.0"]
    if not leases:
        return False
    if proxies:
        return True
    # A proxy server answers at once; the address server may be slower (it pings first).
    return time.monotonic() - leases[0]["at"] > 0.5


def dhcp(args: argparse.Namespace) -> dict:
    mac = bytes.fromhex(args.mac.replace(":", ""))
    guid = os.urandom(16)
    options = firmware_options(args.kind, args.arch, guid)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, args.iface.encode())
    sock.bind(("", 68))
    xid = random.getrandbits(32)
    result: dict = {"offers": [], "ack": None}
    for _attempt in range(3):
        sock.sendto(build_packet(DISCOVER, xid, mac, options), ("255.255.255.255", 67))
        result["offers"] = receive(sock, xid, {OFFER}, args.wait, offers_complete)
        if result["offers"]:
            break
    lease = next((offer for offer in result["offers"] if offer["yiaddr"] != "0.0.0.0"), None)
    if lease is not None:
        request = options + [(54, socket.inet_aton(lease["server_id"])), (50, socket.inet_aton(lease["yiaddr"]))]
        sock.sendto(build_packet(REQUEST, xid, mac, request), ("255.255.255.255", 67))
        acks = receive(sock, xid, {ACK, NAK}, args.wait)
        result["ack"] = acks[0] if acks else None
    proxy = next((offer for offer in result["offers"] if offer["yiaddr"] == "0.0.0.0"), None)
    if proxy is not None and result["ack"] is not None:
        result["proxy_ack"] = proxy_request(sock, xid, mac, options, proxy, result["ack"]["yiaddr"], args)
    return result


def proxy_request(sock: socket.socket, xid: int, mac: bytes, options: list, proxy: dict, address: str, args) -> dict | None:
    """Ask the proxy-DHCP server for the boot file on port 4011, as PXE firmware and iPXE do."""
    subprocess.run(["ip", "addr", "add", f"{address}/24", "dev", args.iface], check=False)
    time.sleep(0.5)  # let the address settle before sending from it
    request = list(options)
    if proxy["pxe_menu_types"]:  # choose the first (only) menu item, layer 0
        request.append((43, bytes([71, 4]) + struct.pack("!HH", proxy["pxe_menu_types"][0], 0) + b"\xff"))
    sock.sendto(build_packet(REQUEST, xid, mac, request, ciaddr=address), (proxy["server_id"] or proxy["from"], 4011))
    acks = receive(sock, xid, {ACK}, args.wait)
    return acks[0] if acks else None


def tftp(args: argparse.Namespace) -> dict:
    """Fetch one file over TFTP (RFC 1350), asking for 1428-byte blocks (RFC 2348) as firmware does."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5)
    sock.sendto(b"\0\1" + args.file.encode() + b"\0octet\0blksize\0" + b"1428\0", (args.server, 69))
    data = bytearray()
    block_size = 512
    expected = 1
    while True:
        packet, peer = sock.recvfrom(4 + 65536)
        opcode = struct.unpack("!H", packet[:2])[0]
        if opcode == 5:
            return {"error": packet[4:].split(b"\0", 1)[0].decode("latin-1")}
        if opcode == 6:  # OACK: the server agreed to options
            options = packet[2:].split(b"\0")
            agreed = dict(zip(options[0::2], options[1::2]))
            block_size = int(agreed.get(b"blksize", b"512"))
            sock.sendto(struct.pack("!HH", 4, 0), peer)
            continue
        block = struct.unpack("!H", packet[2:4])[0]
        if opcode == 3 and block == expected:
            data += packet[4:]
            sock.sendto(struct.pack("!HH", 4, block), peer)
            expected = (expected + 1) % 65536
            if len(packet) - 4 < block_size:
                break
    with open(args.out, "wb") as out:
        out.write(data)
    return {"size": len(data), "block_size": block_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dhcp")
    d.add_argument("--iface", required=True)
    d.add_argument("--mac", required=True)
    d.add_argument("--kind", choices=["pxe", "httpclient", "ipxe", "gpxe", "ipxe-175-only", "other-user-class"], default="pxe")
    d.add_argument("--arch", type=int, default=0)
    d.add_argument("--wait", type=float, default=5.0)
    t = sub.add_parser("tftp")
    t.add_argument("--server", required=True)
    t.add_argument("--file", required=True)
    t.add_argument("--out", required=True)
    args = parser.parse_args()
    result = dhcp(args) if args.command == "dhcp" else tftp(args)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
