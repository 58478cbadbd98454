"""One loaded version of the rules, ready to answer: its index, its scripts, its decision."""

from __future__ import annotations

from datetime import datetime
from typing import Callable

from .matching import Matcher
from ..model import Facts, Rule, RuleSet
from .render import DONE_SETTING, render_no_match, render_rule

NO_MATCH_SCRIPT = render_no_match()


class Snapshot:
    """The rules of one load, indexed; `decide` answers a machine from them.

    Immutable once made but for the cache of rendered scripts, which only ever gains the
    same text for the same rule, so requests share it without a lock.
    """

    __slots__ = ("ruleset", "loaded_at", "matcher", "has_once", "_scripts", "_positions")

    def __init__(self, ruleset: RuleSet, loaded_at: datetime) -> None:
        self.ruleset = ruleset
        self.loaded_at = loaded_at
        self.matcher = Matcher(ruleset.rules)
        self.has_once = any(rule.once is not None for rule in ruleset.rules)
        self._scripts: dict[int, str] = {}
        self._positions: dict[int, int] | None = None

    def decide(self, facts: Facts, once: Callable[[Rule], str | None] | None = None) -> tuple[Rule | None, str]:
        """Return the rule that answers for `facts` (None: no rule) and the script to send.

        `once(rule)` is asked for each matching `once:` rule: the URL the machine reports
        done to, or None to let it fall through to the rules below. Without it, `once:`
        rules are passed over.
        """
        rule = self.matcher.first_match(facts)
        if rule is None:
            return None, NO_MATCH_SCRIPT
        if rule.once is not None:
            return self._decide_once(rule, facts, once)
        script = self._scripts.get(id(rule))  # _script, inline: this is every machine's path
        return rule, script if script is not None else self._script(rule)

    def _decide_once(self, rule: Rule | None, facts: Facts,
                     once: Callable[[Rule], str | None] | None) -> tuple[Rule | None, str]:
        if self._positions is None:
            self._positions = {id(each): position for position, each in enumerate(self.ruleset.rules)}
        while rule is not None and rule.once is not None:
            done_url = once(rule) if once is not None else None
            if done_url is not None:
                # The rule's script with the done URL set after its two header lines (as
                # render_rule(rule, done_url=…) writes it), without rendering it again.
                script = self._script(rule)
                cut = script.index("\n", script.index("\n") + 1) + 1
                return rule, f"{script[:cut]}set {DONE_SETTING} {done_url}\n{script[cut:]}"
            rule = self.matcher.first_match_after(facts, self._positions[id(rule)])
        if rule is None:
            return None, NO_MATCH_SCRIPT
        return rule, self._script(rule)

    def _script(self, rule: Rule) -> str:
        key = id(rule)
        script = self._scripts.get(key)
        if script is None:  # rendered on first use; a race only renders the same text twice
            script = self._scripts[key] = render_rule(rule)
        return script
