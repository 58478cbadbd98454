"""Templates in rules (bootrules/rules/templates.py, decide/templating.py): compiled when the rules
load, every problem a file:line; rendered per machine within bounds; a value that cannot go
into a script gives the rule's failure path, never pasted raw."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from app import cli, create_app
from bootrules.errors import RulesError
from bootrules.rules.loader import load_rules
from bootrules.services import services

CSV = "mac,hostname,disk,root_password_hash\n52:54:00:00:00:01,web-01,/dev/vda,$6$salt$HASHVALUE\n" \
      "52:54:00:00:00:02,web 02,,\n"


def write(tmp_path: Path, args: str, extra: str = "", csv: str = CSV, files: dict[str, str] | None = None) -> Path:
    (tmp_path / "inventory.csv").write_text(csv)
    for name, text in (files or {}).items():
        (tmp_path / "templates").mkdir(exist_ok=True)
        (tmp_path / "templates" / name).write_text(text)
    path = tmp_path / "rules.yaml"
    path.write_text(f"""inventory: inventory.csv
rules:
  - name: install
    match: {{mac: "52:54:00:*"}}
    vars: {{disk: /dev/sda, suite: bookworm}}
{extra}    boot:
      kernel: http://mirror.example.com/debian/{{{{ suite }}}}/linux
      args: {args}
  - name: rest
    exit: true
""")
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(RulesError) as error:
        load_rules(path)
    return list(error.value.problems)


@pytest.mark.parametrize("args, problem", [
    ("hostname={{ hostname", "boot args: template: unexpected end of template, expected 'end of print statement'."),
    ("x={{ ''.__class__ }}", "boot args: template: '__class__' is not an attribute a template may use"),
    ("x={{ cycler }}", "boot args: variable 'cycler' has no source: no fact a machine sends, no var of the rule, no "
                       "column of the inventory, and not one of bootrules' own"),
    ("x={{ hostnme }}", "boot args: variable 'hostnme' has no source: no fact a machine sends, no var of the rule, "
                        "no column of the inventory, and not one of bootrules' own (did you mean 'hostname'?)"),
    ("x={{ done }}", "boot args: variable 'done' is one of bootrules' own, which this rule has not: done only with "
                     "once:, files only with files:"),
    ("x={% include 'preseed.cfg' %}", "boot args: template: only files (files:) may include other templates"),
])
def test_a_template_that_cannot_work_is_a_file_line_error(tmp_path, args, problem):
    """A syntax error, Python's internals, a variable no source gives (the rule has no once:, so
    no done URL), an include in a rule's value: errors at load time, with the line."""
    path = write(tmp_path, args)
    assert problems(path) == [f"{path}:8: rule 'install': {problem}"]


def test_a_served_file_is_checked_with_its_own_name_and_line(tmp_path):
    """A served file with a syntax error, or an include outside the templates folder, is an
    error naming the file and its line; a file that is not there names the rule's files:."""
    files = {"a.cfg": "ok {{ hostname }}\nbad {{ \n", "b.cfg": "{% include '../rules.yaml' %}\n"}
    path = write(tmp_path, "x=1", extra="    files: [a.cfg, b.cfg, c.cfg]\n", files=files)
    assert problems(path) == [
        "templates/a.cfg:2: template: unexpected 'end of template'",
        "templates/b.cfg:1: template: '../rules.yaml' is outside the templates folder",
        f"{path}:6: rule 'install': files: 'c.cfg' is not in the templates folder ({tmp_path}/templates)",
    ]


def test_a_variable_some_rows_lack_is_a_check_warning_naming_them(tmp_path, runner):
    """`check` warns when a variable only the inventory gives is missing from rows the rule matches."""
    path = write(tmp_path, "root={{ root_password_hash }}")
    result = runner.invoke(cli, ["check", str(path)])
    assert result.exit_code == 0
    assert (f"{path}:3: warning: rule 'install': variable 'root_password_hash' is given by the inventory only, and "
            "the inventory rows inventory.csv:3 and machines not in the inventory (the rule does not match on a "
            "column) lack it: those machines get the rule's failure path") in result.output


def test_a_value_the_script_cannot_take_is_a_check_warning_naming_its_rows(tmp_path, runner):
    """`check` warns about a row value or a `vars:` default that rendering would refuse (the
    machines that get it take the failure path), naming the rows but never the value; a value
    with spaces where words may go (a `set:` value) is no warning."""
    csv = CSV + "52:54:00:00:00:03,web'03,/dev/vdb,\n52:54:00:00:00:04,web 04,/dev/vdb,\n"
    path = write(tmp_path, "hostname={{ hostname }} disk={{ disk }}", csv=csv,
                 extra="    set: {motd: 'welcome to {{ hostname }}'}\n")
    path.write_text(path.read_text().replace("disk: /dev/sda", "disk: \"/dev/sda ${secret}\""))
    result = runner.invoke(cli, ["check", str(path)])
    assert result.exit_code == 0, result.output
    warned = [line for line in result.output.splitlines() if ": warning: " in line]
    assert warned == [
        f"{path}:3: warning: rule 'install': vars: 'disk' holds a space, which the script cannot take: the "
        "machines no inventory row gives 'disk' get the rule's failure path",
        f"{path}:3: warning: rule 'install': in the inventory rows inventory.csv:3, inventory.csv:5, variable "
        "'hostname' holds a space, which the script cannot take: those machines get the rule's failure path",
        f"{path}:3: warning: rule 'install': in the inventory rows inventory.csv:4, variable 'hostname' holds a "
        "quote, which the script cannot take: those machines get the rule's failure path",
    ]
    assert "secret" not in result.output and "web'03" not in result.output
    # What check warned of is what those machines get; a row that gives its own disk does not.
    app = create_app(str(path), poll_interval=0)
    try:
        client = app.test_client()
        for mac, problem in (("04", "'hostname' holds a space"), ("03", "'hostname' holds a quote"),
                             ("09", "'disk' holds a space")):
            script = client.get(f"/ipxe?mac=52:54:00:00:00:{mac}&hostname=web-{mac}").get_data(as_text=True)
            assert f"variable {problem} (boot args)" in script
        fine = client.get("/ipxe?mac=52:54:00:00:00:01").get_data(as_text=True)
        assert "hostname=web-01 disk=/dev/vda" in fine
    finally:
        services(app).stop()


@pytest.fixture
def served(tmp_path):
    made = []

    def serve(args: str, **options):
        app = create_app(str(write(tmp_path, args, **options)), poll_interval=0)
        made.append(app)
        return app.test_client()

    yield serve
    for app in made:
        services(app).stop()


def test_variables_come_from_bootrules_then_the_inventory_then_vars_then_facts(served):
    """Precedence: bootrules' own, the machine's inventory row, the rule's vars, what it sent."""
    client = served("rule={{ rule }} disk={{ disk }} suite={{ suite }} platform={{ platform }} base={{ base }}")
    script = client.get("/ipxe?mac=52:54:00:00:00:01&platform=efi").get_data(as_text=True)
    assert "kernel http://mirror.example.com/debian/bookworm/linux rule=install disk=/dev/vda suite=bookworm " \
           "platform=efi base=http://localhost" in script
    other = client.get("/ipxe?mac=52:54:00:00:00:09&platform=pcbios").get_data(as_text=True)
    assert "disk=/dev/sda" in other  # not in the inventory: the rule's default


@pytest.mark.parametrize("query, variable, problem", [
    ("mac=52:54:00:00:00:02", "hostname", "holds a space"),  # an inventory value with a space
    ("mac=52:54:00:00:00:03&hostname=a%20b", "hostname", "holds a space"),
    ("mac=52:54:00:00:00:03&hostname_hex=" + "x\nkernel http://evil/".encode().hex(), "hostname",
     "holds a line break or a control character"),
    ("mac=52:54:00:00:00:03&hostname=%24%7Bpassword%7D", "hostname", "holds an iPXE setting expansion"),
    ("mac=52:54:00:00:00:03&hostname=a||goto", "hostname", "holds a command separator"),
])
def test_a_value_that_cannot_go_into_the_script_gives_the_failure_path(served, query, variable, problem, caplog):
    """A hostile or broken value is never pasted: the script says which rule and variable, and
    leaves iPXE; a log line and a metric count it; the value itself is nowhere."""
    client = served("hostname={{ hostname }}")
    with caplog.at_level("WARNING", logger="bootrules"):
        response = client.get(f"/ipxe?{query}")
    script = response.get_data(as_text=True)
    assert response.status_code == 200 and response.headers["X-Bootrules-Rule"] == "install"
    assert script.splitlines()[2:] == [
        f"echo bootrules: rule 'install': variable '{variable}' {problem} (boot args); falling back to the next "
        "boot device", "exit 1"]
    assert "kernel" not in script and "evil" not in script and "password" not in script
    assert any("template: rule install cannot be rendered" in record.getMessage() for record in caplog.records)
    assert "bootrules_template_failures_total 1.0" in client.get("/metrics").get_data(as_text=True)


@pytest.mark.parametrize("args", [
    "x={% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "x={% for i in range(1000000000) %}{% endfor %}",
    "x={{ 'y' * 1000000000 }}",
    "x={% for i in range(100000) %}{{ i }}{% endfor %}",
    "x={% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "x={{ 7 ** 1000000 }}",
])
def test_a_template_that_runs_away_is_stopped_and_takes_the_failure_path(served, args):
    """Loops, repetitions, output, recursion and arithmetic are bounded: a template that would
    run for ever or fill memory is stopped within a moment, and the rule takes its failure path."""
    client = served(args)
    started = time.monotonic()
    script = client.get("/ipxe?mac=52:54:00:00:00:01").get_data(as_text=True)
    assert time.monotonic() - started < 2
    assert script.endswith("falling back to the next boot device\nexit 1\n") and "kernel" not in script


def test_secret_columns_stay_out_of_logs_health_metrics_pages_and_the_api(served, caplog, tmp_path):
    """A secret column's value reaches the machine's script (it needs it) and nothing else."""
    client = served("root={{ root_password_hash }}")
    with caplog.at_level("INFO", logger="bootrules"):
        script = client.get("/ipxe?mac=52:54:00:00:00:01").get_data(as_text=True)
        client.get("/ipxe?mac=52:54:00:00:00:02")  # lacks it: the failure path, logged
    assert "root=$6$salt$HASHVALUE" in script
    services(client.application).recorder.flush()
    seen = [record.getMessage() for record in caplog.records]
    pages = [client.get(path).get_data(as_text=True) for path in
             ("/healthz", "/metrics", "/ui/", "/ui/machines", "/ui/machines/mac:52:54:00:00:00:01",
              "/api/machines", "/api/machines/mac:52:54:00:00:00:01", "/ui/expected", "/api/expected")]
    for text in [*seen, *pages]:
        assert "HASHVALUE" not in text
    assert "root_password_hash" in pages[4] and "********" in pages[4]  # shown masked on the machine's page
