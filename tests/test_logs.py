"""Log lines: one per decision, text or JSON, batched without changing a byte (bootrules/logs.py)."""

from __future__ import annotations

import io
import json
import logging
import re
import urllib.parse

import pytest

from app import create_app
from bootrules.logs import DECISION_MESSAGE, BatchingHandler, JsonFormatter, SecondCachingFormatter, escaped
from bootrules.services import services
from support import BootrulesServer, free_port, http_get



def test_json_logs_carry_one_object_per_line_with_the_decision_fields(rules_path, tmp_path, http_server):
    """--log-format json: every line is a JSON object; a decision has client, mac, rule, action."""
    with BootrulesServer(rules_path, free_port(), tmp_path / "server.log", args=(*http_server, "--log-format", "json")) as server:
        http_get(server.url + "/ipxe?mac=00-12-34-56-78-90")
    lines = [json.loads(line) for line in server.log().splitlines()]
    assert any(line["message"].startswith("serving 3 rules from") for line in lines)
    decision = next(line for line in lines if line.get("rule") == "lab-rescue")
    assert decision["client"] == "127.0.0.1" and decision["mac"] == "00:12:34:56:78:90" and decision["action"] == "chain"
    assert decision["level"] == "INFO" and decision["time"].endswith("Z")


@pytest.mark.parametrize("formatter", [SecondCachingFormatter(), JsonFormatter()], ids=["text", "json"])
def test_queued_decision_lines_read_as_logged_records_and_keep_their_order(formatter):
    """Decisions handed straight to the log handler are written exactly as the same
    records logged the ordinary way, in order (in one second, across seconds, at a second's
    last millisecond, a value JSON must escape), before any later line, and a warning flushes them."""
    stream = io.StringIO()
    handler = BatchingHandler(stream, interval=3600)
    handler.setFormatter(formatter)
    records = []
    for created in (1796601600.0, 1796601600.0005, 1796601600.9996, 1796601601.25, 1796601601.5, 1796601663.001):
        mac = escaped('x"\u00e9\\') if len(records) == 4 else f"00:12:34:56:78:{len(records):02x}"
        fields = ("10.0.0.7", mac, "lab-rescue", "chain")
        record = logging.LogRecord("bootrules", logging.INFO, __file__, 1, DECISION_MESSAGE, fields, None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        record.__dict__.update(zip(("client", "mac", "rule", "action"), fields))
        records.append(record)
        handler.queued.append((created, DECISION_MESSAGE, fields, ("client", "mac", "rule", "action")))
    handler.handle(logging.LogRecord("bootrules", logging.WARNING, __file__, 1, "reload failed", (), None))
    lines = stream.getvalue().splitlines()
    assert len(lines) == len(records) + 1 and "reload failed" in lines[-1]
    assert lines[:-1] == [formatter.format(record) for record in records]


LOGFMT_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


@pytest.mark.parametrize("hop", ["1.2.3.4 rule=FORGED action=sanboot", '1.2.3.4" rule="FORGED', "1.2.3.4\trule=X",
                                 "x\u2028rule=FORGED"])
def test_no_value_a_client_sends_can_forge_a_key_in_a_log_line(write_rules, hop, caplog):
    """A trusted proxy's malformed X-Forwarded-For hop, or a bad query value, is written quoted
    and escaped: a key=value parser finds no `rule` key in the line, whatever the value."""
    path = write_rules("rules:\n  - name: anyone\n    exit: true\n")
    app = create_app(str(path), trusted_proxies=["127.0.0.1"], poll_interval=0)
    client = app.test_client()
    with caplog.at_level("INFO", logger="bootrules"):
        client.get("/ipxe?mac=52:54:00:00:00:01", headers={"X-Forwarded-For": hop})
        client.get("/ipxe?mac=" + urllib.parse.quote(hop))
    lines = [record.getMessage() for record in caplog.records if "decision" not in record.getMessage()]
    suspicious = [line for line in lines if "not an IP address" in line or "bad request" in line]
    assert len(suspicious) == 2, lines
    for line in suspicious:
        keys = dict(LOGFMT_PAIR.findall(line))
        assert "rule" not in keys and "action" not in keys, line
        assert line.isprintable(), line
    services(app).stop()
