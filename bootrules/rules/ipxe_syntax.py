"""What can go into an iPXE command line: the checks every rendered rule value passes.

iPXE splits a script line on whitespace with no quoting, reads a word starting with `#`
as a comment and the words `||`, `&&` and `;` as command separators, and expands `${…}`.
A value that would change the meaning of the line it is put in is refused at load time.
"""

from __future__ import annotations

import re
import urllib.parse

URL_SCHEMES = ("http", "https", "tftp", "ftp", "nfs", "file")
_WHITESPACE = re.compile(r"\s")
SAN_SCHEMES = ("iscsi", "http", "https", "aoe", "ib_srp", "fcp")


def word_problem(word: str, show: bool = True) -> str | None:
    """Say why `word` cannot be one argument of an iPXE command line, or None if it can.

    iPXE splits a line on whitespace with no quoting, treats a word starting with `#` as
    a comment and the words `||`, `&&` and `;` as command separators, and expands `${…}`.
    With show=False the message does not quote the value (it is a secret).
    """
    shown = repr(word) if show else "the (secret) value"
    if not word.isprintable() or _WHITESPACE.search(word):
        return f"{shown} contains a space, line break or control character"
    if word.startswith("#"):
        return f"{shown} starts with '#', which iPXE reads as a comment"
    if word in ("||", "&&", ";"):
        return f"{shown} is an iPXE command separator"
    if word.count("${") > word.count("}"):
        return f"{shown} has an unclosed '${{' (iPXE setting expansion)"
    return None


def words_problem(text: str, show: bool = True) -> str | None:
    """Say why `text` cannot be iPXE arguments separated by single spaces, or None if it can."""
    shown = repr(text) if show else "the (secret) value"
    if not text.isprintable():
        return f"{shown} contains a line break or control character"
    if text != text.strip(" ") or "  " in text:
        return f"{shown} has leading, trailing or double spaces, which iPXE would drop"
    for word in text.split(" "):
        reason = word_problem(word, show)
        if reason:
            return reason
    return None


def url_problem(text: str) -> str | None:
    """Say why `text` is not a URL iPXE can fetch, or None if it is one."""
    reason = word_problem(text)
    if reason:
        return reason
    if not text.isascii():
        return f"{text!r} has non-ASCII characters (percent-encode them)"
    if text.startswith("/"):
        return None  # relative to the bootrules server, resolved by iPXE
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in URL_SCHEMES:
        return f"{text!r} is not a URL (expected {', '.join(s + '://' for s in URL_SCHEMES)}, or a path starting with /)"
    if parts.scheme != "file" and not parts.netloc:
        return f"{text!r} has no host"
    return None


def san_uri_problem(text: str) -> str | None:
    """Say why `text` is not a SAN URI iPXE can boot, or None if it is one."""
    reason = word_problem(text)
    if reason:
        return reason
    scheme = text.split(":", 1)[0].lower()
    if scheme not in SAN_SCHEMES:
        return f"{text!r} is not a SAN URI (expected one of: {', '.join(s + ':' for s in SAN_SCHEMES)})"
    if scheme in ("http", "https"):
        return url_problem(text)
    if scheme == "iscsi":
        return iscsi_problem(text)
    return None


def iscsi_problem(text: str) -> str | None:
    """Check `iscsi:<server>:<protocol>:<port>:<lun>:<iqn>` (empty fields take defaults)."""
    rest = text[len("iscsi:") :]
    server = ""
    if rest.startswith("["):  # IPv6 literal
        end = rest.find("]")
        if end < 0:
            return f"{text!r}: unclosed '[' in the server address"
        server, rest = rest[: end + 1], rest[end + 1 :]
        if not rest.startswith(":"):
            return f"{text!r} is not iscsi:<server>:<protocol>:<port>:<lun>:<iqn>"
        rest = rest[1:]
        fields = [server] + rest.split(":", 3)
    else:
        fields = rest.split(":", 4)
    usage = "iscsi:<server>:<protocol>:<port>:<lun>:<iqn>, e.g. iscsi:10.0.0.1::::iqn.2010-04.org.example:disk"
    if len(fields) != 5:
        return f"{text!r} is not {usage}"
    server, protocol, port, lun, iqn = fields
    if not server:
        return f"{text!r} has no server ({usage})"
    if protocol not in ("", "6"):
        return f"{text!r}: protocol must be empty or 6 (TCP), not {protocol!r}"
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        return f"{text!r}: port {port!r} is not a TCP port"
    if lun and not re.fullmatch(r"[0-9a-fA-F]{1,4}(-[0-9a-fA-F]{1,4}){0,3}", lun):
        return f"{text!r}: LUN {lun!r} is not a LUN number"
    if not iqn:
        return f"{text!r} has no target IQN ({usage})"
    return None
