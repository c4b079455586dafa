"""The ``apikeys`` operator command (``apikeys --help``)."""

from apikeys_client.cli._main import cli, main

__all__ = ["cli", "main"]
