"""A rule's `menu:` action: choices for a person at the console, each a rule's action.

    menu:
      title: Lab machines
      timeout: 10s           # then the default item (0: wait for a choice)
      default: local
      items:
        - {key: local, label: Boot from local disk, exit: true}
        - {key: rescue, label: Rescue, chain: http://pxe.example.com/rescue.ipxe}

Each item takes exactly the actions a rule takes (not another menu) and `set:`, read by
the same readers, so it is checked the same way, with file:line.
"""

from __future__ import annotations

import re

import yaml

from .ipxe_syntax import words_problem
from ..model import Action, Menu, MenuItem, Setting
from .actions import ACTION_READERS
from .ipxe_settings import read_settings
from .yaml_nodes import NodeReader, line_of

MENU_KEYS = ("title", "timeout", "default", "items")
ITEM_KEYS = ("key", "label", "set", *ACTION_READERS)
ITEM_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
_TIMEOUT = re.compile(r"([0-9]{1,7})\s*(ms|s|m)?")
MAX_TIMEOUT_MS = 3600 * 1000


def read_menu(reader: NodeReader, node: yaml.Node) -> Action | None:
    if not isinstance(node, yaml.MappingNode):
        reader.problem(node, "menu must be a mapping with title:, default: and items: (and optionally timeout:)")
        return None
    title, default, timeout = "", None, 0
    items: list[MenuItem] = []
    broken = False
    items_node = default_node = None
    for key, _key_node, value_node in reader.mapping(node, "menu", MENU_KEYS):
        if key == "title":
            title = reader.checked(value_node, "menu title", words_problem, words=True) or ""
            broken |= not title
        elif key == "timeout":
            found = _timeout(reader, value_node)
            broken |= found is None
            timeout = found or 0
        elif key == "default":
            default, default_node = reader.text(value_node, "menu default"), value_node
            broken |= default is None
        else:
            items_node = value_node
            found_items = _items(reader, value_node)
            broken |= found_items is None
            items = found_items or []
    if items_node is None:
        reader.problem(node, "menu needs 'items:' (a list of {key:, label:, and one action})")
        return None
    if default_node is None:
        reader.problem(node, "menu needs 'default:' (the key of the item that runs when nobody chooses)")
        return None
    # Checked against every item's key as written, so that it is reported with the others.
    keys = [value.value for item in getattr(items_node, "value", ()) if isinstance(item, yaml.MappingNode)
            for key_node, value in item.value if isinstance(key_node, yaml.ScalarNode) and key_node.value == "key"
            and isinstance(value, yaml.ScalarNode)]
    keys = list(dict.fromkeys(keys))
    if default is not None and default not in keys:
        reader.problem(default_node, f"menu default {default!r} is not one of the items ({', '.join(keys)})")
        return None
    if broken:
        return None
    return Menu(title=title or "Boot menu", items=tuple(items), default=default, timeout=timeout)  # type: ignore[arg-type]


def _timeout(reader: NodeReader, node: yaml.Node) -> int | None:
    """Milliseconds from `10s`, `1500ms`, `2m` or a bare number of seconds."""
    text = reader.text(node, "menu timeout")
    if text is None:
        return None
    found = _TIMEOUT.fullmatch(text.strip().lower())
    if not found:
        reader.problem(node, f"menu timeout {text!r} is not a duration (10s, 1500ms, 2m; 0 waits for a choice)")
        return None
    number, unit = int(found.group(1)), found.group(2) or "s"
    milliseconds = number * {"ms": 1, "s": 1000, "m": 60000}[unit]
    if milliseconds > MAX_TIMEOUT_MS:
        reader.problem(node, f"menu timeout {text!r} is over an hour")
        return None
    return milliseconds


def _items(reader: NodeReader, node: yaml.Node) -> list[MenuItem] | None:
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        reader.problem(node, "menu items must be a list of {key:, label:, and one action}")
        return None
    items: list[MenuItem] = []
    seen: dict[str, int] = {}
    broken = False
    for position, item_node in enumerate(node.value, 1):
        item = _item(reader, item_node, position, seen)
        broken |= item is None
        if item is not None:
            items.append(item)
    return None if broken else items


def _item(reader: NodeReader, node: yaml.Node, position: int, seen: dict[str, int]) -> MenuItem | None:
    if not isinstance(node, yaml.MappingNode):
        reader.problem(node, f"menu item #{position} must be a mapping with key:, label: and one action")
        return None
    problems_before = len(reader.problems)
    key = label = None
    settings: tuple[Setting, ...] = ()
    actions: list[tuple[str, yaml.Node, Action | None]] = []
    for name, key_node, value_node in reader.mapping(node, "menu item", ITEM_KEYS):
        if name == "key":
            key = reader.text(value_node, "menu item key")
            if key is not None and not ITEM_KEY.fullmatch(key):
                reader.problem(value_node, f"menu item key {key!r} must be 1-32 letters, digits, '_' or '-'")
                key = None
            elif key is not None and key in seen:
                reader.problem(value_node, f"menu item key {key!r} already used by the item at line {seen[key]}")
            elif key is not None:
                seen[key] = line_of(node)
        elif name == "label":
            label = reader.checked(value_node, "menu item label", words_problem, words=True)
        elif name == "set":
            settings = read_settings(reader, value_node)
        else:
            actions.append((name, key_node, ACTION_READERS[name](reader, value_node)))
    given = {k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    for needed in ("key", "label"):
        if needed not in given:
            reader.problem(node, f"menu item #{position} has no '{needed}:'")
    if not actions:
        reader.problem(node, f"menu item #{position} has no action (expected exactly one of: "
                             f"{', '.join(ACTION_READERS)})")
    elif len(actions) > 1:
        given = " and ".join(name for name, _node, _action in actions)
        reader.problem(actions[1][1], f"menu item #{position}: two actions ({given}); an item has exactly one")
    if len(reader.problems) > problems_before or key is None or label is None or len(actions) != 1:
        return None
    action = actions[0][2]
    assert action is not None
    return MenuItem(key=key, label=label, action=action, settings=settings, line=line_of(node))  # type: ignore[arg-type]
