"""A rule's `match:`: selector keys and their values, each compiled into a pattern."""

from __future__ import annotations

import fnmatch
import ipaddress
import re

import yaml

from .. import values
from ..model import Exact, Glob, Network, Pattern, Selector
from ..values import unmapped_network
from .yaml_events import YAML_NULL
from .yaml_nodes import NodeReader, suggest

_GLOB_SPLIT = re.compile("[" + re.escape("".join(sorted(values.GLOB_CHARS))) + "]")


def read_match(reader: NodeReader, node: yaml.Node) -> tuple[Selector, ...]:
    if (isinstance(node, yaml.MappingNode) and not node.value) or (
        isinstance(node, yaml.ScalarNode) and node.tag == YAML_NULL
    ):
        reader.problem(node, "'match:' is empty; to match every machine, leave 'match:' out")
        return ()
    selectors = []
    if not isinstance(node, yaml.MappingNode):
        reader.problem(node, f"match must be a mapping of {', '.join(values.SELECTOR_KEYS)}, or inventory columns")
        return ()
    for key, key_node, value_node in reader.entries(node, "match", lambda key: _key_problem(key)):
        if key not in values.SELECTOR_KEYS:
            # A column of the inventory, if there is one by that name (checked once it is read).
            reader.columns.append((key, key_node, reader.rule_name, len(reader.problems)))
        patterns = []
        for text, item in reader.texts(value_node, f"match {key}"):
            try:
                patterns.append(compile_pattern(key, text))
            except ValueError as error:
                reader.problem(item, f"match {key}: {error}")
        if patterns:
            selectors.append(Selector(key=key, patterns=tuple(patterns)))
    return tuple(selectors)


def _key_problem(key: str) -> str | None:
    from .inventory import VARIABLE_NAME

    if key in values.SELECTOR_KEYS or VARIABLE_NAME.fullmatch(key):
        return None
    return f"unknown key '{key}' {suggest(key, values.SELECTOR_KEYS)}"


def compile_pattern(key: str, text: str) -> Pattern:
    """Turn one rule value for selector `key` into a pattern; raise ValueError if it is wrong."""
    if key in values.ADDRESS_KEYS:
        return _network(text)
    if not values.is_glob(text):
        return Exact(_exact_value(key, text))
    bare = False
    if key in values.MAC_KEYS:
        pattern, bare = values.normalize_mac_glob(text)
    elif key in values.UUID_KEYS:
        pattern, bare = values.normalize_uuid_glob(text)
    elif key in values.WORD_KEYS:
        pattern = text.strip().lower()
    else:
        pattern = values.normalize_text(text)
    literal = _GLOB_SPLIT.split(pattern, maxsplit=1)[0]
    if bare:  # index bare prefixes in the form facts are kept in (with separators)
        literal = values.with_separators(key, literal)
    simple = pattern.endswith("*") and not values.is_glob(pattern[:-1])
    regex = None if simple else re.compile(fnmatch.translate(pattern))
    return Glob(text=pattern, regex=regex, prefix=literal, bare=bare)


def _network(text: str) -> Network:
    if values.is_glob(text):
        raise ValueError(f"{text!r}: write an address or a CIDR range such as 10.0.0.0/24, not a glob")
    try:
        network = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as error:
        if "has host bits set" in str(error):
            wide = ipaddress.ip_network(text.strip(), strict=False)
            raise ValueError(f"{text!r} has host bits set (did you mean {wide}?)") from None
        raise ValueError(f"{text!r} is not an IP address or CIDR range") from None
    if unmapped_network(network) != network:
        # Machines' IPv4-mapped addresses are unmapped before matching (bootrules.web.proxies).
        raise ValueError(f"{text!r} is an IPv4-mapped range; write it as {unmapped_network(network)}")
    return Network(network)


def _exact_value(key: str, text: str) -> str:
    if key in values.MAC_KEYS:
        return values.normalize_mac(text)
    if key in values.UUID_KEYS:
        uuid = values.normalize_uuid(text)
        if uuid in values.PLACEHOLDER_UUIDS:
            raise ValueError(f"{text!r} is the placeholder UUID of firmware that has none; it identifies no machine")
        return uuid
    if key in values.WORD_KEYS:
        word = values.normalize_word(key, text)
        known = values.KNOWN_WORDS[key]
        if word not in known:
            raise ValueError(f"unknown {key} {text!r} {suggest(word, known)}")
        return word
    value = values.normalize_text(text)
    if not value:
        raise ValueError("empty value")
    return value
