"""A rule's `once:`: install once, then let the machine fall through (see bootrules.state.once)."""

from __future__ import annotations

import re

import yaml

from ..model import Once
from ..values import parse_duration
from .yaml_nodes import NodeReader, parse_flag

ONCE_KEYS = ("label", "expires")
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TRUE_LABEL = "true"  # `once: true` is a label like any other


def read_once(reader: NodeReader, node: yaml.Node) -> Once | None:
    if isinstance(node, yaml.MappingNode):
        label, expires = TRUE_LABEL, 0
        broken = False
        for key, _key_node, value_node in reader.mapping(node, "once", ONCE_KEYS):
            if key == "label":
                label = _label(reader, value_node)
                broken |= label is None
            else:
                text = reader.text(value_node, "once expires")
                try:
                    expires = parse_duration(text) if text is not None else 0
                except ValueError as error:
                    reader.problem(value_node, f"once expires: {error}")
                broken |= text is None or not expires
        return None if broken else Once(label=label, expires=expires)  # type: ignore[arg-type]
    label = _label(reader, node)
    return None if label is None else Once(label=label, expires=0)


def _label(reader: NodeReader, node: yaml.Node) -> str | None:
    text = reader.text(node, "once")
    if text is None:
        return None
    flag = parse_flag(text)
    if flag is True:
        return TRUE_LABEL
    if flag is False:
        reader.problem(node, "'once: false' does nothing; remove it (or give a label to re-arm)")
        return None
    if not LABEL.fullmatch(text):
        reader.problem(node, f"once: label {text!r} must be 1-64 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit")
        return None
    return text
