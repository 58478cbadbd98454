"""First match wins: the indexed matcher, checked against a plain top-to-bottom scan."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bootrules.rules.loader import compile_pattern
from bootrules.decide.matching import Matcher, first_match_linear
from bootrules.model import Exit, Rule, Selector

RULES_TEXT = """
rules:
  - name: exact-mac
    match: {mac: "00:12:34:56:78:90"}
    exit: 1
  - name: dell-efi
    match: {manufacturer: "Dell*", platform: efi}
    exit: 2
  - name: either-mac
    match: {mac: ["00:11:22:33:44:55", "00:11:22:33:44:56"]}
    exit: 3
  - name: vmware
    match: {mac: "00:0c:29:*"}
    exit: 4
  - name: bare-oui
    match: {mac: "525400*"}
    exit: 5
  - name: subnet
    match: {ip: 10.20.0.0/16}
    exit: 6
  - name: suffix-serial
    match: {serial: "*-lab"}
    exit: 7
  - name: ipv6-client
    match: {client: "fd00::/8"}
    exit: 8
  - name: everyone
    exit: 9
"""


@pytest.fixture(scope="module")
def matcher():
    from bootrules.rules.loader import parse_rules

    return Matcher(parse_rules(RULES_TEXT).rules)


@pytest.mark.parametrize(
    "facts,expected",
    [
        ({"mac": "00:12:34:56:78:90", "manufacturer": "dell inc.", "platform": "efi"}, "exact-mac"),
        ({"mac": "00:99:99:99:99:99", "manufacturer": "dell inc.", "platform": "efi"}, "dell-efi"),
        ({"mac": "00:99:99:99:99:99", "manufacturer": "dell inc.", "platform": "pcbios"}, "everyone"),
        ({"mac": "00:11:22:33:44:56"}, "either-mac"),
        ({"mac": "00:0c:29:ab:cd:ef"}, "vmware"),
        ({"mac": "52:54:00:12:34:56"}, "bare-oui"),
        ({"mac": "52:54:01:12:34:56", "ip": "10.20.30.40"}, "subnet"),
        ({"ip": "10.21.0.1"}, "everyone"),
        ({"serial": "rack1-lab"}, "suffix-serial"),
        ({"client": "fd12::1"}, "ipv6-client"),
        ({"client": "10.0.0.1"}, "everyone"),
        ({}, "everyone"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_the_first_rule_whose_every_selector_matches_wins(matcher, facts, expected):
    """The answer is the earliest rule all of whose selectors fit the machine."""
    assert matcher.first_match(facts).name == expected
    assert first_match_linear(matcher.rules, facts).name == expected


def test_no_rule_matches_gives_none():
    """Without a catch-all, an unknown machine gets no rule (the caller sends `exit`)."""
    from bootrules.rules.loader import parse_rules

    rules = parse_rules("rules:\n  - name: one\n    match: {mac: 00:11:22:33:44:55}\n    exit: true\n").rules
    assert Matcher(rules).first_match({"mac": "00:11:22:33:44:66"}) is None


# ----------------------------------------------------------------- property: index == scan

MACS = ["00:11:22:33:44:55", "00:11:22:33:44:56", "00:0c:29:aa:bb:cc", "52:54:00:12:34:56", "52:54:00:00:00:01"]
SERIALS = ["abc-1", "abc-2", "xyz", "s&n+1#x", "abc"]
IPS = ["10.0.0.1", "10.0.1.5", "192.168.1.1", "fd00::1"]

PATTERN_TEXTS = {
    "mac": MACS + ["00:0c:29:*", "5254*", "*:56", "52:54:00:0?:*", "*"],
    "serial": SERIALS + ["abc*", "*-1", "ab?-[12]", "x*"],
    "ip": IPS + ["10.0.0.0/8", "10.0.1.0/24", "0.0.0.0/0", "fd00::/8", "fe80::/10"],
    "platform": ["efi", "pcbios", "e*"],
}
# A scoped IPv6 address is a fact a machine can report, never a rule value.
FACT_VALUES = {"mac": MACS + ["00:0c:29:00:00:01"], "serial": SERIALS, "ip": IPS + ["fe80::1%eth0"],
               "platform": ["efi", "pcbios"]}

selectors = st.dictionaries(
    st.sampled_from(sorted(PATTERN_TEXTS)),
    st.integers(min_value=1, max_value=3),
    max_size=3,
).flatmap(
    lambda counts: st.tuples(
        *[
            st.lists(st.sampled_from(PATTERN_TEXTS[key]), min_size=n, max_size=n).map(
                lambda texts, key=key: Selector(key, tuple(compile_pattern(key, t) for t in texts))
            )
            for key, n in sorted(counts.items())
        ]
    )
)
rule_lists = st.lists(selectors, max_size=25).map(
    lambda sels: [Rule(name=f"r{i}", line=i + 1, selectors=tuple(s), action=Exit()) for i, s in enumerate(sels)]
)
facts_maps = st.dictionaries(st.sampled_from(sorted(FACT_VALUES)), st.none(), max_size=4).flatmap(
    lambda keys: st.fixed_dictionaries({key: st.sampled_from(FACT_VALUES[key]) for key in keys})
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rules=rule_lists, facts_list=st.lists(facts_maps, min_size=1, max_size=8))
def test_indexed_matcher_always_picks_the_rule_a_linear_scan_picks(rules, facts_list):
    """For any rules and any machine, the index answers exactly as top-to-bottom order does."""
    matcher = Matcher(rules)
    for facts in facts_list:
        assert matcher.first_match(facts) is first_match_linear(rules, facts)


def test_network_patterns_match_both_address_families_separately():
    """An IPv4 range never matches an IPv6 address and the other way round."""
    v4 = compile_pattern("ip", "0.0.0.0/0")
    assert v4.matches("10.1.2.3") and not v4.matches("fd00::1")
    assert compile_pattern("ip", "10.0.0.7").network == ipaddress.ip_network("10.0.0.7/32")
