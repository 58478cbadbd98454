"""Find the first rule that matches a machine: a pure function of the rules and the facts.

An ordered collection of rules; `first_match` returns the first rule, top to bottom, whose
every selector fits the machine. The index only narrows down which rules to try: each
rule is filed under one selector (an exact value, a glob's literal prefix or a CIDR), the
one fewest other rules share; rules that cannot be filed are always tried, and candidates
are tried in file order, so the answer is always the one a plain top-to-bottom scan gives.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections import defaultdict
from typing import Sequence

from .. import collector
from ..model import Exact, Facts, Glob, Network, Rule, Selector


def first_match_linear(rules: Sequence[Rule], facts: Facts) -> Rule | None:
    """Return the first rule matching `facts` by trying every rule in order (the reference)."""
    for rule in rules:
        if rule.matches(facts):
            return rule
    return None


def selectivity(selector: Selector) -> float:
    """How few machines a selector can let through, for choosing where to file a rule.

    Exact values name their machines: the most selective. A glob is as selective as its
    shortest literal prefix, a CIDR as its widest range (a /24 is worth six hex digits);
    a glob with no literal prefix cannot be filed at all (0).
    """
    if selector.exact:
        return float("inf")
    worst = float("inf")
    for pattern in selector.patterns:
        if isinstance(pattern, Glob):
            worth = float(len(pattern.prefix))
        elif isinstance(pattern, Network):
            worth = pattern.network.prefixlen / 4
        else:
            continue
        worst = min(worst, worth)
    return worst


def index_selector(rule: Rule) -> Selector | None:
    """The selector to file `rule` under, on its own: its most selective one, or None if none can be filed.

    Filing a rule under a broad selector (`serial: KIOSK-*`) when it also has a narrow one
    (`hostname: h00042-*`) would make every request with that broad value try every such
    rule: a client could force a scan of thousands.
    """
    best, best_worth = None, 0.0
    for selector in rule.selectors:
        worth = selectivity(selector)
        if worth > best_worth:
            best, best_worth = selector, worth
    return best


def _entries(selector: Selector) -> set[tuple]:
    """Where the index files a fileable selector's patterns."""
    entries: set[tuple] = set()
    for pattern in selector.patterns:
        if isinstance(pattern, Exact):
            entries.add(("=", selector.key, pattern.value))
        elif isinstance(pattern, Glob):
            entries.add(("*", selector.key, pattern.prefix))
        else:
            entries.add(("/", selector.key, pattern.network))
    return entries


def index_selectors(rules: Sequence[Rule]) -> list[Selector | None]:
    """For each rule, the selector to file it under, or None if none can be filed.

    A rule with several fileable selectors goes under the one whose index entries the
    fewest rules share (counting every fileable selector of every rule), and among equals
    under its most selective one. An exact value is not always narrow: 1,000 rules
    `{product: "Model-123*", platform: efi}` filed under `platform: efi` would make every
    UEFI machine that no rule names try all 1,000.
    """
    chosen: list[Selector | None] = []
    choices: dict[int, list[Selector]] = {}
    for position, rule in enumerate(rules):
        fileable = [selector for selector in rule.selectors if selectivity(selector) > 0]
        if len(fileable) > 1:
            choices[position] = fileable
        chosen.append(fileable[0] if fileable else None)
    if not choices:
        return chosen
    # Counted only on the keys a choice is made between; nothing is kept per rule.
    keys = {selector.key for fileable in choices.values() for selector in fileable}
    shared: dict[tuple, int] = {}
    for position, only in enumerate(chosen):
        counted = choices.get(position) or ([only] if only is not None and only.key in keys else [])
        for selector in counted:
            for entry in _entries(selector):
                shared[entry] = shared.get(entry, 0) + 1
    for position, fileable in choices.items():
        chosen[position] = min(fileable, key=lambda selector: (
            max(shared[entry] for entry in _entries(selector)), -selectivity(selector)))
    return chosen


@functools.lru_cache(maxsize=16384)
def _address_bits(value: str) -> tuple[int, int]:
    """An address fact (canonical text) as (IP version, integer).

    Cached as `values.normalize_fact` is: a machine asks from the same address on every
    request of its boot, and every boot after.
    """
    # inet_pton costs far less than ipaddress parsing. Scoped IPv6 (fe80::1%eth0) is
    # left to ipaddress, which ignores the scope in range checks too.
    try:
        if ":" in value:
            return 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, value), "big")
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, value), "big")
    except OSError:
        address = ipaddress.ip_address(value)
        return address.version, int(address)


def _compact(positions: list[int]) -> int | list[int]:
    return positions[0] if len(positions) == 1 else positions


class Matcher:
    """First-match lookup whose cost does not grow with the number of indexed rules."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)
        # The index makes an object or more per rule while every rule is live.
        with collector.paused():
            self._build()

    def _build(self) -> None:
        exact: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        prefix: dict[str, dict[int, dict[str, list[int]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
        networks: dict[str, dict[tuple[int, int], dict[int, list[int]]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(list))
        )
        always: list[int] = []
        for position, selector in enumerate(index_selectors(self.rules)):
            if selector is None:
                always.append(position)
                continue
            for pattern in selector.patterns:
                if isinstance(pattern, Exact):
                    exact[selector.key][pattern.value].append(position)
                elif isinstance(pattern, Glob):
                    prefix[selector.key][len(pattern.prefix)][pattern.prefix].append(position)
                else:
                    net = pattern.network
                    networks[selector.key][(net.version, int(net.netmask))][int(net.network_address)].append(position)
        # Plain dicts, so that lookups never add entries. Nearly every exact value belongs
        # to one rule; storing that rule's position alone instead of a one-item list saves
        # a list per rule, in every worker.
        exact_tables = {key: {value: _compact(hits) for value, hits in table.items()} for key, table in exact.items()}
        prefix_tables = {key: tuple((n, dict(t)) for n, t in sorted(tables.items())) for key, tables in prefix.items()}
        # Per key: (IP version, netmask as an integer, rules by network address as an integer).
        network_tables = {
            key: tuple((version, mask, dict(t)) for (version, mask), t in tables.items())
            for key, tables in networks.items()
        }
        # One lookup per fact finds all three kinds of table for its key.
        self._tables = {key: (exact_tables.get(key), prefix_tables.get(key), network_tables.get(key))
                        for key in {*exact_tables, *prefix_tables, *network_tables}}
        self._always = always

    def candidate_lists(self, facts: Facts) -> list[Sequence[int]]:
        """The index's lists of rule positions (each in file order) that may match `facts`."""
        lists: list[Sequence[int]] = []
        by_key = self._tables
        for key, value in facts.items():
            tables = by_key.get(key)
            if tables is None:
                continue
            exact, prefixes, ranges = tables
            if exact is not None:
                hit = exact.get(value)
                if hit is not None:
                    lists.append((hit,) if type(hit) is int else hit)
            if prefixes is not None:
                for length, by_prefix in prefixes:
                    hit = by_prefix.get(value[:length])
                    if hit:
                        lists.append(hit)
            if ranges is not None:
                address_version, address = _address_bits(value)
                for version, mask, by_network in ranges:
                    if version == address_version:
                        hit = by_network.get(address & mask)
                        if hit:
                            lists.append(hit)
        if self._always:
            lists.append(self._always)
        return lists

    def first_match(self, facts: Facts) -> Rule | None:
        """Return the first rule, in file order, whose every selector fits `facts`."""
        rules = self.rules
        best = len(rules)
        # The first match of each list, and the earliest of those; a list is abandoned
        # as soon as it reaches past the best position found so far.
        for positions in self.candidate_lists(facts):
            for position in positions:
                if position >= best:
                    break
                if rules[position].matches(facts):
                    best = position
                    break
        return rules[best] if best < len(rules) else None

    def first_match_after(self, facts: Facts, position: int) -> Rule | None:
        """Return the first rule below `position` (file order) whose every selector fits `facts`.

        For a `once:` rule that lets a machine fall through; kept apart from first_match so
        that the common path pays nothing for it.
        """
        rules = self.rules
        best = len(rules)
        for positions in self.candidate_lists(facts):
            for candidate in positions:
                if candidate >= best:
                    break
                if candidate > position and rules[candidate].matches(facts):
                    best = candidate
                    break
        return rules[best] if best < len(rules) else None


def why_not(rule: Rule, facts: Facts) -> str | None:
    """Say which selector of `rule` the machine fails first, and why; None if it matches."""
    for selector in rule.selectors:
        value = facts.get(selector.key)
        if value is None:
            return f"no {selector.key} was sent"
        if not selector.matches(facts):
            wanted = [_describe_pattern(pattern) for pattern in selector.patterns]
            target = wanted[0] if len(wanted) == 1 else "any of " + ", ".join(wanted)
            return f"{selector.key} {value} does not match {target}"
    return None


def explain(rules: Sequence[Rule], facts: Facts) -> list[tuple[Rule, str]]:
    """For each rule above the one that answers `facts` (all rules if none does), why it did not."""
    reasons = []
    for rule in rules:
        reason = why_not(rule, facts)
        if reason is None:
            break
        reasons.append((rule, reason))
    return reasons


def _describe_pattern(pattern: Exact | Glob | Network) -> str:
    if isinstance(pattern, Exact):
        return pattern.value
    if isinstance(pattern, Glob):
        return f"{pattern.text} (glob)"
    return str(pattern.network)
