"""The JSON Schema editors use (contrib/rules.schema.json) agrees with the loader."""

from __future__ import annotations

import json

import pytest
import yaml

from bootrules.rules.loader import RulesError, parse_rules
from support import ROOT



# --------------------------------------------------------------------------- JSON Schema

SCHEMA = json.loads((ROOT / "contrib" / "rules.schema.json").read_text())


def schema_errors(document: object) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(SCHEMA)
    return [error.message for error in validator.iter_errors(document)]


def test_the_schema_accepts_the_bundled_rules():
    """rules.yaml passes both the schema and the loader (the manual's examples: tests/test_docs.py)."""
    text = (ROOT / "rules.yaml").read_text()
    assert schema_errors(yaml.safe_load(text)) == []
    parse_rules(text)


WRONG_DOCUMENTS = [
    pytest.param("rules:\n  - name: a\n    match: {mack: '00:11:22:33:44:55'}\n    exit: true\n", id="unknown-selector"),
    pytest.param("rules:\n  - name: a\n    chain: http://x/a\n    exit: true\n", id="two-actions"),
    pytest.param("rules:\n  - name: a\n    match: {mac: '00:11:22:33:44:55'}\n", id="no-action"),
    pytest.param("rules:\n  - name: a\n    match: {mac: '00:11:22:33:44'}\n    exit: true\n", id="bad-mac"),
    pytest.param("rules:\n  - name: a\n    match: {uuid: '1234'}\n    exit: true\n", id="bad-uuid"),
    pytest.param("rules:\n  - name: a\n    match: {platform: uefi}\n    exit: true\n", id="bad-platform"),
    pytest.param("rules:\n  - name: a\n    match: {}\n    exit: true\n", id="empty-match"),
    pytest.param("rules:\n  - name: a\n    match: {loader: shim}\n    exit: true\n", id="bad-loader"),
    pytest.param("rules:\n  - name: a\n    match: {ip6: 'fd00::zz'}\n    exit: true\n", id="ip6-not-an-address"),
    pytest.param("rules:\n  - name: a\n    exit: false\n", id="exit-false"),
    pytest.param("rules:\n  - name: a\n    sanboot: {uri: 'iscsi:x::::iqn.a', drive: 300}\n", id="drive-out-of-range"),
    pytest.param("rules:\n  - match: {mac: '00:11:22:33:44:55'}\n    exit: true\n", id="no-name"),
    pytest.param("rules:\n  - name: 'two words'\n    exit: true\n", id="bad-name"),
    pytest.param("rules:\n  - name: a\n    chain: 'http://x/a b'\n", id="space-in-url"),
    pytest.param("rules:\n  - name: a\n    boot: {initrd: http://x/i}\n", id="boot-without-kernel"),
    pytest.param("rules:\n  - name: a\n    sanboot: nbd://x/disk\n", id="bad-san-uri"),
    pytest.param("rule:\n  - name: a\n    exit: true\n", id="top-level-typo"),
    pytest.param("rules:\n  - name: a\n    menu: {items: [{key: x, label: X, exit: true}]}\n", id="menu-without-default"),
    pytest.param("rules:\n  - name: a\n    menu: {default: x, items: [{key: x, label: X, exit: true, chain: 'http://x/'}]}\n",
                 id="menu-item-with-two-actions"),
    pytest.param("rules:\n  - name: a\n    menu: {default: x, items: [{key: x, label: X, menu: {}}]}\n",
                 id="menu-in-a-menu"),
]


@pytest.mark.parametrize("text", WRONG_DOCUMENTS)
def test_wrong_documents_are_rejected_by_both_schema_and_loader(text):
    """What the loader refuses, the schema underlines too."""
    assert schema_errors(yaml.safe_load(text)) != []
    with pytest.raises(RulesError):
        parse_rules(text)
