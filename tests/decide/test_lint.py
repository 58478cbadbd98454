"""`check` warnings: rules that can never match, a missing catch-all (bootrules/lint.py)."""

from __future__ import annotations

import textwrap

import pytest

from app import cli
from bootrules.decide.lint import lint
from bootrules.rules.loader import parse_rules
from support import ROOT, SAMPLE_RULES



# --------------------------------------------------------------------------- check warnings

LINT_CASES = [
    pytest.param(
        """
        rules:
          - name: everyone
            exit: true
          - name: never
            match: {mac: "00:11:22:33:44:55"}
            chain: http://x/never
        """,
        ["rules.yaml:4: warning: rule 'never' can never match: rule 'everyone' (line 2) has no 'match:', so it matches every machine"],
        id="earlier-catch-all",
    ),
    pytest.param(
        """
        rules:
          - name: first
            match: {mac: "00:11:22:33:44:55"}
            exit: true
          - name: second
            match: {mac: "00-11-22-33-44-55", platform: efi}
            chain: http://x/second
          - name: rest
            exit: true
        """,
        ["rules.yaml:5: warning: rule 'second' can never match: rule 'first' (line 2) matches its machines first"],
        id="same-mac-twice",
    ),
    pytest.param(
        """
        rules:
          - name: vmware
            match: {mac: "00:0c:29:*"}
            exit: true
          - name: lab
            match: {mac: ["00:11:22:33:44:55", "00:0C:29:AB:CD:EF"]}
            chain: http://x/lab
          - name: one-vm
            match: {mac: "00:0c:29:00:00:01"}
            chain: http://x/vm
          - name: rest
            exit: true
        """,
        [
            "rules.yaml:5: warning: rule 'lab': mac 00:0c:29:ab:cd:ef never reaches it: rule 'vmware' (line 2) matches that first",
            "rules.yaml:8: warning: rule 'one-vm' can never match: rule 'vmware' (line 2) matches its machines first",
        ],
        id="glob-covers-later-exact",
    ),
    pytest.param(
        """
        rules:
          - name: lab-net
            match: {client: 10.0.0.0/8}
            exit: true
          - name: office
            match: {client: 10.1.0.0/16, product: "OptiPlex*"}
            chain: http://x/office
          - name: dell
            match: {product: "optiplex 7*"}
            chain: http://x/dell
          - name: rest
            exit: true
        """,
        ["rules.yaml:5: warning: rule 'office' can never match: rule 'lab-net' (line 2) matches its machines first"],
        id="cidr-covers-cidr",
    ),
    pytest.param(
        """
        rules:
          - name: only
            match: {mac: "00:11:22:33:44:55"}
            exit: true
        """,
        ["rules.yaml:2: warning: no catch-all rule at the end: a machine no rule matches is sent on with `exit`; "
         "add a last rule without 'match:' to say what it should get"],
        id="no-catch-all",
    ),
    pytest.param(SAMPLE_RULES, [], id="clean"),
]


@pytest.mark.parametrize("text,expected", LINT_CASES)
def test_check_warns_about_rules_that_can_never_match(text, expected):
    """Each warning names the shadowed rule and the rule that wins, with both lines."""
    ruleset = parse_rules(textwrap.dedent(text).lstrip("\n"))
    assert [warning.render("rules.yaml") for warning in lint(ruleset)] == expected


def test_check_exits_0_on_warnings_unless_strict(runner, write_rules):
    """Warnings are printed but only --strict turns them into exit status 1."""
    path = write_rules(LINT_CASES[0].values[0])
    relaxed = runner.invoke(cli, ["check", str(path)])
    assert relaxed.exit_code == 0
    assert "warning: rule 'never' can never match" in relaxed.stderr
    assert relaxed.stdout == f"{path}: 2 rules, no errors, 1 warning\n"
    assert runner.invoke(cli, ["check", "--strict", str(path)]).exit_code == 1


def test_the_bundled_rules_have_no_warnings(runner):
    """The rules.yaml shipped as an example passes `check --strict`."""
    result = runner.invoke(cli, ["check", "--strict", str(ROOT / "rules.yaml")])
    assert result.exit_code == 0, result.output
