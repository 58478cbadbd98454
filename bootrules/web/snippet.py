"""The rule to paste for a machine the rules do not name yet.

It is YAML for one item of `rules:`: a name made from what the machine told (product and
serial, else its MAC), `match:` on its MAC (the one value every PXE NIC sends and no two
NICs share), the other values it sent as commented-out alternatives, and `exit: true` as
the placeholder action (valid as written, and harmless: the machine boots its disk).

Everything a machine sent is hostile. Values appear only as YAML double-quoted scalars with
every control character, quote, backslash and non-ASCII character escaped:
a serial cannot end the comment it is in, start a new key, or change the indentation.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

import yaml

INDENT = "  "
_NOT_NAME = re.compile(r"[^a-z0-9]+")
ALTERNATIVES = ("uuid", "serial", "product", "manufacturer", "asset", "hostname")
PLACEHOLDER = "exit: true"


def rule_name(facts: Mapping[str, str], taken: Collection[str] = ()) -> str:
    """A rule name from what the machine sent, not one of `taken`."""
    parts = [_slug(facts.get("product", ""), 24), _slug(facts.get("serial", ""), 20)]
    parts = [part for part in parts if part]
    if not parts or not facts.get("serial"):
        parts.append(_bare(facts))
    base = "-".join(part for part in parts if part)[:56].strip("-") or "machine"
    if not base[0].isalnum():
        base = "machine-" + base
    name, number = base, 2
    while name in taken:
        name, number = f"{base}-{number}", number + 1
    return name


def _slug(text: str, limit: int) -> str:
    return _NOT_NAME.sub("-", text.casefold()).strip("-")[:limit].strip("-")


def _bare(facts: Mapping[str, str]) -> str:
    if facts.get("mac"):
        return facts["mac"].replace(":", "")
    if facts.get("uuid"):
        return facts["uuid"].split("-")[0]
    return "machine"


def rule_to_paste(facts: Mapping[str, str], client: str | None, taken: Collection[str] = ()) -> str:
    """The YAML of one rule for this machine, indented to go under `rules:`."""
    if facts.get("mac"):
        key = "mac"
    elif facts.get("uuid"):
        key = "uuid"
    else:
        key = "client"
    value = facts.get(key) if key != "client" else client
    name = rule_name(facts, taken)
    if yaml.safe_load(name) != name:  # `null`, `yes`, `0x1f`…: YAML would read something else
        name = _quoted(name)
    lines = [f"- name: {name}", "  match:", f"    {key}: {_quoted(value or '')}"]
    others = [name for name in ALTERNATIVES if name != key and facts.get(name)]
    if others:
        lines.append("    # also sent (uncomment to match on it too; every key given must fit):")
        lines += [f"    # {name}: {_quoted(facts[name])}" for name in others]
    lines.append(f"  {PLACEHOLDER}  # placeholder: this machine's action (chain:, sanboot:, boot:); "
                 "paste above your catch-all")
    return "\n".join(INDENT + line for line in lines) + "\n"


def _quoted(value: str) -> str:
    """`value` as a YAML double-quoted scalar of printable ASCII (anything else escaped)."""
    escaped = []
    for char in value:
        code = ord(char)
        if char in '"\\':
            escaped.append("\\" + char)
        elif 0x20 <= code < 0x7F:
            escaped.append(char)
        elif code <= 0xFF:
            escaped.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            escaped.append(f"\\u{code:04x}")
        else:
            escaped.append(f"\\U{code:08x}")
    return '"' + "".join(escaped) + '"'
