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
import re
from typing import Any, Mapping, Sequence

from ..model import Facts, FieldTemplate
from ..rules.templates import MAX_FILE_CHARS, Lookup, TemplateFailure

SEPARATORS = ("||", "&&")
_WHITESPACE = re.compile(r"\s")
NOTHING: Mapping[str, str] = {}


class RenderFailure(Exception):
    """The rule cannot be rendered for this machine; the message names the variable or field."""


def variables(rule_vars: Mapping[str, str], facts: Facts, row: Any, own: Mapping[str, str]) -> Lookup:
    """The machine's variables for a rule whose `vars:` are `rule_vars`, by the precedence of
    the module's doc."""
    return Lookup(own, row.values if row is not None else NOTHING, rule_vars, facts)


def value_problem(value: str) -> str | None:
    """Why a variable's value cannot go into an iPXE script line, or None."""
    if not value.isprintable():
        return "holds a line break or a control character"
    if _WHITESPACE.search(value):
        return "holds a space"
    if "${" in value:
        return "holds an iPXE setting expansion"
    if any(separator in value for separator in SEPARATORS):
        return "holds a command separator"
    if "'" in value:
        return "holds a quote"
    return None


def rendered_values(fields: Sequence[FieldTemplate], found: Lookup) -> dict[str, str]:
    """Each template's text and its rendering for these variables; RenderFailure if one cannot be."""
    rendered: dict[str, str] = {}
    for field in fields:
        for name in field.template.names:
            value = found.get(name)
            if value is None:
                raise RenderFailure(f"variable '{name}' is not set for this machine ({field.what})")
            reason = value_problem(value)
            if reason and not (field.words and reason == "holds a space"):
                raise RenderFailure(f"variable '{name}' {reason} ({field.what})")
        try:
            text = field.template.render_in(found)
        except TemplateFailure as failure:
            raise RenderFailure(f"{field.what}: {failure}") from None
        if field.check(text):
            raise RenderFailure(f"{field.what}: the rendered value cannot go into the script")
        rendered[field.text] = text
    return rendered


def rendered_script(script: str, fields: Sequence[FieldTemplate], found: Lookup) -> str:
    """`script` (a rule's, with its templates' texts where their values go) with every template
    rendered for these variables; RenderFailure if one cannot be. `fields` longest first, so
    that a template inside another's text is rendered as part of it."""
    for text, rendered in rendered_values(fields, found).items():
        script = script.replace(text, rendered)
    return script


def substituted(value: Any, rendered: Mapping[str, str]) -> Any:
    """`value` (a rule, an action…) with every string that is a template's text replaced by
    its rendering, for a renderer that needs the values themselves (GRUB's)."""
    if isinstance(value, str):
        return rendered.get(value, value)
    if isinstance(value, tuple):
        return tuple(substituted(item, rendered) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, FieldTemplate):
        changes = {field.name: substituted(getattr(value, field.name), rendered)
                   for field in dataclasses.fields(value) if field.name not in ("templates", "selectors")}
        return dataclasses.replace(value, **changes)
    return value


def render_file(template: Any, found: Lookup) -> str:
    """A served file for a machine; RenderFailure if it cannot be rendered."""
    try:
        return template.render_in(found, limit=MAX_FILE_CHARS)
    except TemplateFailure as failure:
        raise RenderFailure(str(failure)) from None
