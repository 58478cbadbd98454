"""Loading rules.yaml: what a good file becomes, and every way a bad one is reported."""

import textwrap

import pytest

from bootrules.rules.loader import RulesError, load_rules, parse_rules
from support import ROOT
from bootrules.model import Boot, Chain, Exact, Exit, Glob, Network, Sanboot, Setting


def parse(text: str):
    return parse_rules(textwrap.dedent(text).lstrip("\n"), "rules.yaml")


def problems(text: str) -> list[str]:
    with pytest.raises(RulesError) as caught:
        parse(text)
    return list(caught.value.problems)


def test_a_full_rule_set_loads_into_ordered_rules_with_their_lines():
    """Every selector kind and action loads, in file order, with the line of each rule."""
    ruleset = parse(
        """
        rules:
          - name: one
            match: {mac: 00-12-34-56-78-90, uuid: 4C4C4544-0042-3510-8052-B4C04F4D4E31}
            chain: http://pxe.example.com/pxelinux.0
          - name: two
            match:
              mac: ["00:11:22:33:44:55", 001122334456]
              ip: 10.0.0.0/8
              client: 192.168.1.7
            set: {initiator-iqn: "iqn.2007-08.com.example:init", password: s3cret}
            sanboot: iscsi:san.example.com:6:3260:0:iqn.2007-08.com.example.san:target
          - name: three
            match: {manufacturer: "Dell*", product: "PowerEdge R6*", platform: efi}
            boot: {kernel: http://x/linux, initrd: [http://x/a.gz, http://x/b.gz], args: "auto=true quiet"}
          - name: four
            sanboot: {uri: [http://x/disk.img, http://y/disk.img], drive: 0x81, no-describe: yes, keep: true, filename: \\EFI\\BOOT\\BOOTX64.EFI}
          - name: five
            exit: 3
          - name: six
            exit: true
        """
    )
    assert [rule.name for rule in ruleset.rules] == ["one", "two", "three", "four", "five", "six"]
    assert [rule.line for rule in ruleset.rules] == [2, 5, 12, 15, 17, 19]
    one, two, three, four, five, six = ruleset.rules
    assert one.selectors[0].patterns == (Exact("00:12:34:56:78:90"),)
    assert one.selectors[1].patterns == (Exact("4c4c4544-0042-3510-8052-b4c04f4d4e31"),)
    assert one.action == Chain("http://pxe.example.com/pxelinux.0")
    assert two.selectors[0].patterns == (Exact("00:11:22:33:44:55"), Exact("00:11:22:33:44:56"))
    assert [type(p) for s in two.selectors[1:] for p in s.patterns] == [Network, Network]
    assert two.settings == (
        Setting("initiator-iqn", "iqn.2007-08.com.example:init"),
        Setting("password", "s3cret", secret=True),
    )
    assert three.selectors[0].patterns[0].text == "dell*"
    assert isinstance(three.selectors[0].patterns[0], Glob)
    assert three.action == Boot("http://x/linux", ("http://x/a.gz", "http://x/b.gz"), "auto=true quiet")
    assert four.action == Sanboot(
        ("http://x/disk.img", "http://y/disk.img"), drive=0x81, no_describe=True, keep=True, filename="\\EFI\\BOOT\\BOOTX64.EFI"
    )
    assert five.action == Exit(3) and six.action == Exit(1)
    assert six.selectors == ()


@pytest.mark.parametrize(
    "written,expected",
    [
        ("10:20:30:40:50:59", "10:20:30:40:50:59"),  # YAML 1.1 base-60 integer
        ("0012345", "0012345"),  # YAML 1.1 octal
        ("no", "no"),  # YAML 1.1 boolean
        ("1e3", "1e3"),  # float
        ("~", "~"),  # null
    ],
    ids=["sexagesimal", "octal", "boolean", "float", "null-looking-quoted"],
)
def test_values_are_the_text_as_written_not_yaml_1_1_types(written, expected):
    """Unquoted values that YAML 1.1 would turn into numbers or booleans keep their text."""
    key = "mac" if ":" in written else "serial"
    value = written if written != "~" else '"~"'
    ruleset = parse(f"rules:\n  - name: r\n    match: {{{key}: {value}}}\n    exit: true\n")
    pattern = ruleset.rules[0].selectors[0].patterns[0]
    assert pattern == Exact(expected.lower())


def test_set_values_keep_leading_zeros():
    """A setting such as a CHAP username 007 is sent as written, not as the number 7."""
    ruleset = parse("rules:\n  - name: r\n    set: {username: 007, reverse-username: 0x10}\n    exit: true\n")
    assert [s.value for s in ruleset.rules[0].settings] == ["007", "0x10"]


BAD_DOCUMENTS = [
    pytest.param(
        """
        rules:
          - name: lab
            match: {mack: "00:11:22:33:44:55"}
            exit: true
        """,
        ["rules.yaml:3: rule 'lab': match: unknown key 'mack' (did you mean 'mac'? expected one of: mac, uuid, serial, product, manufacturer, asset, hostname, platform, buildarch, loader, ip, ip6, client)"],
        id="unknown-selector-suggests",
    ),
    pytest.param(
        """
        rules:
          - name: lab
            match: {mac: "00:11:22:33:44:55"}
            chian: http://x/
        """,
        [
            "rules.yaml:4: rule 'lab': rule: unknown key 'chian' (did you mean 'chain'? expected one of: name, match, set, once, vars, files, chain, sanboot, boot, exit, menu)",
            "rules.yaml:2: rule 'lab': no action (expected exactly one of: chain, sanboot, boot, exit, menu)",
        ],
        id="unknown-rule-key-and-no-action",
    ),
    pytest.param(
        """
        rules:
          - name: a
            chain: http://x/a
            exit: true
        """,
        ["rules.yaml:4: rule 'a': two actions (chain and exit); a rule has exactly one"],
        id="two-actions",
    ),
    pytest.param(
        """
        rules:
          - name: a
            match: {mac: "00:11:22:33:44:55", mac: "00:11:22:33:44:56"}
            exit: true
        """,
        ["rules.yaml:3: rule 'a': match: key 'mac' given twice (first at line 3)"],
        id="duplicate-key",
    ),
    pytest.param(
        """
        rules:
          - name: a
            exit: true
          - name: a
            exit: true
        """,
        ["rules.yaml:4: rule 'a': name already used by the rule at line 2"],
        id="duplicate-name",
    ),
    pytest.param(
        """
        rules:
          - name: bad-values
            match:
              mac: "00:11:22:33:44"
              uuid: "1234"
              ip: 10.0.0.1/24
              platform: uefi
            exit: true
        """,
        [
            "rules.yaml:4: rule 'bad-values': match mac: '00:11:22:33:44' is not a MAC address (expected e.g. 00:11:22:33:44:55, 00-11-22-33-44-55, 0011.2233.4455 or 001122334455)",
            "rules.yaml:5: rule 'bad-values': match uuid: '1234' is not a UUID (expected e.g. 4c4c4544-0042-3510-8052-b4c04f4d4e31)",
            "rules.yaml:6: rule 'bad-values': match ip: '10.0.0.1/24' has host bits set (did you mean 10.0.0.0/24?)",
            "rules.yaml:7: rule 'bad-values': match platform: unknown platform 'uefi' (did you mean 'efi'? expected one of: pcbios, efi, linux, sbi)",
        ],
        id="bad-mac-uuid-cidr-platform",
    ),
    pytest.param(
        """
        rules:
          - name: inject
            chain: "http://x/a || shell"
          - name: newline
            boot: {kernel: http://x/k, args: "quiet\\ninitrd http://evil/x"}
          - name: comment
            set: {username: "#me"}
            exit: true
        """,
        [
            "rules.yaml:3: rule 'inject': chain: 'http://x/a || shell' contains a space, line break or control character",
            "rules.yaml:5: rule 'newline': boot args: 'quiet\\ninitrd http://evil/x' contains a line break or control character",
            "rules.yaml:7: rule 'comment': set username: '#me' starts with '#', which iPXE reads as a comment",
        ],
        id="values-that-would-break-the-script",
    ),
    pytest.param(
        """
        rules:
          - name: san
            sanboot: iscsi:san.example.com:7:3260:0:iqn.x
          - name: san2
            sanboot: nbd://x/disk
          - name: san3
            sanboot: {drive: 0x180}
        """,
        [
            "rules.yaml:3: rule 'san': sanboot: 'iscsi:san.example.com:7:3260:0:iqn.x': protocol must be empty or 6 (TCP), not '7'",
            "rules.yaml:5: rule 'san2': sanboot: 'nbd://x/disk' is not a SAN URI (expected one of: iscsi:, http:, https:, aoe:, ib_srp:, fcp:)",
            "rules.yaml:7: rule 'san3': sanboot drive: 384 is out of range (0..255)",
        ],
        id="bad-sanboot",
    ),
    pytest.param(
        """
        rules:
          - name: empty-match
            match:
            exit: true
        """,
        ["rules.yaml:3: rule 'empty-match': 'match:' is empty; to match every machine, leave 'match:' out"],
        id="empty-match-is-not-match-all",
    ),
    pytest.param(
        """
        rules:
          - match: {mac: "00:11:22:33:44:55"}
            exit: false
        """,
        [
            "rules.yaml:2: rule #1 has no 'name:'",
            "rules.yaml:3: 'exit: false' does nothing; give the rule another action or remove it",
        ],
        id="no-name-exit-false",
    ),
    pytest.param("", ["rules.yaml:1: the file is empty (expected 'rules:' and a list of rules)"], id="empty-file"),
    pytest.param("rules:\n", ["rules.yaml:1: 'rules:' is empty (write 'rules: []' for no rules)"], id="rules-null"),
    pytest.param("- name: a\n  exit: true\n", ["rules.yaml:1: the file must be a mapping of rules"], id="top-level-list"),
    pytest.param(
        "rule:\n  - name: a\n    exit: true\n",
        ["rules.yaml:1: the file: unknown key 'rule' (did you mean 'rules'? expected one of: rules, inventory, templates)", "rules.yaml:1: missing 'rules:' (the list of rules)"],
        id="top-level-typo",
    ),
    pytest.param(
        "rules:\n  - name: a\n    exit: true\n---\nrules: []\n",
        ["rules.yaml:4: a second YAML document ('---'); put every rule in one"],
        id="second-document",
    ),
]


BAD_DOCUMENTS += [
    pytest.param(
        """rules:
  - name: lab-menu
    menu:
      title: Lab
      timeout: 10 parsecs
      default: nowhere
      colour: blue
      items:
        - {key: local, label: Local, exit: true, chain: "http://x/y"}
        - {key: local, label: Again, exit: true}
        - {label: No key, exit: true}
        - {key: c, label: C, exit: true, exit: 1}
  - name: m2
    menu:
      items:
        - {key: a, label: A, exit: true}
""",
        ["rules.yaml:5: rule 'lab-menu': menu timeout '10 parsecs' is not a duration (10s, 1500ms, 2m; 0 waits for a choice)",
         "rules.yaml:7: rule 'lab-menu': menu: unknown key 'colour' (expected one of: title, timeout, default, items)",
         "rules.yaml:9: rule 'lab-menu': menu item #1: two actions (exit and chain); an item has exactly one",
         "rules.yaml:10: rule 'lab-menu': menu item key 'local' already used by the item at line 9",
         "rules.yaml:11: rule 'lab-menu': menu item #3 has no 'key:'",
         "rules.yaml:12: rule 'lab-menu': menu item: key 'exit' given twice (first at line 12)",
         "rules.yaml:6: rule 'lab-menu': menu default 'nowhere' is not one of the items (local, c)",
         "rules.yaml:15: rule 'm2': menu needs 'default:' (the key of the item that runs when nobody chooses)"],
        id="menu-problems",
    ),
]


@pytest.mark.parametrize("text,expected", BAD_DOCUMENTS)
def test_every_problem_is_reported_at_once_with_file_and_line(text, expected):
    """A bad file raises RulesError whose problems are exactly these `file:line` messages."""
    assert problems(text) == expected


def test_yaml_syntax_errors_carry_their_line():
    """A YAML syntax error is one problem at the line where the parser stopped."""
    found = problems("rules:\n  - name: a\n    exit: true\n   - name: b\n")
    assert len(found) == 1 and found[0].startswith("rules.yaml:4: invalid YAML: ")


def test_load_rules_reports_unreadable_files_without_a_traceback(tmp_path):
    """A missing file, a directory, or a file that is not UTF-8 gives one clear line."""
    with pytest.raises(RulesError, match=r"missing.yaml: file not found"):
        load_rules(tmp_path / "missing.yaml")
    with pytest.raises(RulesError, match=r"is a directory"):
        load_rules(tmp_path)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"rules:\n  - name: \xff\xfe\n")
    with pytest.raises(RulesError, match=r"binary.yaml:2: not UTF-8 text"):
        load_rules(binary)


def test_anchors_and_aliases_are_followed():
    """A selector shared through a YAML anchor applies to every rule that refers to it."""
    ruleset = parse(
        """
        rules:
          - name: a
            match: &lab {mac: "00:11:22:33:44:55"}
            exit: true
          - name: b
            match: *lab
            chain: http://x/b
        """
    )
    assert ruleset.rules[0].selectors == ruleset.rules[1].selectors


def test_the_pure_python_yaml_parser_reads_the_same_rules(monkeypatch):
    """Without libyaml, PyYAML's own parser gives the same rules and the same errors."""
    import yaml

    from bootrules.rules import loader

    text = (ROOT / "rules.yaml").read_text()
    with_libyaml = parse_rules(text)
    monkeypatch.setattr(loader, "_YamlLoader", yaml.SafeLoader)
    assert parse_rules(text) == with_libyaml
    for param in BAD_DOCUMENTS:
        bad_text, expected = param.values
        assert problems(bad_text) == expected


def test_rules_without_match_and_empty_rule_list_are_valid():
    """`rules: []` serves nobody, and a rule with no `match` is a catch-all."""
    assert len(parse("rules: []\n")) == 0
    assert parse("rules:\n  - name: all\n    exit: 0\n").rules[0].selectors == ()
