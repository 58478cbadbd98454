"""Reading composed YAML nodes with every problem collected as `file:line: …`, not raised.

`NodeReader` is what every part of the rules reader (document, rule, `match:`, `set:`, each
action) is handed: it turns a node into a value or records why it cannot, with the line
of the node and the name of the rule being read.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Iterator

import yaml

from ..errors import RulesError
from ..model import FieldTemplate
from .yaml_events import YAML_NULL

__all__ = ["NodeReader", "RulesError", "line_of", "parse_flag", "suggest"]

# Aliases let a small file describe a huge tree ("billion laughs"); walking stops here.
MAX_NODES_VISITED = 5_000_000

_TRUE = frozenset({"true", "yes", "on"})
_FALSE = frozenset({"false", "no", "off"})


def parse_flag(text: str) -> bool | None:
    """True or False for the words YAML users write for them (any case); None for anything else."""
    word = text.lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    return None


def line_of(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def suggest(word: str, choices: tuple[str, ...]) -> str:
    """'(did you mean …? expected one of: …)' for a key that is not one of `choices`."""
    close = difflib.get_close_matches(word, choices, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"({hint}expected one of: {', '.join(choices)})"


class NodeReader:
    """Turns nodes into values, recording a problem (with file, line and rule) for each that is wrong."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []
        self.rule_name: str | None = None
        self.visited = 0
        # The values of the rule being read that are templates (bootrules.rules.templates),
        # and the sandbox they are compiled in (made when a first one is met).
        self.templates: list[FieldTemplate] = []
        self._sandbox: Any = None
        # match: keys that are no selector, for the inventory's columns: (key, its node, the
        # rule, where its problem goes among the others if it is none).
        self.columns: list[tuple[str, yaml.Node, str | None, int]] = []

    # ------------------------------------------------------------ reporting

    def problem(self, node: yaml.Node, message: str) -> None:
        where = f"{self.source}:{line_of(node)}: "
        if self.rule_name is not None:
            where += f"rule '{self.rule_name}': "
        self.problems.append(where + message)

    def file_problem(self, line: int, message: str) -> None:
        """A problem of the document itself, outside any rule."""
        self.problems.append(f"{self.source}:{line}: {message}")

    def visit(self, node: yaml.Node) -> None:
        self.visited += 1
        if self.visited > MAX_NODES_VISITED:
            raise RulesError(
                [f"{self.source}:{line_of(node)}: the document expands to more than "
                 f"{MAX_NODES_VISITED:,} nodes (an alias bomb?)"]
            )

    # ------------------------------------------------------------ mappings

    def entries(self, node: yaml.MappingNode, what: str,
                key_problem: Callable[[str], str | None]) -> Iterator[tuple[str, yaml.Node, yaml.Node]]:
        """Yield (key, key node, value node), reporting keys that are not text, merge keys,
        keys `key_problem` has something to say about, and keys given twice."""
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            self.visit(value_node)
            if not isinstance(key_node, yaml.ScalarNode):
                self.problem(key_node, f"{what}: a key must be plain text")
                continue
            key = key_node.value
            if key == "<<":
                self.problem(key_node, f"{what}: merge keys (<<) are not supported; write the keys out")
                continue
            reason = key_problem(key)
            if reason:
                self.problem(key_node, f"{what}: {reason}")
                continue
            if key in seen:
                self.problem(key_node, f"{what}: key '{key}' given twice (first at line {seen[key]})")
                continue
            seen[key] = line_of(key_node)
            yield key, key_node, value_node

    def mapping(self, node: yaml.Node, what: str, keys: tuple[str, ...]) -> Iterator[tuple[str, yaml.Node, yaml.Node]]:
        """Yield (key, key node, value node) of a mapping whose keys must be among `keys`."""
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, f"{what} must be a mapping of {', '.join(keys)}")
            return iter(())
        return self.entries(node, what, lambda key: None if key in keys else f"unknown key '{key}' {suggest(key, keys)}")

    # ------------------------------------------------------------ scalars

    def text(self, node: yaml.Node, what: str) -> str | None:
        """Return a scalar's text exactly as written, or report why it is not one."""
        if not isinstance(node, yaml.ScalarNode):
            kind = "list" if isinstance(node, yaml.SequenceNode) else "mapping"
            self.problem(node, f"{what} must be a single value, not a {kind}")
            return None
        if (node.tag == YAML_NULL and node.style is None) or node.value == "":
            self.problem(node, f"{what} is empty")
            return None
        return node.value

    def texts(self, node: yaml.Node, what: str) -> list[tuple[str, yaml.Node]]:
        """Return one value or a list of values, each with its node (for its line)."""
        if isinstance(node, yaml.SequenceNode):
            if not node.value:
                self.problem(node, f"{what} is an empty list")
            found = []
            for item in node.value:
                self.visit(item)
                text = self.text(item, what)
                if text is not None:
                    found.append((text, item))
            return found
        text = self.text(node, what)
        return [] if text is None else [(text, node)]

    def flag(self, node: yaml.Node, what: str) -> bool | None:
        text = self.text(node, what)
        if text is None:
            return None
        value = parse_flag(text)
        if value is None:
            self.problem(node, f"{what}: {text!r} is not true or false")
        return value

    def integer(self, node: yaml.Node, what: str, low: int, high: int) -> int | None:
        text = self.text(node, what)
        if text is None:
            return None
        try:
            number = int(text, 0)
        except ValueError:
            self.problem(node, f"{what}: {text!r} is not a number")
            return None
        if not low <= number <= high:
            self.problem(node, f"{what}: {number} is out of range ({low}..{high})")
            return None
        return number

    def checked(self, node: yaml.Node, what: str, check: Callable[[str], str | None],
                words: bool = False) -> str | None:
        """A scalar that `check` (a URL or word check) has nothing against, or None with the problem."""
        text = self.text(node, what)
        return None if text is None else self.value(text, node, what, check, words)

    def value(self, text: str, node: yaml.Node, what: str, check: Callable[[str], str | None],
              words: bool = False) -> str | None:
        """`text` if `check` has nothing against it, or None with the problem. A template is
        compiled instead, and checked once rendered for each machine."""
        from .templates import CompileError, compile_text, environment, is_template

        if not is_template(text):
            reason = check(text)
            if reason:
                self.problem(node, f"{what}: {reason}")
                return None
            return text
        if self._sandbox is None:
            self._sandbox = environment()
        try:
            template = compile_text(self._sandbox, text)
        except CompileError as error:
            self.problem(node, f"{what}: {error}")
            return None
        self.templates.append(FieldTemplate(text, template, check, what, line_of(node), words))
        return text
