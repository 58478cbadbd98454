"""Log lines: one per decision, text or JSON, batched without changing a byte (bootrules/logs.py)."""

from __future__ import annotations

import io
import json
import logging

import pytest

from bootrules.logs import DECISION_MESSAGE, BatchingHandler, JsonFormatter, SecondCachingFormatter
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
    """A decision handed straight to the log handler is written exactly as the same
    record logged the ordinary way, before any later line, and a warning flushes it."""
    fields = ("10.0.0.7", "00:12:34:56:78:90", "lab-rescue", "chain")
    record = logging.LogRecord("bootrules", logging.INFO, __file__, 1, DECISION_MESSAGE, fields, None)
    record.__dict__.update(zip(("client", "mac", "rule", "action"), fields))
    stream = io.StringIO()
    handler = BatchingHandler(stream, interval=3600)
    handler.setFormatter(formatter)
    handler.queued.append((record.created, DECISION_MESSAGE, fields, ("client", "mac", "rule", "action")))
    handler.handle(logging.LogRecord("bootrules", logging.WARNING, __file__, 1, "reload failed", (), None))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "reload failed" in lines[1]
    assert lines[0] == formatter.format(record)
