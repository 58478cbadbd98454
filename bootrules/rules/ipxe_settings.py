"""A rule's `set:`: iPXE settings emitted before the action, some of them secret."""

from __future__ import annotations

import re

import yaml

from .ipxe_syntax import words_problem
from ..model import Setting
from .yaml_nodes import NodeReader

SETTING_KEYS = ("value", "secret")
# Settings whose value is a credential, whatever the rule says.
SECRET_SETTINGS = frozenset({"password", "reverse-password"})
_SETTING_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*(:[a-z0-9]+)?")


def _name_problem(name: str) -> str | None:
    if _SETTING_NAME.fullmatch(name):
        return None
    return f"{name!r} is not an iPXE setting name (e.g. initiator-iqn, username, net0/gateway)"


def read_settings(reader: NodeReader, node: yaml.Node) -> tuple[Setting, ...]:
    if not isinstance(node, yaml.MappingNode):
        reader.problem(node, "'set:' must be a mapping of iPXE setting names to values")
        return ()
    settings = []
    for name, _key_node, value_node in reader.entries(node, "set", _name_problem):
        setting = _read_setting(reader, name, value_node)
        if setting is not None:
            settings.append(setting)
    return tuple(settings)


def _read_setting(reader: NodeReader, name: str, node: yaml.Node) -> Setting | None:
    secret = name.rsplit("/", 1)[-1].split(":")[0] in SECRET_SETTINGS
    if not isinstance(node, yaml.MappingNode):
        text = reader.text(node, f"set {name}")
        return _checked(reader, name, node, text, secret)
    value_node = None
    for key, _k, sub in reader.mapping(node, f"set {name}", SETTING_KEYS):
        if key == "value":
            value_node = sub
        else:
            # A `secret:` that is not true or false may still mean true: the value is then
            # treated as secret, so its errors never quote it.
            secret = reader.flag(sub, f"set {name} secret") is not False or secret
    if value_node is None:
        if not any(isinstance(k, yaml.ScalarNode) and k.value == "value" for k, _v in node.value):
            reader.problem(node, f"set {name}: missing 'value:'")
        return None
    return _checked(reader, name, node, reader.text(value_node, f"set {name} value"), secret)


def _checked(reader: NodeReader, name: str, node: yaml.Node, text: str | None, secret: bool) -> Setting | None:
    if text is None:
        return None
    value = reader.value(text, node, f"set {name}", lambda given: words_problem(given, show=not secret), words=True)
    return None if value is None else Setting(name=name, value=value, secret=secret)
