"""How the ``apikeys`` command shows things: aligned tables, local times, JSON documents."""

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import click
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from apikeys.v1 import api_key_pb2

STATE_COLOURS = {"ACTIVE": "green", "EXPIRED": "yellow", "REVOKED": "red"}
NONE = "-"


def as_dict(message: Message) -> dict[str, Any]:
    """The proto3 JSON mapping: field names are the proto's JSON names (``createTime``)."""
    return MessageToDict(message)


def emit_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2, sort_keys=False, ensure_ascii=False))


def is_set(stamp: Timestamp) -> bool:
    return bool(stamp.seconds or stamp.nanos)


def relative(delta: timedelta) -> str:
    """``3 min ago``, ``in 2 h``: coarse, for humans."""
    seconds = int(delta.total_seconds())
    future = seconds < 0
    seconds = abs(seconds)
    if seconds < 60:
        return "just now" if not future else "in under a minute"
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            amount = f"{seconds // size} {unit}"
            break
    return f"in {amount}" if future else f"{amount} ago"


def when(stamp: Timestamp, now: datetime | None = None) -> str:
    """A timestamp in local time with how long ago it was; ``-`` when unset."""
    if not is_set(stamp):
        return NONE
    moment = stamp.ToDatetime(tzinfo=UTC)
    now = now or datetime.now(UTC)
    local = moment.astimezone()
    return f"{local:%Y-%m-%d %H:%M:%S %Z} ({relative(now - moment)})"


def state(key: api_key_pb2.ApiKey) -> str:
    name = api_key_pb2.KeyState.Name(key.state).removeprefix("KEY_STATE_")
    # click.echo drops the colour when stdout is not a terminal.
    return click.style(name, fg=STATE_COLOURS.get(name))


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns aligned on the text as shown (colour codes take no width)."""
    lines = [list(headers), *(list(row) for row in rows)]
    widths = [max(len(click.unstyle(line[i])) for line in lines) for i in range(len(headers))]
    out = []
    for line in lines:
        cells = [
            cell + " " * (width - len(click.unstyle(cell)))
            for cell, width in zip(line, widths, strict=True)
        ]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def fields(pairs: Iterable[tuple[str, str]]) -> str:
    """``name:  value`` lines, the values aligned."""
    pairs = list(pairs)
    width = max(len(name) for name, _ in pairs) + 1
    return "\n".join(f"{name + ':':<{width}} {value}" for name, value in pairs)
