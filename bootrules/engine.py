"""One loaded version of the rules, ready to answer: its index, its scripts, its decision."""

from __future__ import annotations

from datetime import datetime

from .matching import Matcher
from .model import Facts, Rule, RuleSet
from .render import render_no_match, render_rule

NO_MATCH_SCRIPT = render_no_match()


class Snapshot:
    """The rules of one load, indexed; `decide` answers a machine from them.

    Immutable once made but for the cache of rendered scripts, which only ever gains the
    same text for the same rule, so requests share it without a lock.
    """

    __slots__ = ("ruleset", "loaded_at", "matcher", "_scripts")

    def __init__(self, ruleset: RuleSet, loaded_at: datetime) -> None:
        self.ruleset = ruleset
        self.loaded_at = loaded_at
        self.matcher = Matcher(ruleset.rules)
        self._scripts: dict[int, str] = {}

    def decide(self, facts: Facts) -> tuple[Rule | None, str]:
        """Return the rule that answers for `facts` (None: no rule) and the script to send."""
        rule = self.matcher.first_match(facts)
        if rule is None:
            return None, NO_MATCH_SCRIPT
        key = id(rule)
        script = self._scripts.get(key)
        if script is None:  # rendered on first use; a race only renders the same text twice
            script = self._scripts[key] = render_rule(rule)
        return rule, script
