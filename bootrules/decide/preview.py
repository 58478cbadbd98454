"""What a machine would get, shown to a person: `preview`, and the status page's machine view.

The script is the one the server would send, with placeholders for what only a server
knows (its URL, the machine's tokens), and every secret masked unless asked for: secret
settings, and the values of secret inventory columns and `vars:` wherever a template put
them. It says where each variable a template uses came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..model import Facts, Rule
from .engine import DONE_PATH, FILES_PATH, Snapshot
from .render import SECRET_MASK
from .templating import render_file

BASE = "http://BASE"
TOKEN = "TOKEN"


class _PreviewRequest:
    """A request as `preview` imagines it: every `once:` rule still answers, tokens are TOKEN."""

    base = BASE

    def __init__(self) -> None:
        self.failed: str | None = None

    def once_token(self, rule: Rule) -> str:
        return TOKEN

    def files_token(self, rule: Rule) -> str:
        return TOKEN

    def template_failed(self, rule: Rule, reason: str) -> None:
        self.failed = reason


@dataclass
class Preview:
    rule: Rule | None
    script: str
    row: Any = None  # the machine's inventory row
    sources: list[tuple[str, str, str]] = field(default_factory=list)  # (variable, value shown, where from)
    failed: str | None = None
    matching: Facts = field(default_factory=dict)  # the facts rules were compared with (row columns too)


def preview(snapshot: Snapshot, facts: Facts, reveal: bool = False) -> Preview:
    """The script `snapshot` gives a machine with `facts`, as a person may see it."""
    request = _PreviewRequest()
    rule, script = snapshot.decide(facts, request)
    inventory = snapshot.ruleset.inventory
    row = inventory.find(facts) if inventory is not None else None
    matching = {**row.match_facts, **facts} if row is not None else dict(facts)
    if rule is None:
        return Preview(None, script, row, matching=matching)
    own = _own(rule)
    found = snapshot.variables_of(rule, facts, row, own)
    secrets = _secret_values(rule, row)
    if not reveal:
        for secret in secrets:
            script = script.replace(secret, SECRET_MASK)
    names = sorted({name for template in rule.templates for name in template.template.names}
                   | {name for file in rule.files if file in snapshot.ruleset.files
                      for name in snapshot.ruleset.files[file].names})
    sources = [(name, _shown(found.get(name), secrets, reveal), _source(name, rule, facts, row, own))
               for name in names]
    return Preview(rule, script, row, sources, request.failed, matching)


def preview_file(snapshot: Snapshot, facts: Facts, name: str, reveal: bool = False) -> tuple[Rule, str]:
    """A file the machine's rule serves, rendered as the server would render it for the machine
    (its facts reduced to what a token carries); RenderFailure or LookupError if it cannot be."""
    rule, _script = snapshot.decide(facts, _PreviewRequest())
    if rule is None or name not in rule.files:
        raise LookupError(f"the rule that answers this machine ({rule.name if rule else 'none'}) serves no file {name!r}")
    inventory = snapshot.ruleset.inventory
    row = inventory.find(facts) if inventory is not None else None
    carried = {key: facts[key] for key in ("mac", "uuid") if facts.get(key)}
    text = render_file(snapshot.ruleset.files[name], snapshot.variables_of(rule, carried, row, _own(rule)))
    if not reveal:
        for secret in _secret_values(rule, row):
            text = text.replace(secret, SECRET_MASK)
    return rule, text


def _own(rule: Rule) -> dict[str, str]:
    own = {"base": BASE, "rule": rule.name}
    if rule.files:
        own["files"] = f"{BASE}{FILES_PATH}{TOKEN}/"
    if rule.once is not None:
        own["done"] = f"{BASE}{DONE_PATH}{TOKEN}"
    return own


def _secret_values(rule: Rule, row: Any) -> list[str]:
    """What to mask: secret settings (as written), secret vars, and the row's secret columns."""
    from ..rules.inventory import is_secret_column

    found = [variable.value for variable in rule.vars if variable.secret]
    found += [setting.value for setting in _settings_of(rule) if setting.secret and "{{" not in setting.value]
    if row is not None:
        found += [value for column, value in row.values.items() if is_secret_column(column)]
    return sorted((value for value in found if len(value) >= 3), key=len, reverse=True)


def _settings_of(rule: Rule) -> list:
    settings = list(rule.settings)
    for item in getattr(rule.action, "items", ()):
        settings += list(item.settings)
    return settings


def _shown(value: str | None, secrets: list[str], reveal: bool) -> str:
    if value is None:
        return "(unset)"
    if not reveal and value in secrets:
        return SECRET_MASK
    return value


def _source(name: str, rule: Rule, facts: Facts, row: Any, own: dict[str, str]) -> str:
    if name in own:
        return "bootrules"
    if row is not None and name in row.values:
        return f"inventory ({row.where})"
    if any(variable.name == name for variable in rule.vars):
        return f"the rule's vars (line {rule.line})"
    if name in facts:
        return "what the machine sent"
    return "nowhere: unset for this machine"
