"""What a machine can be matched on, and the one normaliser per kind of value.

The same functions read a value written in rules.yaml and a value a machine sends, so
`00-11-22-AA-BB-CC` in a request meets `0011.22aa.bbcc` in a rule as the same MAC.
Each normaliser returns the canonical text or raises ValueError with a reason that can
be shown to the user as is.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import urllib.parse
from typing import Mapping, Sequence

from .errors import FactsError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Selector keys, grouped by how their values are compared.
MAC_KEYS = ("mac",)
UUID_KEYS = ("uuid",)
TEXT_KEYS = ("serial", "product", "manufacturer", "asset", "hostname")
WORD_KEYS = ("platform", "buildarch", "loader")
ADDRESS_KEYS = ("ip", "ip6", "client")
SELECTOR_KEYS = MAC_KEYS + UUID_KEYS + TEXT_KEYS + WORD_KEYS + ADDRESS_KEYS

# Keys a machine may send in the /ipxe query; `client` is never sent: it is the peer.
QUERY_KEYS = tuple(key for key in SELECTOR_KEYS if key != "client")

# The values iPXE's builtins can take. A rule naming anything else has a typo.
KNOWN_WORDS = {
    "platform": ("pcbios", "efi", "linux", "sbi"),
    "buildarch": ("i386", "x86_64", "arm32", "arm64", "riscv32", "riscv64", "loong64"),
    # Who asks, when it is not iPXE: GRUB, for machines with Secure Boot (bootrules.decide.grub).
    "loader": ("grub",),
}

# Firmware without a real UUID reports one of these; they identify no machine.
PLACEHOLDER_UUIDS = frozenset(
    {"00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff"}
)

GLOB_CHARS = frozenset("*?[")

_HEX = frozenset("0123456789abcdef")
_MAC_WHOLE = re.compile(r"[0-9a-f]{2}([:-])[0-9a-f]{2}(?:\1[0-9a-f]{2}){4}")
_MAC_SEPARATED = re.compile(r"[0-9a-f]{1,2}([:-])[0-9a-f]{1,2}(?:\1[0-9a-f]{1,2}){4}")
_MAC_DOTTED = re.compile(r"[0-9a-f]{4}\.[0-9a-f]{4}\.[0-9a-f]{4}")
_MAC_BARE = re.compile(r"[0-9a-f]{12}")
_UUID_BARE = re.compile(r"[0-9a-f]{32}")
_WORD = re.compile(r"[a-z0-9_]{1,32}")
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"  # 0-255, no leading zero
_IPV4_CANONICAL = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")


def is_glob(text: str) -> bool:
    """Tell whether a rule value uses glob syntax (`*`, `?` or `[...]`)."""
    return not GLOB_CHARS.isdisjoint(text)


def normalize_mac(text: str) -> str:
    """Return a MAC address as `aa:bb:cc:dd:ee:ff` from any common notation."""
    value = text.strip().lower()
    if _MAC_WHOLE.fullmatch(value):  # what iPXE sends (hexhyp): every octet's two digits
        return value.replace("-", ":")
    if _MAC_SEPARATED.fullmatch(value):
        octets = re.split(r"[:-]", value)
        return ":".join(octet.zfill(2) for octet in octets)
    if _MAC_DOTTED.fullmatch(value) or _MAC_BARE.fullmatch(value):
        bare = value.replace(".", "")
        return ":".join(bare[i : i + 2] for i in range(0, 12, 2))
    raise ValueError(
        f"{text!r} is not a MAC address "
        "(expected e.g. 00:11:22:33:44:55, 00-11-22-33-44-55, 0011.2233.4455 or 001122334455)"
    )


def normalize_mac_glob(text: str) -> tuple[str, bool]:
    """Return a MAC glob in canonical form and whether it is written without separators.

    `00:0C:29:*` and `00-0c-29-*` become `00:0c:29:*` (matched against `aa:bb:cc:dd:ee:ff`);
    `000c29*` stays bare (matched against `aabbccddeeff`).
    """
    value = text.strip().lower()
    if "." in value:
        raise ValueError(f"{text!r}: write a MAC glob as 00:0c:29:* or 000c29*")
    allowed = _HEX | GLOB_CHARS | set(":-]!")
    if not set(value) <= allowed:
        raise ValueError(f"{text!r} is not a MAC glob (hex digits, separators and * ? [...] only)")
    if ":" not in value and "-" not in value:
        return value, True
    value = value.replace("-", ":")
    for group in value.split(":"):
        if is_glob(group) or group.endswith("]"):
            continue
        if len(group) != 2:
            raise ValueError(f"{text!r}: each octet of a MAC glob needs two hex digits")
    return value, False


def normalize_uuid_glob(text: str) -> tuple[str, bool]:
    """Return a UUID glob lowercased, and whether it is written without hyphens.

    `4C4C4544-0042*` is matched against the hyphenated UUID; `4c4c4544004235*` (as some
    tools print UUIDs) against the UUID without its hyphens, like a bare MAC glob.
    """
    value = text.strip().lower()
    if not set(value) <= _HEX | GLOB_CHARS | set("-]!"):
        raise ValueError(f"{text!r} is not a UUID glob (hex digits, '-' and * ? [...] only)")
    return value, "-" not in value


def with_separators(key: str, bare: str) -> str:
    """Hex digits of a MAC or UUID prefix (`000c29`) in the form its values are kept in (`00:0c:29`)."""
    if key in MAC_KEYS:
        return ":".join(bare[i : i + 2] for i in range(0, len(bare), 2))
    cuts = [0, 8, 12, 16, 20, 32]
    return "-".join(bare[a:b] for a, b in zip(cuts, cuts[1:]) if bare[a:b])


def normalize_uuid(text: str) -> str:
    """Return a UUID as lowercase `8-4-4-4-12` from hyphenated, bare or braced notation."""
    value = text.strip().lower()
    if value.startswith("{") and value.endswith("}"):
        value = value[1:-1]
    bare = value.replace("-", "")
    hyphens_ok = "-" not in value or [len(p) for p in value.split("-")] == [8, 4, 4, 4, 12]
    if not (_UUID_BARE.fullmatch(bare) and hyphens_ok):
        raise ValueError(f"{text!r} is not a UUID (expected e.g. 4c4c4544-0042-3510-8052-b4c04f4d4e31)")
    return f"{bare[:8]}-{bare[8:12]}-{bare[12:16]}-{bare[16:20]}-{bare[20:]}"


def normalize_text(text: str) -> str:
    """Return free text (serial, product…) in the form compared: trimmed and case-folded.

    Firmware often pads SMBIOS strings with spaces and vendors are inconsistent about case,
    so neither counts; everything in between is compared exactly.
    """
    return text.strip().casefold()


def normalize_word(key: str, text: str) -> str:
    """Return an iPXE builtin value (platform, buildarch) lowercased, if it has their alphabet."""
    value = text.strip().lower()
    if not _WORD.fullmatch(value):
        raise ValueError(f"{text!r} is not a {key} (letters, digits and _ only)")
    return value


def normalize_address(text: str) -> str:
    """Return an IPv4 or IPv6 address in its compressed canonical form.

    An IPv4-mapped IPv6 address (::ffff:10.0.0.5, what an IPv6 socket reports for an IPv4
    peer) becomes the IPv4 address, so IPv4 rules match it.
    """
    if _IPV4_CANONICAL.fullmatch(text):  # what iPXE and every IPv4 socket write: already canonical
        return text
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None
    if address.version == 6 and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def decode_hex_text(text: str) -> str:
    """Decode the `:hexraw` form the entry script sends (e.g. `53264e2b`) back to text.

    SMBIOS strings are bytes; UTF-8 is tried first, and anything else is read as Latin-1
    so a machine with an odd byte in its serial still gets an answer.
    """
    value = text.strip().lower()
    if len(value) % 2 or not set(value) <= _HEX:
        raise ValueError(f"{text[:40]!r} is not hex (expected pairs of 0-9a-f, as ${{x:hexraw}} sends)")
    raw = bytes.fromhex(value)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


@functools.lru_cache(maxsize=16384)
def normalize_fact(key: str, text: str) -> str:
    """Normalise one value a machine sent for selector `key`; raise ValueError if it is not one.

    Cached: a machine sends the same values on every boot, and a boot storm repeats
    platform, buildarch and client addresses thousands of times. (Errors are not cached.)
    """
    if key in MAC_KEYS:
        return normalize_mac(text)
    if key in UUID_KEYS:
        return normalize_uuid(text)
    if key in ADDRESS_KEYS:
        return normalize_address(text)
    if key in WORD_KEYS:
        return normalize_word(key, text)
    return normalize_text(text)


MAX_TEXT_CHARS = 256
TOO_LONG = f"is longer than {MAX_TEXT_CHARS} characters"
MAX_QUERY_FIELDS = 64
# Query field name -> (selector key, whether the value is hex-encoded text).
_QUERY_FIELDS = {key: (key, False) for key in QUERY_KEYS} | {f"{key}_hex": (key, True) for key in TEXT_KEYS}
# The fields the entry script sends, in its order (bootrules.decide.render.ENTRY_FACTS).
ENTRY_QUERY_NAMES = ("mac", "uuid", "serial_hex", "product_hex", "manufacturer_hex", "asset_hex", "hostname_hex",
                     "ip", "ip6", "platform", "buildarch")
# Nearly every decision request is the entry script's query, field for field, with nothing
# percent-encoded: one regular expression reads it, in C, instead of a split and a partition per field.
_ENTRY_QUERY = re.compile("&".join(f"{name}=([^&%+]*)" for name in ENTRY_QUERY_NAMES))
_ENTRY_FIELDS = tuple((name, _QUERY_FIELDS[name]) for name in ENTRY_QUERY_NAMES)


def parse_query(query: str) -> dict[str, list[str]]:
    """Split a query string into its values per name (what urllib's parse_qs does, faster).

    Percent-decoding is done only where there is something to decode; bytes that are not
    UTF-8 become U+FFFD. More than MAX_QUERY_FIELDS fields raise FactsError.
    """
    params: dict[str, list[str]] = {}
    if not query:
        return params
    fields = query.split("&")
    if len(fields) > MAX_QUERY_FIELDS:
        raise FactsError(f"more than {MAX_QUERY_FIELDS} query fields")
    for field in fields:
        if not field:
            continue
        name, _, value = field.partition("=")
        if "%" in name or "+" in name:
            name = urllib.parse.unquote_plus(name, errors="replace")
        if "%" in value or "+" in value:
            value = urllib.parse.unquote_plus(value, errors="replace")
        params.setdefault(name, []).append(value)
    return params


def facts_from_query_string(query: str) -> tuple[dict[str, str], list[str]]:
    """`facts_from_query(parse_query(query))` in one pass over the query, for the common
    query: no name given two values, none encoded; the entry script's query in one regular
    expression. Any other query takes the two steps."""
    facts: dict[str, str] = {}
    ignored: list[str] = []
    if not query:
        return facts, ignored
    sent = _ENTRY_QUERY.fullmatch(query)
    if sent is not None:  # the entry script's: every name known, each once, nothing to decode
        for (name, spec), raw in zip(_ENTRY_FIELDS, sent.groups()):
            if raw:
                _add_fact(facts, name, spec, raw)
        if "ip6" in facts and "ip" not in facts:
            facts["ip"] = facts["ip6"]
        return facts, ignored
    fields = query.split("&")
    if len(fields) > MAX_QUERY_FIELDS:
        raise FactsError(f"more than {MAX_QUERY_FIELDS} query fields")
    if ("%" in query or "+" in query) and any("%" in field.partition("=")[0] or "+" in field.partition("=")[0]
                                              for field in fields):
        return facts_from_query(parse_query(query))
    known = _QUERY_FIELDS
    seen: set[str] = set()
    valued: list[tuple[str, tuple[str, bool], str]] = []
    for field in fields:
        name, _, raw = field.partition("=")
        spec = known.get(name)
        if spec is None:
            if field:
                ignored.append(name)
            continue
        if name in seen:
            return facts_from_query(parse_query(query))  # given twice: the two steps judge it
        seen.add(name)
        if raw:
            valued.append((name, spec, raw))
    if len(ignored) > 1:
        ignored = list(dict.fromkeys(ignored))
    # Every field is looked at before any value is judged, as in the two steps.
    for name, spec, raw in valued:
        if "%" in raw or "+" in raw:
            raw = urllib.parse.unquote_plus(raw, errors="replace")
            if not raw:
                continue
        _add_fact(facts, name, spec, raw)
    if "ip6" in facts and "ip" not in facts:
        facts["ip"] = facts["ip6"]  # an IPv6-only machine: `ip:` rules see its IPv6 address
    return facts, ignored


def _add_fact(facts: dict[str, str], name: str, spec: tuple[str, bool], raw: str) -> None:
    """Normalise the value `raw` of query field `name` into `facts` (FactsError if it is not one)."""
    key, hexed = spec
    try:
        if hexed:
            value = _hex_fact(key, raw)
        elif len(raw) <= MAX_TEXT_CHARS:
            value = normalize_fact(key, raw)
        else:
            raise ValueError(TOO_LONG)
    except ValueError as error:
        raise FactsError(f"{name}: {error}") from None
    if value == "" or (key in UUID_KEYS and value in PLACEHOLDER_UUIDS):
        return  # nothing, or firmware without a UUID: it identifies nothing
    if key in facts and facts[key] != value:
        raise FactsError(f"{key} and {key}_hex disagree; send one")
    facts[key] = value


@functools.lru_cache(maxsize=4096)
def _hex_fact(key: str, raw: str) -> str:
    """normalize_fact of the text `raw` encodes in hex. Cached: a fleet shares its products
    and manufacturers. (Fewer kept than normalize_fact's: a value may be 4 times as long.)"""
    text = decode_hex_text(raw)
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(TOO_LONG)
    return normalize_fact(key, text)


def facts_from_query(params: Mapping[str, Sequence[str]]) -> tuple[dict[str, str], list[str]]:
    """Turn a decision request's query into normalised facts, and list the keys it ignored.

    Each selector key may be sent plain (`serial=ABC`, as a person types it) or, for free
    text, hex-encoded (`serial_hex=414243`, as the entry script sends it). Empty values
    count as absent. A value that is not what its key claims raises FactsError.
    """
    facts: dict[str, str] = {}
    ignored: list[str] = []
    for name, given in params.items():
        field = _QUERY_FIELDS.get(name)
        if field is None:
            ignored.append(name)
            continue
        if len(given) == 1:
            raw = given[0]
            if not raw:
                continue
        else:
            distinct = {value for value in given if value != ""}
            if len(distinct) > 1:
                raise FactsError(f"{name} is given {len(distinct)} different values; send one")
            if not distinct:
                continue
            raw = distinct.pop()
        _add_fact(facts, name, field, raw)
    if "ip6" in facts and "ip" not in facts:
        facts["ip"] = facts["ip6"]  # an IPv6-only machine: `ip:` rules see its IPv6 address
    return facts, ignored


_DURATION = re.compile(r"([0-9]{1,6})\s*([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION = 366 * 86400


def parse_duration(text: str) -> int:
    """Seconds in a duration written like `90m`, `24h` or `7d` (1 minute to a year)."""
    found = _DURATION.fullmatch(text.strip().lower())
    if not found:
        raise ValueError(f"{text!r} is not a duration (a number and s, m, h or d: 90m, 24h, 7d)")
    seconds = int(found.group(1)) * _UNIT_SECONDS[found.group(2)]
    if not 60 <= seconds <= MAX_DURATION:
        raise ValueError(f"{text!r} is out of range (1 minute to 366 days)")
    return seconds


def unmapped_network(network: Network) -> Network:
    """An IPv4-mapped IPv6 range (::ffff:10.0.0.0/104) as the IPv4 range it stands for."""
    if network.version == 6 and network.prefixlen >= 96 and network.network_address.ipv4_mapped is not None:
        return ipaddress.ip_network(f"{network.network_address.ipv4_mapped}/{network.prefixlen - 96}")
    return network
