"""The JSON formatter and the refused-caller rate limit (logs.py)."""

import json
import logging

import pytest

from apikeys_server.logs import JsonFormatter, RefusedCallers


class FakeTimer:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_json_line_has_the_event_fields() -> None:
    record = logging.LogRecord(
        "apikeys_server.audit", logging.INFO, __file__, 1, "key %s", ("x",), None
    )
    record.fields = {"event": "key_created", "key_id": "key_1"}
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "key x"
    assert entry["level"] == "INFO"
    assert entry["event"] == "key_created"
    assert entry["key_id"] == "key_1"


def test_refusals_beyond_the_burst_are_one_summary(caplog: pytest.LogCaptureFixture) -> None:
    timer = FakeTimer()
    refusals = RefusedCallers(interval=10.0, burst=3, timer=timer)
    with caplog.at_level(logging.WARNING, logger="apikeys_server.refused"):
        for _ in range(1000):
            refusals.refused("ListScopes", "UNAUTHENTICATED", "CALLER_KEY_NOT_KNOWN")
        assert len(caplog.records) == 3
        timer.now = 10.5
        refusals.refused("ListScopes", "UNAUTHENTICATED", "CALLER_KEY_NOT_KNOWN")
    messages = [record.getMessage() for record in caplog.records]
    assert messages[3] == "1000 refused callers in the last 10 s (997 not logged one by one)"
    assert messages[4].startswith("refused caller: ListScopes UNAUTHENTICATED")
    assert len(messages) == 5


def test_a_quiet_interval_has_no_summary(caplog: pytest.LogCaptureFixture) -> None:
    timer = FakeTimer()
    refusals = RefusedCallers(interval=10.0, burst=3, timer=timer)
    with caplog.at_level(logging.WARNING, logger="apikeys_server.refused"):
        refusals.refused("GetKey", "PERMISSION_DENIED", "SCOPE_MISSING")
        timer.now = 20.0
        refusals.flush()
    assert len(caplog.records) == 1
