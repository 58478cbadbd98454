"""Read rules.yaml into a RuleSet, or report every problem in it at once as `file:line`.

The file is composed into YAML nodes rather than loaded into Python values, for two
reasons: every node carries its line number, and a scalar's text is kept exactly as
written. PyYAML's YAML 1.1 resolver would otherwise turn an unquoted MAC such as
`10:20:30:40:50:59` into a base-60 integer, `0012345` into an octal and `no` into False.
"""

from __future__ import annotations

import difflib
import fnmatch
import gc
import ipaddress
import os
import re
from typing import Callable, Iterator

import yaml

from . import values
from .ipxe_syntax import san_uri_problem, url_problem, word_problem, words_problem
from .model import (
    Action,
    Boot,
    Chain,
    Exact,
    Exit,
    Glob,
    Network,
    Pattern,
    Rule,
    RuleSet,
    Sanboot,
    Selector,
    Setting,
)
from .yaml_events import YAML_NULL, Composer

try:  # libyaml is several times faster; the pure-Python loader gives the same nodes.
    from yaml import CSafeLoader as _YamlLoader
except ImportError:  # pragma: no cover - depends on how PyYAML was built
    from yaml import SafeLoader as _YamlLoader  # type: ignore[assignment]

MAX_FILE_BYTES = 64 * 1024 * 1024
# Aliases let a small file describe a huge tree ("billion laughs"); walking stops here.
MAX_NODES_VISITED = 5_000_000

RULE_KEYS = ("name", "match", "set", "chain", "sanboot", "boot", "exit")
ACTION_KEYS = ("chain", "sanboot", "boot", "exit")
SANBOOT_KEYS = ("uri", "drive", "no-describe", "keep", "filename")
BOOT_KEYS = ("kernel", "initrd", "args")
SETTING_KEYS = ("value", "secret")
# Settings whose value is a credential, whatever the rule says.
SECRET_SETTINGS = frozenset({"password", "reverse-password"})


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SETTING_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*(:[a-z0-9]+)?")
_TRUE = frozenset({"true", "yes", "on"})
_FALSE = frozenset({"false", "no", "off"})


class RulesError(Exception):
    """The rules file cannot be used; `problems` lists every reason as `file:line: …`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = tuple(problems)


def load_rules(path: str | os.PathLike[str]) -> RuleSet:
    """Read and check the rules file at `path`; raise RulesError listing every problem."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as stream:
            if os.fstat(stream.fileno()).st_size > MAX_FILE_BYTES:  # refuse without reading it
                raise RulesError([f"{source}: file is larger than {MAX_FILE_BYTES // (1024 * 1024)} MB"])
            data = stream.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise RulesError([f"{source}: file not found"]) from None
    except IsADirectoryError:
        raise RulesError([f"{source}: is a directory, not a rules file"]) from None
    except PermissionError:
        raise RulesError([f"{source}: permission denied"]) from None
    except OSError as error:
        raise RulesError([f"{source}: cannot read: {error.strerror or error}"]) from None
    if len(data) > MAX_FILE_BYTES:
        raise RulesError([f"{source}: file is larger than {MAX_FILE_BYTES // (1024 * 1024)} MB"])
    return parse_rules(data, source)


def parse_rules(data: bytes | str, source: str = "rules.yaml") -> RuleSet:
    """Check rules given as YAML text; `source` names the file in messages."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            line = data[: error.start].count(b"\n") + 1
            raise RulesError([f"{source}:{line}: not UTF-8 text"]) from None
    reader = _Reader(source)
    # Pausing the cyclic GC matters: with it running, a 100,000-rule file took about
    # four times longer, because every collection walks all the objects made so far.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
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
    finally:
        if gc_was_enabled:
            gc.enable()
    if reader.problems:
        raise RulesError(reader.problems)
    return RuleSet(source=source, rules=tuple(rules))


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _suggest(word: str, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"({hint}expected one of: {', '.join(choices)})"


class _Reader:
    """Walks the composed YAML, building rules and collecting every problem on the way."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []
        self.rule_name: str | None = None
        self.visited = 0

    # ------------------------------------------------------------ reporting

    def problem(self, node: yaml.Node, message: str) -> None:
        where = f"{self.source}:{_line(node)}: "
        if self.rule_name is not None:
            where += f"rule '{self.rule_name}': "
        self.problems.append(where + message)

    def visit(self, node: yaml.Node) -> None:
        self.visited += 1
        if self.visited > MAX_NODES_VISITED:
            raise RulesError(
                [f"{self.source}:{_line(node)}: the document expands to more than "
                 f"{MAX_NODES_VISITED:,} nodes (an alias bomb?)"]
            )

    # ------------------------------------------------------------ node helpers

    def mapping(self, node: yaml.Node, what: str, keys: tuple[str, ...]) -> Iterator[tuple[str, yaml.Node, yaml.Node]]:
        """Yield (key, key node, value node) of a mapping, reporting unknown and repeated keys."""
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, f"{what} must be a mapping of {', '.join(keys)}")
            return
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
            if key not in keys:
                self.problem(key_node, f"{what}: unknown key '{key}' {_suggest(key, keys)}")
                continue
            if key in seen:
                self.problem(key_node, f"{what}: key '{key}' given twice (first at line {seen[key]})")
                continue
            seen[key] = _line(key_node)
            yield key, key_node, value_node

    def text(self, node: yaml.Node, what: str) -> str | None:
        """Return a scalar's text exactly as written, or report why it is not one."""
        if not isinstance(node, yaml.ScalarNode):
            self.problem(node, f"{what} must be a single value, not a {'list' if isinstance(node, yaml.SequenceNode) else 'mapping'}")
            return None
        if node.tag == YAML_NULL and node.style is None:
            self.problem(node, f"{what} is empty")
            return None
        if node.value == "":
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
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        self.problem(node, f"{what}: {text!r} is not true or false")
        return None

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

    # ------------------------------------------------------------ document

    def read_stream(self, events: Iterator[yaml.Event]) -> list[Rule]:
        """Read the one document of the file: a mapping whose `rules:` is a list of rules."""
        composer = Composer(events)
        composer.next()  # StreamStart
        if isinstance(composer.peek(), yaml.StreamEndEvent):
            self.problems.append(f"{self.source}:1: the file is empty (expected 'rules:' and a list of rules)")
            return []
        composer.next()  # DocumentStart
        rules: list[Rule] = []
        start = composer.peek()
        if not isinstance(start, yaml.MappingStartEvent):
            root = composer.node()
            if isinstance(root, yaml.ScalarNode) and root.tag == YAML_NULL:
                self.problems.append(f"{self.source}:1: the file is empty (expected 'rules:' and a list of rules)")
            else:
                self.problem(root, "the file must be a mapping of rules")
        else:
            composer.next()
            seen_rules = None
            while not isinstance(composer.peek(), yaml.MappingEndEvent):
                key = composer.node()
                if isinstance(key, yaml.ScalarNode) and key.value == "rules" and seen_rules is None:
                    seen_rules = _line(key)
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
                    self.problem(key, f"the file: unknown key '{name}' {_suggest(str(name), ('rules',))}")
            composer.next()
            if seen_rules is None:
                self.problems.append(f"{self.source}:{start.start_mark.line + 1}: missing 'rules:' (the list of rules)")
        composer.next()  # DocumentEnd
        if not isinstance(composer.peek(), yaml.StreamEndEvent):
            self.problems.append(f"{self.source}:{composer.peek().start_mark.line + 1}: a second YAML document ('---'); put every rule in one")
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
        actions: list[tuple[str, yaml.Node, Action | None]] = []
        for key, key_node, value_node in self.mapping(node, "rule", RULE_KEYS):
            if key == "match":
                selectors = self.read_match(value_node)
            elif key == "set":
                settings = self.read_settings(value_node)
            elif key in ACTION_KEYS:
                actions.append((key, key_node, self.read_action(key, value_node)))
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
        return Rule(name=name, line=_line(node), selectors=selectors, action=action, settings=settings)

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
            self.problem(name_nodes[0], f"rule name {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
            return None
        self.rule_name = name
        if name in names:
            self.problem(name_nodes[0], f"name already used by the rule at line {names[name]}")
        else:
            names[name] = _line(node)
        return name

    # ------------------------------------------------------------ match

    def read_match(self, node: yaml.Node) -> tuple[Selector, ...]:
        if isinstance(node, yaml.MappingNode) and not node.value or (
            isinstance(node, yaml.ScalarNode) and node.tag == YAML_NULL
        ):
            self.problem(node, "'match:' is empty; to match every machine, leave 'match:' out")
            return ()
        selectors = []
        for key, _key_node, value_node in self.mapping(node, "match", values.SELECTOR_KEYS):
            patterns = []
            for text, item in self.texts(value_node, f"match {key}"):
                try:
                    patterns.append(compile_pattern(key, text))
                except ValueError as error:
                    self.problem(item, f"match {key}: {error}")
            if patterns:
                selectors.append(Selector(key=key, patterns=tuple(patterns)))
        return tuple(selectors)

    # ------------------------------------------------------------ set

    def read_settings(self, node: yaml.Node) -> tuple[Setting, ...]:
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, "'set:' must be a mapping of iPXE setting names to values")
            return ()
        settings = []
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            self.visit(value_node)
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else ""
            if not _SETTING_NAME.fullmatch(name):
                self.problem(key_node, f"set: {name!r} is not an iPXE setting name (e.g. initiator-iqn, username, net0/gateway)")
                continue
            if name in seen:
                self.problem(key_node, f"set: '{name}' given twice (first at line {seen[name]})")
                continue
            seen[name] = _line(key_node)
            secret = name.rsplit("/", 1)[-1].split(":")[0] in SECRET_SETTINGS
            if isinstance(value_node, yaml.MappingNode):
                text = None
                for key, _k, sub in self.mapping(value_node, f"set {name}", SETTING_KEYS):
                    if key == "value":
                        text = self.text(sub, f"set {name} value")
                    else:
                        secret = bool(self.flag(sub, f"set {name} secret")) or secret
                if text is None:
                    if not any(k.value == "value" for k, _v in value_node.value if isinstance(k, yaml.ScalarNode)):
                        self.problem(value_node, f"set {name}: missing 'value:'")
                    continue
                value_where = value_node
            else:
                text = self.text(value_node, f"set {name}")
                value_where = value_node
            if text is None:
                continue
            reason = words_problem(text, show=not secret)
            if reason:
                self.problem(value_where, f"set {name}: {reason}")
                continue
            settings.append(Setting(name=name, value=text, secret=secret))
        return tuple(settings)

    # ------------------------------------------------------------ actions

    def read_action(self, key: str, node: yaml.Node) -> Action | None:
        readers: dict[str, Callable[[yaml.Node], Action | None]] = {
            "chain": self.read_chain,
            "sanboot": self.read_sanboot,
            "boot": self.read_boot,
            "exit": self.read_exit,
        }
        return readers[key](node)

    def url(self, node: yaml.Node, what: str, check: Callable[[str], str | None]) -> str | None:
        text = self.text(node, what)
        if text is None:
            return None
        reason = check(text)
        if reason:
            self.problem(node, f"{what}: {reason}")
            return None
        return text

    def read_chain(self, node: yaml.Node) -> Action | None:
        url = self.url(node, "chain", url_problem)
        return None if url is None else Chain(url=url)

    def read_sanboot(self, node: yaml.Node) -> Action | None:
        if not isinstance(node, yaml.MappingNode):
            uris = self.san_uris(node)
            return Sanboot(uris=tuple(uris)) if uris else None
        options: dict[str, object] = {}
        uris: list[str] = []
        for key, _key_node, value_node in self.mapping(node, "sanboot", SANBOOT_KEYS):
            if key == "uri":
                uris = self.san_uris(value_node)
            elif key == "drive":
                options["drive"] = self.integer(value_node, "sanboot drive", 0, 0xFF)
            elif key == "filename":
                options["filename"] = self.url(value_node, "sanboot filename", word_problem)
            else:
                options[key.replace("-", "_")] = self.flag(value_node, f"sanboot {key}")
        if not uris and "drive" not in options:
            self.problem(node, "sanboot needs 'uri:' (or only 'drive:' to boot a local BIOS disk)")
            return None
        if None in options.values():
            return None
        return Sanboot(uris=tuple(uris), **options)  # type: ignore[arg-type]

    def san_uris(self, node: yaml.Node) -> list[str]:
        uris = []
        for text, item in self.texts(node, "sanboot"):
            reason = san_uri_problem(text)
            if reason:
                self.problem(item, f"sanboot: {reason}")
            else:
                uris.append(text)
        return uris

    def read_boot(self, node: yaml.Node) -> Action | None:
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, "boot must be a mapping with kernel:, and optionally initrd: and args:")
            return None
        kernel = None
        initrds: list[str] = []
        args = ""
        broken = False
        for key, _key_node, value_node in self.mapping(node, "boot", BOOT_KEYS):
            if key == "kernel":
                kernel = self.url(value_node, "boot kernel", url_problem)
                broken |= kernel is None
            elif key == "initrd":
                for text, item in self.texts(value_node, "boot initrd"):
                    reason = url_problem(text)
                    if reason:
                        self.problem(item, f"boot initrd: {reason}")
                        broken = True
                    else:
                        initrds.append(text)
            else:
                text = self.text(value_node, "boot args")
                reason = words_problem(text) if text is not None else "empty"
                if reason:
                    if text is not None:
                        self.problem(value_node, f"boot args: {reason}")
                    broken = True
                else:
                    args = text or ""
        if kernel is None:
            if not broken:
                self.problem(node, "boot needs 'kernel:'")
            return None
        return None if broken else Boot(kernel=kernel, initrds=tuple(initrds), args=args)

    def read_exit(self, node: yaml.Node) -> Action | None:
        text = self.text(node, "exit")
        if text is None:
            return None
        if text.lower() in _TRUE:
            return Exit()
        if text.lower() in _FALSE:
            self.problem(node, "'exit: false' does nothing; give the rule another action or remove it")
            return None
        status = self.integer(node, "exit", 0, 255)
        return None if status is None else Exit(status=status)


# --------------------------------------------------------------------------- values


def compile_pattern(key: str, text: str) -> Pattern:
    """Turn one rule value for selector `key` into a pattern; raise ValueError if it is wrong."""
    if key in values.ADDRESS_KEYS:
        if values.is_glob(text):
            raise ValueError(f"{text!r}: write an address or a CIDR range such as 10.0.0.0/24, not a glob")
        try:
            return Network(ipaddress.ip_network(text.strip(), strict=True))
        except ValueError as error:
            if "has host bits set" in str(error):
                wide = ipaddress.ip_network(text.strip(), strict=False)
                raise ValueError(f"{text!r} has host bits set (did you mean {wide}?)") from None
            raise ValueError(f"{text!r} is not an IP address or CIDR range") from None
    if not values.is_glob(text):
        if key in values.MAC_KEYS:
            return Exact(values.normalize_mac(text))
        if key in values.UUID_KEYS:
            uuid = values.normalize_uuid(text)
            if uuid in values.PLACEHOLDER_UUIDS:
                raise ValueError(f"{text!r} is the placeholder UUID of firmware that has none; it identifies no machine")
            return Exact(uuid)
        if key in values.WORD_KEYS:
            word = values.normalize_word(key, text)
            known = values.KNOWN_WORDS[key]
            if word not in known:
                raise ValueError(f"unknown {key} {text!r} {_suggest(word, known)}")
            return Exact(word)
        value = values.normalize_text(text)
        if not value:
            raise ValueError("empty value")
        return Exact(value)
    bare_mac = False
    if key in values.MAC_KEYS:
        pattern, bare_mac = values.normalize_mac_glob(text)
    elif key in values.UUID_KEYS:
        pattern = text.strip().lower()
        if not set(pattern) <= set("0123456789abcdef-*?[]!"):
            raise ValueError(f"{text!r} is not a UUID glob (hex digits, '-' and * ? [...] only)")
    elif key in values.WORD_KEYS:
        pattern = text.strip().lower()
    else:
        pattern = values.normalize_text(text)
    literal = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
    if bare_mac:  # index bare MAC prefixes in the colon form facts are kept in
        literal = ":".join(literal[i : i + 2] for i in range(0, len(literal), 2))
    return Glob(text=pattern, regex=re.compile(fnmatch.translate(pattern)), prefix=literal, bare_mac=bare_mac)
