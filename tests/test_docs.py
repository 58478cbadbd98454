"""The manual tells the truth: every example in README.md and docs/ is run here, and the parts
that mirror the code (the settings table, the tree of modules) are held equal to it."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest
import yaml

from bootrules.rules.loader import parse_rules
from bootrules.settings import settings_table
from support import ROOT, BootrulesServer, free_port

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(kind: str) -> list[tuple[str, str]]:
    """Every fenced block of `kind` in the manual, as (page, text)."""
    found = []
    for page in PAGES:
        for text in re.findall(rf"```{kind}\n(.*?)```", page.read_text(), re.S):
            found.append((page.name, text))
    return found


def rules_examples() -> list[tuple[str, str]]:
    """Every YAML block that holds rules (a fragment of rules gets a `rules:` header)."""
    examples = []
    for page, block in blocks("yaml"):
        if block.lstrip().startswith("rules:"):
            examples.append((page, block))
        elif block.lstrip().startswith("- name:"):
            examples.append((page, "rules:\n" + block))
    return examples


def example_files_quoted() -> list[tuple[str, str, str]]:
    """Every block that quotes a file of docs/example (its first line names it): (page, path, text)."""
    found = []
    for page, kind in [(page, kind) for page in ("inventory.md",) for kind in ("yaml", "")]:
        for text in re.findall(rf"^ *```{kind}\n( *# docs/example/\S+\n.*?) *```", (ROOT / "docs" / page).read_text(),
                               re.S | re.M):
            first, _, rest = textwrap.dedent(text).partition("\n")
            found.append((page, first[2:], rest))
    return found


def test_every_rules_example_in_the_manual_passes_the_schema_and_the_loader():
    """A rules example that the loader or the editors' schema would refuse is a broken manual."""
    import json

    import jsonschema

    schema = json.loads((ROOT / "contrib" / "rules.schema.json").read_text())
    examples = rules_examples()
    assert len(examples) >= 5
    for page, text in examples:
        assert list(jsonschema.Draft7Validator(schema).iter_errors(yaml.safe_load(text))) == [], (page, text)
        parse_rules(text, page, str(ROOT / "docs" / "example"))


def test_what_the_manual_quotes_of_the_example_files_is_in_them():
    """A block that quotes a file of docs/example quotes it truly: its lines are in the file, in order."""
    quoted = example_files_quoted()
    assert len(quoted) >= 3
    for page, path, text in quoted:
        lines = (ROOT / path).read_text().splitlines()
        position = 0
        for line in text.strip("\n").splitlines():
            assert line in lines[position:], (page, path, line)
            position = lines.index(line, position) + 1


def test_the_settings_table_is_the_one_list_of_settings():
    """docs/operations.md's table is what bootrules.settings writes, row for row."""
    page = (ROOT / "docs" / "operations.md").read_text()
    table = re.search(r"<!-- settings table[^>]*-->\n(.*?)\n<!-- /settings table -->", page, re.S).group(1)
    assert table == settings_table()


def test_the_architecture_page_lists_every_module_and_only_those():
    """The tree in docs/architecture.md names each module of bootrules/, in its wing."""
    page = (ROOT / "docs" / "architecture.md").read_text()
    tree = re.search(r"<!-- tree:[^>]*-->\n```\n(.*?)```", page, re.S).group(1)
    listed, wing = set(), ""
    for line in tree.splitlines():
        name = line.split()[0]
        depth = (len(line) - len(line.lstrip())) // 2
        if name.endswith("/"):
            wing = name if depth == 1 else wing
            continue
        if depth == 1:
            wing = ""
        if depth >= 1:
            listed.add(f"bootrules/{wing}{name}")
    actual = {str(path.relative_to(ROOT)) for path in (ROOT / "bootrules").rglob("*.py")
              if path.name != "__init__.py" or path.parent.name == "state"}
    assert listed == actual


# --------------------------------------------------------------------------- console examples

# The files a console example reads, beside the bundled rules.yaml.
EXAMPLE_FILES = {
    "check rules.yaml": {"rules.yaml": """
        rules:
          - name: lab
            match: {mack: "00:11:22:33:44:55"}
            exit: true
          - name: db
            match:
              mac: "00:11:22:33:44"
            chain: http://pxe.example.com/db.ipxe
            exit: true
        """},
    "check lab-rules.yaml": {"lab-rules.yaml": """
        rules:
          - name: vmware-guests
            match: {mac: "00:0c:29:*"}
            chain: http://boot.example.com/vmware.ipxe
          - name: build-01
            match: {mac: "00:0c:29:12:34:56"}
            chain: http://pxe.example.com/build.ipxe
          - name: rack
            match: {ip: 10.0.0.0/8}
            exit: true
        """},
}


def console_examples() -> list[tuple[str, str, str]]:
    """Each command of a console block with the output the manual shows for it."""
    examples = []
    for page, block in blocks("console"):
        for command, output in re.findall(r"^\$ (.*)\n((?:(?!\$ ).*\n)*)", block, re.M):
            examples.append((page, command, output))
    return examples


def matches(shown: str, actual: str) -> bool:
    """The output as the manual shows it: `…` ends what it shows, a Date header may differ."""
    shown_lines, actual_lines = shown.rstrip("\n").splitlines(), actual.rstrip("\n").splitlines()
    for number, line in enumerate(shown_lines):
        if line == "…":
            return True
        if number >= len(actual_lines):
            return False
        if line.startswith("Date: ") and actual_lines[number].startswith("Date: "):
            continue
        if line != actual_lines[number]:
            return False
    return len(shown_lines) == len(actual_lines)


@pytest.mark.parametrize("page, command, output", console_examples(), ids=lambda value: str(value)[:40])
def test_every_console_example_prints_what_the_manual_shows(tmp_path, page, command, output):
    """The command is run as written (python app.py in a directory holding the files it names,
    curl against a real server on the bundled rules.yaml); it prints exactly what is shown."""
    (tmp_path / "rules.yaml").write_text((ROOT / "rules.yaml").read_text())
    shutil.copytree(ROOT / "docs" / "example", tmp_path / "docs" / "example")
    for key, files in EXAMPLE_FILES.items():
        if key in command:
            for name, text in files.items():
                (tmp_path / name).write_text(textwrap.dedent(text).lstrip())
    words = shlex.split(command)
    if words[0] == "curl":
        with BootrulesServer(tmp_path / "rules.yaml", free_port(), tmp_path / "server.log") as server:
            words = [word.replace("http://127.0.0.1:8080", server.url) for word in words]
            done = subprocess.run(words, capture_output=True, text=True, timeout=30)
        actual = done.stdout.replace("\r\n", "\n")
    else:
        assert words[:2] == [".venv/bin/python", "app.py"], command
        done = subprocess.run([sys.executable, str(ROOT / "app.py"), *words[2:]], capture_output=True, text=True,
                              cwd=tmp_path, timeout=60)
        actual = done.stderr + done.stdout
    assert matches(output, actual), f"{page}: $ {command}\n--- shown\n{output}--- printed\n{actual}"
