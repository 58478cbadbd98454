"""A rule's templates rendered for one machine: its variables, the values put in, and what may not.

A machine's variables, by precedence (a source higher up wins):

1. bootrules' own: `base` (the URL machines reach bootrules at), `rule` (the rule's name),
   `files` (the machine's files URL, ending in `/`), `done` (its `once:` callback URL);
2. the machine's inventory row;
3. the rule's `vars:`;
4. the facts the machine sent (`mac`, `uuid`, `serial`, `product`, …, `client`), as rules
   compare them.

Every value a template puts into a script is checked before it is rendered: one that is
not printable, holds a space or line break, `${` or a command separator would change what
the script does, so the rule takes its failure path instead, naming the variable (never
its value: it may be hostile, or secret). The rendered value is then checked as the value
written in rules.yaml would be. A served file gets the same variables, but of the facts
only those its token carries (`mac`, `uuid`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ..model import Facts, FieldTemplate, Rule
from ..rules.templates import MAX_FILE_CHARS, TemplateFailure

SEPARATORS = ("||", "&&")


class RenderFailure(Exception):
    """The rule cannot be rendered for this machine; the message names the variable or field."""


def variables(rule: Rule, facts: Facts, row: Any, own: Mapping[str, str]) -> dict[str, str]:
    """The machine's variables for `rule`, by the precedence of the module's doc."""
    found = dict(facts)
    for variable in rule.vars:
        found[variable.name] = variable.value
    if row is not None:
        found.update(row.values)
    found.update(own)
    return found


def value_problem(value: str) -> str | None:
    """Why a variable's value cannot go into an iPXE script line, or None."""
    if not value.isprintable():
        return "holds a line break or a control character"
    if any(char.isspace() for char in value):
        return "holds a space"
    if "${" in value:
        return "holds an iPXE setting expansion"
    if any(separator in value for separator in SEPARATORS):
        return "holds a command separator"
    return None


def rendered_rule(rule: Rule, found: Mapping[str, str]) -> Rule:
    """`rule` with every template rendered for these variables; RenderFailure if one cannot be."""
    rendered: dict[str, str] = {}
    for field in rule.templates:
        for name in sorted(field.template.names):
            value = found.get(name)
            if value is None:
                raise RenderFailure(f"variable '{name}' is not set for this machine ({field.what})")
            reason = value_problem(value)
            if reason and not (field.words and reason == "holds a space"):
                raise RenderFailure(f"variable '{name}' {reason} ({field.what})")
        try:
            text = field.template.render(found)
        except TemplateFailure as failure:
            raise RenderFailure(f"{field.what}: {failure}") from None
        reason = field.check(text)
        if reason:
            raise RenderFailure(f"{field.what}: the rendered value cannot go into the script")
        rendered[field.text] = text
    return _substituted(rule, rendered)


def _substituted(value: Any, rendered: Mapping[str, str]) -> Any:
    """`value` with every string that is a template's text replaced by its rendering."""
    if isinstance(value, str):
        return rendered.get(value, value)
    if isinstance(value, tuple):
        return tuple(_substituted(item, rendered) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, FieldTemplate):
        changes = {field.name: _substituted(getattr(value, field.name), rendered)
                   for field in dataclasses.fields(value) if field.name not in ("templates", "selectors")}
        return dataclasses.replace(value, **changes)
    return value


def render_file(template: Any, found: Mapping[str, str]) -> str:
    """A served file for a machine; RenderFailure if it cannot be rendered."""
    try:
        return template.render(found, limit=MAX_FILE_CHARS)
    except TemplateFailure as failure:
        raise RenderFailure(str(failure)) from None
