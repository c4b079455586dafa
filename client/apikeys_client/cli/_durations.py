"""Durations on the command line: ``90s``, ``10m``, ``24h``, ``7d``, ``1h30m``."""

import re
from datetime import timedelta
from typing import Any

import click

_PART = re.compile(r"(\d+)(d|h|m|s)")
_UNITS = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}


def parse_duration(text: str) -> timedelta:
    text = text.strip()
    if not text or _PART.sub("", text):
        raise ValueError(f"{text!r} is not a duration like 90s, 10m, 24h, 7d or 1h30m")
    total = timedelta()
    for amount, unit in _PART.findall(text):
        total += timedelta(**{_UNITS[unit]: int(amount)})
    return total


class Duration(click.ParamType):  # type: ignore[type-arg]  # generic only in newer click
    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as error:
            self.fail(str(error), param, ctx)


DURATION = Duration()
