"""Warnings about rules that load fine but cannot do what they look like they do.

A rule is shadowed when an earlier rule matches every machine it matches: first match
wins, so it never answers. Two checks find that, both sound (a warning is always true):

- the machine a rule's exact values describe (its MAC, its serial…) is run through the
  matcher itself; if an earlier rule answers it, that rule needs nothing the later one
  does not fix, so it takes all of the later rule's machines (or, for one value of a list,
  the machines with that value);
- earlier rules without exact selectors (catch-alls, globs, CIDRs) are compared with the
  later rule selector by selector.
"""

from __future__ import annotations

import ipaddress
import itertools
from dataclasses import dataclass

from .matching import Matcher
from .model import Exact, Glob, Network, Pattern, Rule, RuleSet, Selector

MAX_COMBINATIONS = 16


@dataclass(frozen=True)
class Warning:
    """One finding, as `file:line: message` for the user."""

    line: int
    message: str

    def render(self, source: str) -> str:
        return f"{source}:{self.line}: warning: {self.message}"


def lint(ruleset: RuleSet) -> list[Warning]:
    """Return the warnings for a rule set, in file order."""
    rules = ruleset.rules
    matcher = Matcher(rules)
    position = {id(rule): index for index, rule in enumerate(rules)}
    warnings: list[Warning] = []
    # Earlier rules with no exact selector at all, grouped by the keys they select on: a
    # rule can only be shadowed by one whose keys it also has.
    broad: dict[frozenset[str], list[Rule]] = {}
    for index, rule in enumerate(rules):
        keys = frozenset(selector.key for selector in rule.selectors)
        candidates = [earlier for group, members in broad.items() if group <= keys for earlier in members]
        candidates.sort(key=lambda earlier: earlier.line)
        found = _shadowed_by_broad(rule, candidates) or _shadowed_by_exact(rule, index, matcher, position)
        warnings.extend(found)
        if not any(all(isinstance(p, Exact) for p in selector.patterns) for selector in rule.selectors):
            broad.setdefault(keys, []).append(rule)
    if all(rule.selectors for rule in rules):
        last = rules[-1].line if rules else 1
        warnings.append(Warning(last, "no catch-all rule at the end: a machine no rule matches is sent on with "
                                      "`exit`; add a last rule without 'match:' to say what it should get"))
    return sorted(warnings, key=lambda warning: warning.line)


def _describe(rule: Rule) -> str:
    return f"rule '{rule.name}' (line {rule.line})"


def _shadowed_by_exact(rule: Rule, index: int, matcher: Matcher, position: dict[int, int]) -> list[Warning]:
    exact = [selector for selector in rule.selectors if all(isinstance(p, Exact) for p in selector.patterns)]
    if not exact:
        return []
    values = [[(selector.key, pattern.value) for pattern in selector.patterns] for selector in exact]  # type: ignore[union-attr]
    combinations = list(itertools.islice(itertools.product(*values), MAX_COMBINATIONS + 1))
    if len(combinations) > MAX_COMBINATIONS:
        return []
    takers: dict[tuple[tuple[str, str], ...], Rule] = {}
    for combination in combinations:
        winner = matcher.first_match(dict(combination))
        if winner is not None and position[id(winner)] < index and winner is not rule:
            takers[combination] = winner
    if not takers:
        return []
    if len(takers) == len(combinations):
        earlier = sorted({id(r): r for r in takers.values()}.values(), key=lambda r: r.line)
        return [Warning(rule.line, f"rule '{rule.name}' can never match: " + ", ".join(
            f"{_describe(r)} matches its machines first" for r in earlier))]
    return [
        Warning(rule.line, f"rule '{rule.name}': {' '.join(f'{key} {value}' for key, value in combination)} "
                           f"never reaches it: {_describe(winner)} matches that first")
        for combination, winner in takers.items()
    ]


def _shadowed_by_broad(rule: Rule, broad: list[Rule]) -> list[Warning]:
    for earlier in broad:
        if all(_implied(selector, rule) for selector in earlier.selectors):
            reason = "has no 'match:', so it matches every machine" if not earlier.selectors else "matches its machines first"
            return [Warning(rule.line, f"rule '{rule.name}' can never match: {_describe(earlier)} {reason}")]
    return []


def _implied(selector: Selector, rule: Rule) -> bool:
    """Tell whether every machine `rule` matches also satisfies `selector`."""
    for own in rule.selectors:
        if own.key == selector.key and all(
            any(_covers(broad, narrow) for broad in selector.patterns) for narrow in own.patterns
        ):
            return True
    return False


def _covers(broad: Pattern, narrow: Pattern) -> bool:
    """Tell whether every value `narrow` accepts is accepted by `broad` (False if unsure)."""
    if isinstance(broad, Network):
        if isinstance(narrow, Network):
            return narrow.network.version == broad.network.version and narrow.network.subnet_of(broad.network)  # type: ignore[arg-type]
        if isinstance(narrow, Exact):
            return ipaddress.ip_address(narrow.value) in broad.network
        return False
    if isinstance(broad, Glob):
        if isinstance(narrow, Exact):
            return broad.matches(narrow.value)
        if isinstance(narrow, Glob) and broad.text.endswith("*") and not any(c in broad.text[:-1] for c in "*?["):
            return not broad.bare_mac and not narrow.bare_mac and narrow.prefix.startswith(broad.prefix)
        return False
    return isinstance(narrow, Exact) and broad == narrow
