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
from collections import defaultdict
from dataclasses import dataclass

from .. import values
from .matching import Matcher, index_selector
from .templating import value_problem
from ..model import Exact, Glob, Network, Pattern, Rule, RuleSet, Selector

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
    # A `once:` rule lets its machines through once they are done, so it shadows nothing.
    matcher = Matcher([rule for rule in rules if rule.once is None])
    position = {id(rule): index for index, rule in enumerate(rules)}
    warnings: list[Warning] = []
    broad = _BroadRules()  # earlier rules with no exact selector at all
    for index, rule in enumerate(rules):
        found = _shadowed_by_broad(rule, broad.candidates(rule)) or _shadowed_by_exact(rule, index, matcher, position)
        warnings.extend(found)
        if not found and rule.once is None and not any(selector.exact for selector in rule.selectors):
            # A shadowed rule is not filed: whatever it would cover, the rule covering it covers too.
            broad.add(rule)
    warnings.extend(_once_without_fallthrough(rules))
    warnings.extend(_inventory_and_vars(ruleset))
    if all(rule.selectors for rule in rules):
        last = rules[-1].line if rules else 1
        warnings.append(Warning(last, "no catch-all rule at the end: a machine no rule matches is sent on with "
                                      "`exit`; add a last rule without 'match:' to say what it should get"))
    return sorted(warnings, key=lambda warning: warning.line)


class _BroadRules:
    """Earlier rules without exact selectors, filed so that those that may cover a rule are found
    without comparing it with every one (which made `check` quadratic).

    A rule is filed under the patterns of its most selective selector (its anchor). An
    earlier rule covers a later one only if the later rule has a selector on the anchor's
    key whose every pattern, so also its first, is covered by one of the anchor's
    patterns: looking that first pattern up finds every candidate.
    """

    def __init__(self) -> None:
        self.catch_all: Rule | None = None
        self.exact: dict[tuple[str, str], list[Rule]] = defaultdict(list)
        self.prefixes: dict[str, dict[int, dict[str, list[Rule]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
        self.networks: dict[str, dict[tuple[int, int], dict[int, list[Rule]]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(list)))
        self.unfiled: dict[str, list[Rule]] = defaultdict(list)

    def add(self, rule: Rule) -> None:
        if not rule.selectors:
            if self.catch_all is None:
                self.catch_all = rule
            return
        anchor = index_selector(rule) or rule.selectors[0]
        for pattern in anchor.patterns:
            if isinstance(pattern, Exact):
                self.exact[(anchor.key, pattern.value)].append(rule)
            elif isinstance(pattern, Glob) and pattern.prefix:
                self.prefixes[anchor.key][len(pattern.prefix)][pattern.prefix].append(rule)
            elif isinstance(pattern, Network):
                net = pattern.network
                self.networks[anchor.key][(net.version, net.prefixlen)][int(net.network_address)].append(rule)
            else:
                self.unfiled[anchor.key].append(rule)

    def candidates(self, rule: Rule) -> list[Rule]:
        """The filed rules that may cover `rule`, in file order."""
        found: dict[int, Rule] = {}
        if self.catch_all is not None:
            found[id(self.catch_all)] = self.catch_all
        for selector in rule.selectors:
            for candidate in self._lookup(selector.key, selector.patterns[0]):
                found[id(candidate)] = candidate
        return sorted(found.values(), key=lambda candidate: candidate.line)

    def _lookup(self, key: str, narrow: Pattern) -> list[Rule]:
        hits: list[Rule] = list(self.unfiled.get(key, ()))
        if isinstance(narrow, Exact):
            hits += self.exact.get((key, narrow.value), ())
        if isinstance(narrow, (Exact, Glob)):
            text = narrow.value if isinstance(narrow, Exact) else narrow.prefix
            for length, by_prefix in self.prefixes.get(key, {}).items():
                hits += by_prefix.get(text[:length], ()) if len(text) >= length else ()
        if key in self.networks and not isinstance(narrow, Glob):
            if isinstance(narrow, Exact):
                address = ipaddress.ip_address(narrow.value)
                version, bits, width = address.version, int(address), address.max_prefixlen
            else:
                net = narrow.network
                version, bits, width = net.version, int(net.network_address), net.prefixlen
            for (net_version, length), by_network in self.networks[key].items():
                if net_version == version and length <= width:
                    total = 32 if version == 4 else 128
                    mask = ((1 << length) - 1) << (total - length)
                    hits += by_network.get(bits & mask, ())
        return hits


MAX_ROWS_NAMED = 5


OWN_VARIABLES = frozenset({"base", "rule", "files", "done"})


def _inventory_and_vars(ruleset: RuleSet) -> list[Warning]:
    """What gives some machines a rule's failure path although the rules load: a variable the
    inventory alone gives and rows lack, and a value (a row's, or a default of the rule's
    `vars:`) that can never go into the script."""
    inventory = ruleset.inventory
    found = []
    for rule in ruleset.rules:
        pasted = _pasted(rule)
        found.extend(_defaults_refused(rule, pasted))
        if inventory is None or not len(inventory):
            continue
        given = {variable.name for variable in rule.vars} | OWN_VARIABLES
        needed = {name for field in rule.templates for name in field.template.names} - given - set(values.SELECTOR_KEYS)
        needed |= {name for file in rule.files if file in ruleset.files
                   for name in ruleset.files[file].names} - given - {"mac", "uuid"}
        from_rows = {name: words for name, words in pasted.items() if name in inventory.columns}
        if not needed and not from_rows:
            continue
        rows = [row for row in inventory.rows if _may_match(rule, row, inventory.columns)]
        found.extend(_variables_some_rows_lack(rule, needed, rows, inventory.columns))
        found.extend(_row_values_refused(rule, from_rows, rows))
    return found


def _pasted(rule: Rule) -> dict[str, bool]:
    """The variables a rule's script values take from a row, `vars:` or what the machine sent,
    each with whether a space may go in (only where every field it is in takes words)."""
    pasted: dict[str, bool] = {}
    for field in rule.templates:
        for name in field.template.names:
            if name not in OWN_VARIABLES:
                pasted[name] = pasted.get(name, True) and field.words
    return pasted


def _refused(value: str, words: bool) -> str | None:
    """Why `value` cannot go into the script where a template puts it (as rendering judges)."""
    problem = value_problem(value)
    return None if words and problem == "holds a space" else problem


def _named(rows: list[str]) -> str:
    return ", ".join(rows[:MAX_ROWS_NAMED]) + (f" and {len(rows) - MAX_ROWS_NAMED} more"
                                               if len(rows) > MAX_ROWS_NAMED else "")


def _defaults_refused(rule: Rule, pasted: dict[str, bool]) -> list[Warning]:
    """A `vars:` default that can never go into the script: every machine that takes it (no
    inventory row overrides it) gets the failure path. The value is not shown: it may be secret."""
    found = []
    for variable in rule.vars:
        problem = _refused(variable.value, pasted[variable.name]) if variable.name in pasted else None
        if problem:
            found.append(Warning(rule.line, f"rule '{rule.name}': vars: '{variable.name}' {problem}, which the "
                                            "script cannot take: the machines no inventory row gives "
                                            f"'{variable.name}' get the rule's failure path"))
    return found


def _variables_some_rows_lack(rule: Rule, needed: set[str], rows: list, columns: frozenset[str]) -> list[Warning]:
    """A template's variable that only the inventory gives, which some of the rows the rule can
    match lack (those machines would get the rule's failure path)."""
    found = []
    # Only a column no machine sends (role:, rack:) keeps out machines the inventory lacks.
    outside = not any(selector.key in columns and selector.key not in values.SELECTOR_KEYS
                      for selector in rule.selectors)
    for name in sorted(needed):
        lacking = [row.where for row in rows if name not in row.values]
        if not lacking and not outside:
            continue
        who = (f"the inventory rows {_named(lacking)}" if lacking else "") + \
              (" and " if lacking and outside else "") + \
              ("machines not in the inventory (the rule does not match on a column)" if outside else "")
        found.append(Warning(rule.line, f"rule '{rule.name}': variable '{name}' is given by the inventory only, "
                                        f"and {who} lack it: those machines get the rule's failure path"))
    return found


def _row_values_refused(rule: Rule, pasted: dict[str, bool], rows: list) -> list[Warning]:
    """Rows the rule may match whose value of a variable it pastes cannot go into the script
    (a row wins over `vars:` and over what the machine sends). Values are not shown."""
    found = []
    for name in sorted(pasted):
        refused: dict[str, list[str]] = defaultdict(list)
        for row in rows:
            value = row.values.get(name)
            problem = _refused(value, pasted[name]) if value is not None else None
            if problem:
                refused[problem].append(row.where)
        for problem, where in refused.items():
            found.append(Warning(rule.line, f"rule '{rule.name}': in the inventory rows {_named(where)}, variable "
                                            f"'{name}' {problem}, which the script cannot take: those machines get "
                                            "the rule's failure path"))
    return found


def _may_match(rule: Rule, row: object, columns: frozenset[str]) -> bool:
    """Whether `rule` may match the machine of inventory `row` (selectors on what only the
    machine can say, such as its platform, are taken to match)."""
    facts = dict(row.match_facts)  # type: ignore[attr-defined]
    for name in row.names:  # type: ignore[attr-defined]
        key, _, value = name.partition(":")
        facts[key] = value
    for selector in rule.selectors:
        if (selector.key in columns or selector.key in ("mac", "uuid", "serial")) and not selector.matches(facts):
            if selector.key in facts or selector.key in columns:
                return False
    return True


def _once_without_fallthrough(rules: tuple[Rule, ...]) -> list[Warning]:
    """`once:` rules with no later rule that answers all their machines once they are done."""
    found = []
    # A catch-all below answers every machine: the common case, found without a scan.
    last_catch_all = max((index for index, rule in enumerate(rules) if not rule.selectors), default=-1)
    for index, rule in enumerate(rules):
        if rule.once is None or index < last_catch_all:
            continue
        below = rules[index + 1:]
        if any(all(_implied(selector, rule) for selector in later.selectors) for later in below):
            continue
        found.append(Warning(rule.line, f"rule '{rule.name}' has once: but no rule below it answers all its "
                                        "machines once they report done (they would get the no-match `exit`); "
                                        "add one below, e.g. a last rule without 'match:' with exit: true"))
    return found


def _describe(rule: Rule) -> str:
    return f"rule '{rule.name}' (line {rule.line})"


def _shadowed_by_exact(rule: Rule, index: int, matcher: Matcher, position: dict[int, int]) -> list[Warning]:
    exact = [selector for selector in rule.selectors if selector.exact]
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
        if isinstance(narrow, Glob) and broad.text.endswith("*") and not values.is_glob(broad.text[:-1]):
            return not broad.bare and not narrow.bare and narrow.prefix.startswith(broad.prefix)
        return False
    return isinstance(narrow, Exact) and broad == narrow
