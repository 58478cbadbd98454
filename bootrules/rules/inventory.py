"""The inventory: files of machines (CSV, YAML or JSON), each row naming a machine and giving it
its variables (hostname, addresses, disk, role…), as exported from NetBox or a spreadsheet.

A row names its machine by `mac`, `uuid` or `serial` (at least one), normalised as a
request's values are, and is found for a machine by the same identity rules as everywhere
else: its UUID first, then its MAC, then its serial. Every other column is a variable for
templates and a key rules may match on. Every problem of every file is reported at once,
as `file:line` (a CSV's line numbers too), like the rules file's.

Columns whose name has `password`, `secret`, `hash`, `token` or `key` as one of its words
(`root_password_hash`, `ssh_key`) are secret: their values never appear in a page, the API,
a log line or `preview` (without --show-secrets).
"""

from __future__ import annotations

import csv
import errno
import glob
import io
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import yaml

from .. import values
from ..errors import RulesError
from .yaml_events import YAML_NULL, Composer
from .yaml_nodes import NodeReader, line_of

try:
    from yaml import CSafeLoader as _YamlLoader
except ImportError:  # pragma: no cover - depends on how PyYAML was built
    from yaml import SafeLoader as _YamlLoader  # type: ignore[assignment]

IDENTITY_COLUMNS = ("mac", "uuid", "serial")
# bootrules' own variables: no column may take their names.
OWN_VARIABLES = ("files", "done", "base", "rule")
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
SECRET_WORDS = frozenset({"password", "secret", "hash", "token", "key"})
KINDS = {".csv": "csv", ".yaml": "yaml", ".yml": "yaml", ".json": "json"}
MAX_FILE_BYTES = 64 * 1024 * 1024


def is_secret_column(name: str) -> bool:
    """Whether a column's values are secret (see the module's doc)."""
    return not SECRET_WORDS.isdisjoint(name.lower().split("_"))


def variable_name_problem(name: str) -> str | None:
    if not VARIABLE_NAME.fullmatch(name):
        return f"{name!r} is not a variable name (letters, digits and _, not starting with a digit)"
    if name in OWN_VARIABLES:
        return f"{name!r} is one of bootrules' own variables ({', '.join(OWN_VARIABLES)})"
    return None


@dataclass(frozen=True)
class InventoryRow:
    """One machine of the inventory: where it is written, its names, and its variables."""

    source: str
    line: int
    names: tuple[str, ...]  # uuid:…, mac:…, serial:…
    values: Mapping[str, str]  # every column given, as written (trimmed)
    # The columns as rules compare them (trimmed, case-folded), but those that are selector
    # keys: a rule's `hostname:` is what the machine sent, not its row.
    match_facts: Mapping[str, str] = field(compare=False)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    def shown(self) -> dict[str, str]:
        """The row for a page or a listing: secret columns masked."""
        return {name: "********" if is_secret_column(name) else value for name, value in self.values.items()}


@dataclass(frozen=True)
class Inventory:
    """Every machine of the inventory files, found by any of its names."""

    rows: tuple[InventoryRow, ...] = ()
    columns: frozenset[str] = frozenset()
    by_name: Mapping[str, InventoryRow] = field(default_factory=dict)
    files: tuple[str, ...] = ()  # the files read
    watched: tuple[str, ...] = ()  # the files and the folders of their patterns (a new file appears)

    def find(self, facts: Mapping[str, str]) -> InventoryRow | None:
        """The row of the machine that sent `facts`: by its UUID, else its MAC, else its serial."""
        by_name = self.by_name
        if not by_name:
            return None
        for key in IDENTITY_COLUMNS:
            value = facts.get(key)
            if value:
                row = by_name.get(f"{key}:{value}")
                if row is not None:
                    return row
        return None

    def __len__(self) -> int:
        return len(self.rows)


# --------------------------------------------------------------------------- loading


def load_inventory(patterns: Iterable[tuple[str, str]], base: str) -> Inventory:
    """Read the inventory files `patterns` name, as (pattern relative to `base`, `where` it is
    given: `rules.yaml:3`). Raises RulesError with every problem of every file."""
    problems: list[str] = []
    rows: list[InventoryRow] = []
    files: list[str] = []
    watched: list[str] = []
    for pattern, where in patterns:
        full = pattern if os.path.isabs(pattern) else os.path.join(base, pattern)
        found = sorted(glob.glob(full)) if glob.has_magic(full) else [full]
        watched.append(os.path.dirname(full) or ".")
        if glob.has_magic(full) and not found:
            problems.append(f"{where}: inventory: no file matches {pattern!r}")
        for path in found:
            if path in files:
                continue
            files.append(path)
            watched.append(path)
            rows += _read_file(path, _shown(path, base), problems)
    by_name: dict[str, InventoryRow] = {}
    columns: set[str] = set()
    for row in rows:
        columns.update(row.values)
        for name in row.names:
            first = by_name.get(name)
            if first is not None:
                problems.append(f"{row.where}: {name.replace(':', ' ', 1)} is already the machine of {first.where}")
            else:
                by_name[name] = row
    if problems:
        raise RulesError(problems, tuple(dict.fromkeys(watched)))
    return Inventory(tuple(rows), frozenset(columns), by_name, tuple(files), tuple(dict.fromkeys(watched)))


def _shown(path: str, base: str) -> str:
    """A file's name in messages: relative to the rules file's folder when it lies under it."""
    relative = os.path.relpath(path, base)
    return path if relative.startswith("..") else relative


def _read_file(path: str, shown: str, problems: list[str]) -> list[InventoryRow]:
    kind = KINDS.get(os.path.splitext(path)[1].lower())
    if kind is None:
        problems.append(f"{shown}: not an inventory file (expected .csv, .yaml, .yml or .json)")
        return []
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        reason = "file not found" if error.errno == errno.ENOENT else f"cannot read: {error.strerror or error}"
        problems.append(f"{shown}: {reason}")
        return []
    if len(data) > MAX_FILE_BYTES:
        problems.append(f"{shown}: file is larger than {MAX_FILE_BYTES // (1024 * 1024)} MB")
        return []
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        problems.append(f"{shown}:{line}: not UTF-8 text")
        return []
    if kind == "csv":
        return _read_csv(text, shown, problems)
    return _read_document(text, shown, problems)


def _read_csv(text: str, shown: str, problems: list[str]) -> list[InventoryRow]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        problems.append(f"{shown}:1: the file is empty (expected a header row naming the columns)")
        return []
    except csv.Error as error:
        problems.append(f"{shown}:1: {error}")
        return []
    columns = [name.strip() for name in header]
    broken = False
    for position, name in enumerate(columns):
        reason = variable_name_problem(name)
        if reason:
            problems.append(f"{shown}:1: column {position + 1}: {reason}")
            broken = True
        elif name in columns[:position]:
            problems.append(f"{shown}:1: column {name!r} is given twice")
            broken = True
    rows = []
    line = reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            problems.append(f"{shown}:{line}: {error}")
            break
        if cells and any(cell.strip() for cell in cells) and not broken:
            if len(cells) > len(columns):
                problems.append(f"{shown}:{line}: {len(cells)} cells, but the header names {len(columns)} columns")
            else:
                given = {name: cell.strip() for name, cell in zip(columns, cells) if cell.strip()}
                row = _row(given, shown, line, problems)
                if row is not None:
                    rows.append(row)
        line = reader.line_num + 1
    return rows


def _read_document(text: str, shown: str, problems: list[str]) -> list[InventoryRow]:
    """A YAML or JSON inventory: a list of mappings of column to value."""
    reader = NodeReader(shown)
    rows: list[InventoryRow] = []
    try:
        composer = Composer(yaml.parse(text, Loader=_YamlLoader))
        composer.next()  # StreamStart
        if isinstance(composer.peek(), yaml.StreamEndEvent):
            problems.append(f"{shown}:1: the file is empty (expected a list of machines)")
            return []
        composer.next()  # DocumentStart
        root = composer.node()
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        problems.append(f"{shown}:{mark.line + 1 if mark else 1}: invalid YAML: {error.problem or error.context}")
        return []
    except yaml.YAMLError as error:
        problems.append(f"{shown}:1: invalid YAML: {' '.join(str(error).split())}")
        return []
    if not isinstance(root, yaml.SequenceNode):
        problems.append(f"{shown}:{line_of(root)}: an inventory is a list of machines, each a mapping of columns")
        return []
    for item in root.value:
        reader.visit(item)
        if not isinstance(item, yaml.MappingNode):
            reader.problem(item, "a machine must be a mapping of columns to values")
            continue
        given: dict[str, str] = {}
        for name, _key, value_node in reader.entries(item, "machine", variable_name_problem):
            if isinstance(value_node, yaml.ScalarNode) and value_node.tag == YAML_NULL and value_node.style is None:
                continue
            value = reader.text(value_node, f"column {name!r}")
            if value is not None and value.strip():
                given[name] = value.strip()
        row = _row(given, shown, line_of(item), problems)
        if row is not None:
            rows.append(row)
    problems += reader.problems
    return rows


def _row(given: dict[str, str], shown: str, line: int, problems: list[str]) -> InventoryRow | None:
    """A row from its columns, its names checked; None (with the problem) if it names no machine."""
    names, broken = [], False
    for key in IDENTITY_COLUMNS:
        value = given.get(key)
        if value is None:
            continue
        try:
            normalised = values.normalize_fact(key, value)
        except ValueError as error:
            problems.append(f"{shown}:{line}: {key}: {error}")
            broken = True
            continue
        if key == "uuid" and normalised in values.PLACEHOLDER_UUIDS:
            problems.append(f"{shown}:{line}: uuid: {value!r} is a placeholder no machine can be told by")
            broken = True
            continue
        names.append(f"{key}:{normalised}")
    if broken:
        return None
    if not names:
        problems.append(f"{shown}:{line}: this row names no machine (give mac, uuid or serial)")
        return None
    match_facts = {name: values.normalize_text(value) for name, value in given.items()
                   if name not in values.SELECTOR_KEYS}
    return InventoryRow(shown, line, tuple(names), given, match_facts)
