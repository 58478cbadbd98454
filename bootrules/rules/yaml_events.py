"""Compose YAML nodes from libyaml's event stream one piece at a time.

yaml.compose builds the node tree of a whole document first: for a large rule file that
is several times the memory of the rules themselves, which the process then keeps. Reading events and composing one rule at
a time keeps only the rule at hand, with the same nodes (and their line numbers).
"""

from __future__ import annotations

from typing import Iterator

import yaml

YAML_NULL = "tag:yaml.org,2002:null"
# No rule needs more than four levels; a deeply nested document is refused, not recursed into.
MAX_DEPTH = 32

_NULL_TEXT = frozenset({"", "~", "null", "Null", "NULL"})


class Composer:
    """Builds nodes from an event stream, one node (and what it holds) per call.

    Scalars keep the text as written; only the null tag is resolved, because an empty
    value must be told from an empty string.
    """

    def __init__(self, events: Iterator[yaml.Event]) -> None:
        self.events = events
        self.peeked: yaml.Event | None = None
        self.anchors: dict[str, yaml.Node] = {}

    def peek(self) -> yaml.Event:
        if self.peeked is None:
            self.peeked = next(self.events)
        return self.peeked

    def next(self) -> yaml.Event:
        event = self.peek()
        self.peeked = None
        return event

    def node(self, depth: int = 0) -> yaml.Node:
        """Compose the node that starts at the next event (and everything inside it)."""
        event = self.next()
        if depth > MAX_DEPTH and isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep", event.start_mark)
        if isinstance(event, yaml.AliasEvent):
            if event.anchor not in self.anchors:
                raise yaml.composer.ComposerError(None, None, f"found undefined alias {event.anchor!r}", event.start_mark)
            return self.anchors[event.anchor]
        node: yaml.Node
        if isinstance(event, yaml.ScalarEvent):
            style = event.style or None  # libyaml says '' for plain, the Python parser None
            plain_null = style is None and event.implicit[0] and event.value in _NULL_TEXT
            tag = YAML_NULL if plain_null and not event.tag else (event.tag or "tag:yaml.org,2002:str")
            node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, style=style)
        elif isinstance(event, yaml.SequenceStartEvent):
            node = yaml.SequenceNode(event.tag or "tag:yaml.org,2002:seq", [], event.start_mark, None)
            while not isinstance(self.peek(), yaml.SequenceEndEvent):
                node.value.append(self.node(depth + 1))
            node.end_mark = self.next().end_mark
        elif isinstance(event, yaml.MappingStartEvent):
            node = yaml.MappingNode(event.tag or "tag:yaml.org,2002:map", [], event.start_mark, None)
            while not isinstance(self.peek(), yaml.MappingEndEvent):
                key = self.node(depth + 1)
                node.value.append((key, self.node(depth + 1)))
            node.end_mark = self.next().end_mark
        else:  # pragma: no cover - libyaml never emits anything else here
            raise yaml.composer.ComposerError(None, None, f"unexpected {event}", event.start_mark)
        if getattr(event, "anchor", None):
            self.anchors[event.anchor] = node
        return node
