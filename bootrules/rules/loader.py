"""Read rules.yaml into a RuleSet, or report every problem in it at once as `file:line`.

The file is composed into YAML nodes rather than loaded into Python values, for two
reasons: every node carries its line number, and a scalar's text is kept exactly as
written. PyYAML's YAML 1.1 resolver would otherwise turn an unquoted MAC such as
`10:20:30:40:50:59` into a base-60 integer, `0012345` into an octal and `no` into False.

This module reads the document and its rules; each part of a rule has a module of its
own: `match`, `ipxe_settings` (set:), `once`, `actions` (one reader per action), `menu`.
Once every rule is read, the inventory the document names is read (`inventory`), the
files rules serve are compiled (`templates`), and what needs them is checked: a `match:`
key that is no selector must be a column of the inventory, and every variable a template
names must have a source.
"""

from __future__ import annotations

import difflib
import errno
import os
import re
import stat
from typing import Iterator

import yaml

from .. import collector, values
from ..model import Action, Once, Rule, RuleSet, Selector, Setting, Variable
from .actions import ACTION_READERS
from .menu import read_menu
from .match import compile_pattern, read_match
from .once import read_once
from .ipxe_settings import read_settings
from .inventory import OWN_VARIABLES, Inventory, is_secret_column, load_inventory, variable_name_problem
from .templates import CompileError, Template, compile_file, environment
from .yaml_events import YAML_NULL, Composer
from .yaml_nodes import NodeReader, RulesError, line_of, suggest

try:  # libyaml is several times faster; the pure-Python loader gives the same nodes.
    from yaml import CSafeLoader as _YamlLoader
except ImportError:  # pragma: no cover - depends on how PyYAML was built
    from yaml import SafeLoader as _YamlLoader  # type: ignore[assignment]

__all__ = ["RulesError", "load_rules", "parse_rules", "compile_pattern", "RULE_KEYS", "ACTION_KEYS"]

MAX_FILE_BYTES = 64 * 1024 * 1024
# A rule's actions: an item of a menu takes any of them but a menu.
RULE_ACTION_READERS = {**ACTION_READERS, "menu": read_menu}
ACTION_KEYS = tuple(RULE_ACTION_READERS)
RULE_KEYS = ("name", "match", "set", "once", "vars", "files", *ACTION_KEYS)
DOCUMENT_KEYS = ("rules", "inventory", "templates")
TEMPLATES_FOLDER = "templates"  # beside rules.yaml, unless `templates:` names another
# What a template of a served file knows of the machine besides its inventory row: the names
# its token carries. (The facts a machine sent reach the rule's own values, not its files.)
FILE_FACTS = ("mac", "uuid")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_FILE_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory"}


def load_rules(path: str | os.PathLike[str]) -> RuleSet:
    """Read and check the rules file at `path`; raise RulesError listing every problem.

    Only a regular file (after following symlinks) is read: a FIFO would block the
    reader until something writes to it, and a device never ends.
    """
    source = os.fspath(path)
    try:
        # O_NONBLOCK: opening a FIFO does not wait for a writer (checked just below).
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        raise RulesError([f"{source}: {_open_problem(error)}"]) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        kind = _FILE_KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
        raise RulesError([f"{source}: is {kind}, not a rules file"])
    with open(fd, "rb") as stream:
        if info.st_size > MAX_FILE_BYTES:  # refuse without reading it
            raise RulesError([f"{source}: file is larger than {MAX_FILE_BYTES // (1024 * 1024)} MB"])
        try:
            data = stream.read(MAX_FILE_BYTES + 1)
        except OSError as error:
            raise RulesError([f"{source}: cannot read: {error.strerror or error}"]) from None
    if len(data) > MAX_FILE_BYTES:
        raise RulesError([f"{source}: file is larger than {MAX_FILE_BYTES // (1024 * 1024)} MB"])
    return parse_rules(data, source, os.path.dirname(os.path.abspath(source)))


def _no_source(name: str, given: set[str]) -> str:
    if name in ("done", "files"):
        return (f"variable '{name}' is one of bootrules' own, which this rule has not: done only with once:, "
                "files only with files:")
    if name in values.SELECTOR_KEYS:
        return (f"variable '{name}' is what a machine sent when it asked for its script; a served file "
                f"knows only {', '.join(FILE_FACTS)}, the inventory row, the rule's vars and {', '.join(OWN_VARIABLES)}")
    close = difflib.get_close_matches(name, sorted(given | set(values.SELECTOR_KEYS)), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return (f"variable '{name}' has no source: no fact a machine sends, no var of the rule, no column of the "
            f"inventory, and not one of bootrules' own{hint}")


def _open_problem(error: OSError) -> str:
    if error.errno == errno.ENOENT:
        return "file not found"
    if error.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if error.errno == errno.EISDIR:
        return "is a directory, not a rules file"
    return f"cannot read: {error.strerror or error}"


def parse_rules(data: bytes | str, source: str = "rules.yaml", base: str | None = None) -> RuleSet:
    """Check rules given as YAML text; `source` names the file in messages, `base` is where
    the files it names (inventory, templates) are (default: the current directory)."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            line = data[: error.start].count(b"\n") + 1
            raise RulesError([f"{source}:{line}: not UTF-8 text"]) from None
    reader = DocumentReader(source)
    try:
        with collector.paused():
            rules = reader.read_stream(yaml.parse(data, Loader=_YamlLoader))
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark else 1
        reason = error.problem or error.context or "invalid YAML"
        raise RulesError([f"{source}:{line}: invalid YAML: {reason}"]) from None
    except yaml.reader.ReaderError as error:  # a character YAML does not allow
        line = data[: error.position].count("\n") + 1
        raise RulesError([f"{source}:{line}: invalid YAML: character {error.character!r} is not allowed"]) from None
    except yaml.YAMLError as error:
        raise RulesError([f"{source}:1: invalid YAML: {' '.join(str(error).split())}"]) from None
    return reader.finish(rules, base or os.getcwd())


class DocumentReader(NodeReader):
    """Reads the document (a mapping with `rules:`) and each rule in it, one rule at a time."""

    def __init__(self, source: str) -> None:
        super().__init__(source)
        self.inventory_patterns: list[tuple[str, str]] = []  # (pattern, where it is given)
        self.templates_folder: tuple[str, int] | None = None
        self.files_lines: dict[str, int] = {}  # rule name -> the line of its files:

    def read_stream(self, events: Iterator[yaml.Event]) -> list[Rule]:
        """Read the one document of the file: a mapping whose `rules:` is a list of rules."""
        composer = Composer(events)
        composer.next()  # StreamStart
        if isinstance(composer.peek(), yaml.StreamEndEvent):
            self.file_problem(1, "the file is empty (expected 'rules:' and a list of rules)")
            return []
        composer.next()  # DocumentStart
        rules: list[Rule] = []
        start = composer.peek()
        if not isinstance(start, yaml.MappingStartEvent):
            root = composer.node()
            if isinstance(root, yaml.ScalarNode) and root.tag == YAML_NULL:
                self.file_problem(1, "the file is empty (expected 'rules:' and a list of rules)")
            else:
                self.problem(root, "the file must be a mapping of rules")
        else:
            rules = self.read_top_mapping(composer, start.start_mark.line + 1)
        composer.next()  # DocumentEnd
        if not isinstance(composer.peek(), yaml.StreamEndEvent):
            self.file_problem(composer.peek().start_mark.line + 1, "a second YAML document ('---'); put every rule in one")
        return rules

    def read_top_mapping(self, composer: Composer, line: int) -> list[Rule]:
        composer.next()  # MappingStart
        rules: list[Rule] = []
        seen_rules = None
        seen_other: dict[str, int] = {}
        while not isinstance(composer.peek(), yaml.MappingEndEvent):
            key = composer.node()
            if isinstance(key, yaml.ScalarNode) and key.value in ("inventory", "templates"):
                value = composer.node()
                self.visit(value)
                if key.value in seen_other:
                    self.problem(key, f"the file: key '{key.value}' given twice (first at line {seen_other[key.value]})")
                    continue
                seen_other[key.value] = line_of(key)
                if key.value == "inventory":
                    self.inventory_patterns = [(text, f"{self.source}:{line_of(item)}")
                                               for text, item in self.texts(value, "inventory")]
                else:
                    folder = self.text(value, "templates")
                    if folder is not None:
                        self.templates_folder = (folder, line_of(value))
                continue
            if isinstance(key, yaml.ScalarNode) and key.value == "rules" and seen_rules is None:
                seen_rules = line_of(key)
                if isinstance(composer.peek(), yaml.SequenceStartEvent):
                    rules = self.read_rules(composer)
                else:
                    value = composer.node()
                    if isinstance(value, yaml.ScalarNode) and value.tag == YAML_NULL:
                        self.problem(value, "'rules:' is empty (write 'rules: []' for no rules)")
                    else:
                        self.problem(value, "'rules:' must be a list of rules (each item starts with '- name:')")
                continue
            composer.node()  # the value of a key that is reported below
            if isinstance(key, yaml.ScalarNode) and key.value == "rules":
                self.problem(key, f"the file: key 'rules' given twice (first at line {seen_rules})")
            else:
                name = key.value if isinstance(key, yaml.ScalarNode) else "?"
                self.problem(key, f"the file: unknown key '{name}' {suggest(str(name), DOCUMENT_KEYS)}")
        composer.next()
        if seen_rules is None:
            self.file_problem(line, "missing 'rules:' (the list of rules)")
        return rules

    def read_rules(self, composer: Composer) -> list[Rule]:
        composer.next()  # SequenceStart
        rules: list[Rule] = []
        names: dict[str, int] = {}
        position = 0
        while not isinstance(composer.peek(), yaml.SequenceEndEvent):
            position += 1
            rule_node = composer.node()
            self.visit(rule_node)
            rule = self.read_rule(rule_node, position, names)
            if rule is not None:
                rules.append(rule)
        composer.next()
        return rules

    def read_rule(self, node: yaml.Node, position: int, names: dict[str, int]) -> Rule | None:
        self.rule_name = None
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, f"rule #{position} must be a mapping with 'name:' and an action")
            return None
        name = self.rule_identity(node, position, names)
        problems_before = len(self.problems)
        selectors: tuple[Selector, ...] = ()
        settings: tuple[Setting, ...] = ()
        once: Once | None = None
        variables: tuple[Variable, ...] = ()
        files: tuple[str, ...] = ()
        actions: list[tuple[str, yaml.Node, Action | None]] = []
        self.templates = []
        for key, key_node, value_node in self.mapping(node, "rule", RULE_KEYS):
            if key == "match":
                selectors = read_match(self, value_node)
            elif key == "set":
                settings = read_settings(self, value_node)
            elif key == "once":
                once = read_once(self, value_node)
            elif key == "vars":
                variables = self.read_vars(value_node)
            elif key == "files":
                files = tuple(self.read_files(value_node, name))
            elif key in RULE_ACTION_READERS:
                actions.append((key, key_node, RULE_ACTION_READERS[key](self, value_node)))
        if not actions:
            self.problem(node, f"no action (expected exactly one of: {', '.join(ACTION_KEYS)})")
        elif len(actions) > 1:
            given = " and ".join(key for key, _node, _action in actions)
            self.problem(actions[1][1], f"two actions ({given}); a rule has exactly one")
        self.rule_name = None
        if len(self.problems) > problems_before or name is None or len(actions) != 1:
            return None
        action = actions[0][2]
        assert action is not None
        if any(selector.key == "loader" for selector in selectors) and actions[0][0] not in ("boot", "exit"):
            self.problem(actions[0][1], f"a rule for loader: grub must boot or exit: GRUB cannot "
                                            f"{actions[0][0]} (bootrules.decide.grub)")
            return None
        return Rule(name=name, line=line_of(node), selectors=selectors, action=action, settings=settings, once=once,
                    vars=variables, files=files, templates=tuple(self.templates))

    def read_vars(self, node: yaml.Node) -> tuple[Variable, ...]:
        """`vars:`: a mapping of name to value, or to {value:, secret:}."""
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, "'vars:' must be a mapping of variable names to values")
            return ()
        found = []
        for name, _key, value_node in self.entries(node, "vars", variable_name_problem):
            secret = is_secret_column(name)
            if isinstance(value_node, yaml.MappingNode):
                value = None
                for key, _k, sub in self.mapping(value_node, f"vars {name}", ("value", "secret")):
                    if key == "value":
                        value = self.text(sub, f"vars {name} value")
                    else:
                        secret = self.flag(sub, f"vars {name} secret") is not False or secret
            else:
                value = self.text(value_node, f"vars {name}")
            if value is not None:
                found.append(Variable(name, value, secret))
        return tuple(found)

    def read_files(self, node: yaml.Node, rule: str | None) -> list[str]:
        """`files:`: the names of templates (in the templates folder) served to each machine."""
        names = []
        for text, item in self.texts(node, "files"):
            if text.startswith("/") or ".." in text.split("/") or not text.strip() or any(
                    char.isspace() or char in "?#%" for char in text):
                self.problem(item, f"files: {text!r} is not a plain file name of the templates folder")
            elif text in names:
                self.problem(item, f"files: {text!r} is named twice")
            else:
                names.append(text)
        if rule is not None:
            self.files_lines[rule] = line_of(node)
        return names

    # ------------------------------------------------------------ once every rule is read

    def finish(self, rules: list[Rule], base: str) -> RuleSet:
        """Read the inventory and the files the rules serve, check what needs them, and
        return the rules; RulesError with every problem of the document and its files."""
        inventory, broken = Inventory(), False
        if self.inventory_patterns:
            try:
                inventory = load_inventory(self.inventory_patterns, base)
            except RulesError as error:
                self.problems += error.problems
                inventory, broken = Inventory(watched=error.watched), True
        for key, node, rule, position in reversed(self.columns):
            if key in inventory.columns or broken:  # a broken inventory's columns are not known
                continue
            where = f"{self.source}:{line_of(node)}: " + (f"rule '{rule}': " if rule else "")
            if self.inventory_patterns:
                known = tuple(sorted(inventory.columns - set(values.SELECTOR_KEYS))) + values.SELECTOR_KEYS
                reason = f"(not a selector, nor a column of the inventory) {suggest(key, known)}"
            else:
                reason = suggest(key, values.SELECTOR_KEYS)
            self.problems.insert(position, f"{where}match: unknown key '{key}' {reason}")
        folder = self.templates_folder[0] if self.templates_folder else TEMPLATES_FOLDER
        folder = folder if os.path.isabs(folder) else os.path.join(base, folder)
        files = self.compile_files(rules, folder)
        for rule in rules if not broken else ():
            self.check_variables(rule, inventory, files)
        watched = [*inventory.watched, *(os.path.join(folder, name) for rule in rules for name in rule.files)]
        if any(rule.files for rule in rules):
            watched.append(folder)
        if self.problems:
            raise RulesError(self.problems, tuple(dict.fromkeys(watched)))
        return RuleSet(source=self.source, rules=tuple(rules), inventory=inventory, files=files,
                       watched=tuple(dict.fromkeys(watched)))

    def compile_files(self, rules: list[Rule], folder: str) -> dict[str, Template]:
        files: dict[str, Template] = {}
        names = {name: rule for rule in rules for name in rule.files}
        if not names:
            return files
        sandbox = environment(folder)
        base = os.path.dirname(os.path.abspath(self.source))
        relative = os.path.relpath(folder, base)
        shown_folder = folder if relative.startswith("..") else relative
        for name, rule in names.items():
            try:
                files[name] = compile_file(sandbox, folder, name)
            except CompileError as error:
                if str(error).startswith("template:"):
                    self.problems.append(f"{os.path.join(shown_folder, name)}:{error.line}: {error}")
                else:
                    self.problems.append(f"{self.source}:{self.files_lines.get(rule.name, rule.line)}: "
                                         f"rule '{rule.name}': files: {error}")
        return files

    def check_variables(self, rule: Rule, inventory: Inventory, files: dict[str, Template]) -> None:
        """Every variable a template of `rule` names must have a source (see the README)."""
        own = {"base", "rule", *(["files"] if rule.files else []), *(["done"] if rule.once else [])}
        given = {variable.name for variable in rule.vars} | set(inventory.columns) | own
        where = f"{self.source}:{{line}}: rule '{rule.name}': "
        for field in rule.templates:
            for name in sorted(field.template.names - given - set(values.SELECTOR_KEYS)):
                self.problems.append(where.format(line=field.line) + f"{field.what}: {_no_source(name, given)}")
        for name in rule.files:
            template = files.get(name)
            for missing in sorted(template.names - given - set(FILE_FACTS)) if template else ():
                self.problems.append(where.format(line=self.files_lines.get(rule.name, rule.line))
                                     + f"files: {name}: {_no_source(missing, given | set(FILE_FACTS))}")

    def rule_identity(self, node: yaml.MappingNode, position: int, names: dict[str, int]) -> str | None:
        """Find and check the rule's name first, so every later message can carry it."""
        name_nodes = [value for key, value in node.value if isinstance(key, yaml.ScalarNode) and key.value == "name"]
        if not name_nodes:
            self.problem(node, f"rule #{position} has no 'name:'")
            return None
        name = self.text(name_nodes[0], "name")
        if name is None:
            return None
        if not _NAME.fullmatch(name):
            self.problem(name_nodes[0], f"rule name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
                                        "starting with a letter or digit")
            return None
        self.rule_name = name
        if name in names:
            self.problem(name_nodes[0], f"name already used by the rule at line {names[name]}")
        else:
            names[name] = line_of(node)
        return name
