"""One loaded version of the rules, ready to answer: its index, its scripts, its decision."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from ..model import Facts, Rule, RuleSet
from .matching import Matcher
from .render import DONE_SETTING, render_no_match, render_rule, render_template_failure
from .grub import render_grub, render_grub_no_match
from .templating import RenderFailure, rendered_script, rendered_values, substituted, variables

NO_MATCH_SCRIPT = render_no_match()
DONE_PATH = "/done/"
PER_ROW_KEPT = 50_000  # rendered scripts kept per worker (a storm of new machines renders each once)
FILES_PATH = "/files/"


class Request(Protocol):
    """What a decision needs from the request it answers, beyond the machine's facts."""

    base: str | None  # the URL machines reach bootrules at; None if the request cannot say

    def once_token(self, rule: Rule) -> str | None:
        """The live token of a `once:` rule that still answers this machine; None: it falls through."""

    def files_token(self, rule: Rule) -> str | None:
        """A token for the files of a rule without `once:`; None if none can be made now."""

    def template_failed(self, rule: Rule, reason: str) -> None:
        """A rule could not be rendered for this machine (it is answered with its failure path)."""


def files_url(rule: Rule, request: Request | None, base: str | None, token: str | None) -> str:
    """The URL of this machine's files of `rule`: under its once token, or a files token of its own."""
    files_token = token if token is not None else (request.files_token(rule) if request else None)
    if files_token is None or base is None:
        raise RenderFailure("no files URL can be given now (see the log)")
    return f"{base}{FILES_PATH}{files_token}/"


class Snapshot:
    """The rules of one load, indexed; `decide` answers a machine from them.

    Immutable once made but for the cache of rendered scripts, which only ever gains the
    same text for the same rule, so requests share it without a lock.
    """

    __slots__ = ("ruleset", "loaded_at", "matcher", "has_once", "inventory", "matches_columns", "_scripts",
                 "_positions", "_templated", "_per_row")

    def __init__(self, ruleset: RuleSet, loaded_at: datetime) -> None:
        self.ruleset = ruleset
        self.loaded_at = loaded_at
        self.matcher = Matcher(ruleset.rules)
        self.has_once = any(rule.once is not None for rule in ruleset.rules)
        self.inventory = ruleset.inventory if ruleset.inventory is not None and len(ruleset.inventory) else None
        # A rule matches on an inventory column: the machine's row is looked up for every decision.
        known = {selector.key for rule in ruleset.rules for selector in rule.selectors}
        self.matches_columns = bool(self.inventory) and not known.isdisjoint(self.inventory.columns)
        self._scripts: dict[int, str] = {}
        self._positions: dict[int, int] | None = None
        # A rule with templates: its vars as a mapping, its templates longest first, and the
        # names its templates use.
        self._templated: dict[int, tuple[dict[str, str], tuple, frozenset[str]]] = {}
        # Scripts that depend on a machine's inventory row alone (not on what it sent, nor on
        # a token), by (rule, row, base URL): rendered once per machine, not per request.
        self._per_row: dict[tuple[int, int, str | None], str] = {}

    def decide(self, facts: Facts, request: Request | None = None, grub: bool = False) -> tuple[Rule | None, str]:
        """Return the rule that answers for `facts` (None: no rule) and the script to send.

        `request` is asked for a `once:` rule's token (without one, `once:` rules are passed
        over), and gives templates their URLs. `grub`: the script in GRUB's language, for a
        machine booting through GRUB (bootrules.decide.grub).
        """
        row = None
        matching = facts
        if self.matches_columns:
            row = self.inventory.find(facts)
            if row is not None:
                matching = {**row.match_facts, **facts}
        rule = self.matcher.first_match(matching)
        if rule is None:
            return None, render_grub_no_match() if grub else NO_MATCH_SCRIPT
        if rule.once is None and not rule.rendered and not grub:
            script = self._scripts.get(id(rule))  # _script, inline: this is every machine's path
            return rule, script if script is not None else self._script(rule)
        return self._decide_slowly(rule, facts, matching, row, request, grub)

    def _decide_slowly(self, rule: Rule | None, facts: Facts, matching: Facts, row: object,
                       request: Request | None, grub: bool = False) -> tuple[Rule | None, str]:
        """A `once:` rule (which may let the machine fall through), or one with templates."""
        if self._positions is None:
            self._positions = {id(each): position for position, each in enumerate(self.ruleset.rules)}
        while rule is not None:
            token = None
            if rule.once is not None:
                token = request.once_token(rule) if request is not None else None
                if token is None:
                    rule = self.matcher.first_match_after(matching, self._positions[id(rule)])
                    continue
            if grub:
                if row is None and self.inventory is not None:
                    row = self.inventory.find(facts)
                return rule, self._grub(rule, facts, row, request, token)
            if rule.rendered:
                if row is None and self.inventory is not None:
                    row = self.inventory.find(facts)
                return rule, self._rendered(rule, facts, row, request, token)
            if token is None:
                return rule, self._script(rule)
            done_url = f"{request.base}{DONE_PATH}{token}" if request is not None else ""
            # The rule's script with the done URL set after its two header lines (as
            # render_rule(rule, done_url=…) writes it), without rendering it again.
            script = self._script(rule)
            cut = script.index("\n", script.index("\n") + 1) + 1
            return rule, f"{script[:cut]}set {DONE_SETTING} {done_url}\n{script[cut:]}"
        return None, render_grub_no_match() if grub else NO_MATCH_SCRIPT

    def _rendered(self, rule: Rule, facts: Facts, row: object, request: Request | None, token: str | None) -> str:
        """The script of a rule with templates or files, for this machine: the rule's script,
        rendered once with its templates' texts in place, with each rendered for the machine."""
        base = request.base if request is not None else None
        own = {"rule": rule.name}
        if base is not None:
            own["base"] = base
        if token is not None:
            own["done"] = f"{base}{DONE_PATH}{token}"
        prepared = self._templated.get(id(rule))
        if prepared is None:
            prepared = self._templated[id(rule)] = (
                {variable.name: variable.value for variable in rule.vars},
                tuple(sorted(rule.templates, key=lambda field: len(field.text), reverse=True)),
                frozenset(name for field in rule.templates for name in field.template.names))
        rule_vars, fields, names = prepared
        key = (id(rule), id(row), base)
        if not rule.files and token is None:
            script = self._per_row.get(key)
            if script is not None:
                return script
        try:
            if rule.files:
                own["files"] = files_url(rule, request, base, token)
            script = rendered_script(self._script(rule), fields, variables(rule_vars, facts, row, own))
        except RenderFailure as failure:
            if request is not None:
                request.template_failed(rule, str(failure))
            return render_template_failure(rule, str(failure))
        if token is None:
            if not rule.files and names <= {"base", "rule", *rule_vars, *(row.values if row is not None else ())}:
                if len(self._per_row) >= PER_ROW_KEPT:
                    self._per_row.clear()
                self._per_row[key] = script
            return script
        cut = script.index("\n", script.index("\n") + 1) + 1
        return f"{script[:cut]}set {DONE_SETTING} {own['done']}\n{script[cut:]}"

    def _grub(self, rule: Rule, facts: Facts, row: object, request: Request | None, token: str | None) -> str:
        """The GRUB script of a rule for this machine (its templates rendered first)."""
        base = request.base if request is not None else None
        own = {"rule": rule.name, **({"base": base} if base is not None else {})}
        done_url = f"{base}{DONE_PATH}{token}" if token is not None else None
        if done_url is not None:
            own["done"] = done_url
        try:
            if rule.files:
                own["files"] = files_url(rule, request, base, token)
            if rule.templates:
                found = self.variables_of(rule, facts, row, own)
                rule = substituted(rule, rendered_values(rule.templates, found))
        except RenderFailure as failure:
            if request is not None:
                request.template_failed(rule, str(failure))
            return (f"# bootrules: rule '{rule.name}' (line {rule.line})\n"
                    f"echo 'bootrules: rule {rule.name} cannot be rendered for this machine; booting the next device'\n"
                    "exit\n")
        return render_grub(rule, done_url)

    def variables_of(self, rule: Rule, facts: Facts, row: object, own: dict[str, str]):
        """The variables `rule`'s templates see for a machine (bootrules.decide.templating)."""
        return variables({variable.name: variable.value for variable in rule.vars}, facts, row, own)

    def plain_script(self, rule: Rule) -> str | None:
        """The script every machine `rule` answers gets (the very string decide() returns);
        None when it is each machine's own (a `once:` token, templates)."""
        if rule.once is not None or rule.rendered:
            return None
        return self._script(rule)

    def _script(self, rule: Rule) -> str:
        key = id(rule)
        script = self._scripts.get(key)
        if script is None:  # rendered on first use; a race only renders the same text twice
            script = self._scripts[key] = render_rule(rule)
        return script
