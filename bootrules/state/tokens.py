"""`once:` tokens that prove themselves: who they were issued to, signed with the store's key.

A token is URL-safe base64 of: 16 random bytes (first, so that the few characters logs
show tell tokens apart), a format byte, when it was issued and when it expires, the
machine's names (its UUID, its MAC) in binary, and an HMAC-SHA256 tag (128 bits) over all
of that and the rule's name and label. The key is made once, at random, and kept in the
state store, so every worker and every server sharing the store issues and checks the
same tokens.

Why: a token must keep working even when the row that records it was never written (the
row is written after the machine is answered, in batches; a worker killed in between
loses the batch). The callback then rebuilds the machine's state from the token itself.
The rule and label are not in the token, only in its tag: the callback finds them by
checking the tag against the `once:` rules in force. Nobody without the key can make a
token that passes, nor turn one machine's token into another's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from typing import Iterable

FORMAT = 1
RANDOM_BYTES = 16  # 128 random bits
TAG_BYTES = 16
KEY_BYTES = 32
_HEAD = struct.Struct(">Bdd")  # format, issued, expires: the very times its row keeps
_HAS_UUID, _HAS_MAC = 1, 2


@dataclass(frozen=True)
class Claims:
    """What a token says of itself (not yet checked against a rule)."""

    issued: float
    expires: float
    identities: tuple[str, ...]
    signed: bytes  # the bytes the tag covers, with the rule and label
    tag: bytes


def new_key() -> str:
    return os.urandom(KEY_BYTES).hex()


def issue(key: str, identities: Iterable[str], rule: str, label: str, issued: float, expires: float) -> str:
    """A new token for the machine known by `identities` (`uuid:…` and/or `mac:…`)."""
    flags, names = 0, b""
    for name in identities:
        kind, _, value = name.partition(":")
        if kind == "uuid":
            flags |= _HAS_UUID
            names += bytes.fromhex(value.replace("-", ""))
        elif kind == "mac":
            flags |= _HAS_MAC
            names += bytes.fromhex(value.replace(":", ""))
    body = os.urandom(RANDOM_BYTES) + _HEAD.pack(FORMAT, issued, expires) + bytes([flags]) + names
    return _encode(body + _tag(key, body, rule, label))


def read(token: str) -> Claims | None:
    """The token's claims, or None if it is not a token of this format at all, or not in the
    one spelling bootrules writes (the last character's unused bits would let four strings
    decode to the same bytes)."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        return None
    if _encode(raw) != token:
        return None
    start = RANDOM_BYTES + _HEAD.size + 1
    if len(raw) < start + TAG_BYTES:
        return None
    version, issued, expires = _HEAD.unpack_from(raw, RANDOM_BYTES)
    flags = raw[start - 1]
    names, cursor = [], start
    if flags & _HAS_UUID:
        value = raw[cursor:cursor + 16].hex()
        names.append(f"uuid:{value[:8]}-{value[8:12]}-{value[12:16]}-{value[16:20]}-{value[20:]}")
        cursor += 16
    if flags & _HAS_MAC:
        names.append("mac:" + ":".join(f"{byte:02x}" for byte in raw[cursor:cursor + 6]))
        cursor += 6
    if version != FORMAT or flags & ~(_HAS_UUID | _HAS_MAC) or not names or len(raw) != cursor + TAG_BYTES:
        return None
    return Claims(issued, expires, tuple(names), raw[:cursor], raw[cursor:])


def signed_for(key: str, claims: Claims, rule: str, label: str) -> bool:
    """Whether the token was issued with `key` for `rule` and `label`."""
    return hmac.compare_digest(claims.tag, _tag(key, claims.signed, rule, label))


def _tag(key: str, body: bytes, rule: str, label: str) -> bytes:
    # The rule and label are length-prefixed, so no two pairs sign the same bytes.
    message = body
    for text in (rule, label):
        data = text.encode()
        message += struct.pack(">I", len(data)) + data
    return hmac.new(bytes.fromhex(key), message, hashlib.sha256).digest()[:TAG_BYTES]


def _encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")
