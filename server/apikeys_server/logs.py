"""Log set-up (``--log-format text|json``) and the server's two kinds of event lines.

JSON lines come from a small ``logging.Formatter`` over the standard library: one object per
line with ``time``, ``level``, ``logger``, ``message``, ``pid`` and the event's own fields
(passed as ``extra={"fields": {...}}``). Nothing here ever receives a secret or a digest: the
events carry key ids, tenants, method names and reasons only.

* ``audit``: one line per management action that changed something (who = the caller's key
  id, what, tenant, key id), written by the KeyManager servicer.
* ``RefusedCallers``: one line per refused caller (UNAUTHENTICATED / PERMISSION_DENIED), at
  most ``burst`` an interval; past that, a brute force of unknown keys is a count, logged as
  one summary line when the interval is over ("1234 refused callers in the last 10 s").
"""

import json
import logging
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any, Final

from apikeys_server.config import Settings

AUDIT: Final = logging.getLogger("apikeys_server.audit")
REFUSALS: Final = logging.getLogger("apikeys_server.refused")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; an exception's traceback goes in ``exception``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure(settings: Settings) -> None:
    """The root logger, as ``--log-level`` and ``--log-format`` say, to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format.lower() == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())


def audit(action: str, caller_key_id: str, tenant_id: str, key_id: str, **more: str) -> None:
    """One management action, done."""
    fields = {
        "event": "key_" + action,
        "caller_key_id": caller_key_id,
        "tenant_id": tenant_id,
        "key_id": key_id,
        **more,
    }
    extra = "".join(f" {name}={value}" for name, value in more.items())
    AUDIT.info(
        "key %s: %s in tenant %s by %s%s",
        action,
        key_id,
        tenant_id,
        caller_key_id,
        extra,
        extra={"fields": fields},
    )


class RefusedCallers:
    """Refused callers, logged one by one up to ``burst`` per ``interval``, then counted."""

    def __init__(self, interval: float = 10.0, burst: int = 5, timer: Any = time.monotonic) -> None:
        self._interval = interval
        self.burst = burst
        self._timer = timer
        self._lock = threading.Lock()
        self._started = timer()
        self._count = 0

    def refused(self, method: str, code: str, reason: str) -> None:
        now = self._timer()
        with self._lock:
            if now - self._started >= self._interval:
                self._summarise(now)
            self._count += 1
            if self._count > self.burst:
                return
        REFUSALS.warning(
            "refused caller: %s %s (%s)",
            method,
            code,
            reason,
            extra={
                "fields": {
                    "event": "caller_refused",
                    "method": method,
                    "code": code,
                    "reason": reason,
                }
            },
        )

    def flush(self) -> None:
        """Logs the summary of the interval under way, if it has one (at shutdown)."""
        with self._lock:
            self._summarise(self._timer())

    def _summarise(self, now: float) -> None:
        """Under the lock: ends the interval, with a summary when some went unlogged."""
        if self._count > self.burst:
            seconds = now - self._started
            REFUSALS.warning(
                "%d refused callers in the last %.0f s (%d not logged one by one)",
                self._count,
                seconds,
                self._count - self.burst,
                extra={
                    "fields": {
                        "event": "callers_refused_summary",
                        "refused": self._count,
                        "logged": self.burst,
                        "seconds": round(seconds, 1),
                    }
                },
            )
        self._started = now
        self._count = 0


REFUSED_CALLERS: Final = RefusedCallers()
