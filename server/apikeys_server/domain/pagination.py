"""Opaque page tokens (AIP-158): a position in a newest-first listing, bound to its query."""

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from apikeys_server.domain.errors import InvalidArgument

DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 1000
MAX_TOKEN_LENGTH: Final = 1024


@dataclass(frozen=True, slots=True)
class Cursor:
    """The last item of a page: the next page starts strictly after it (time desc, id desc)."""

    time: datetime
    id: str


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument(
            "page_size must not be negative", reason="NEGATIVE_PAGE_SIZE", field="page_size"
        )
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def encode(cursor: Cursor, query: str) -> str:
    payload = {"q": query, "t": cursor.time.isoformat(), "i": cursor.id}
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str, query: str) -> Cursor | None:
    """None for the first page; INVALID_ARGUMENT for a forged token or one from another query."""
    if not token:
        return None
    invalid = InvalidArgument(
        "page_token is not a token returned by this listing",
        reason="INVALID_PAGE_TOKEN",
        field="page_token",
    )
    if len(token) > MAX_TOKEN_LENGTH:
        raise invalid
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw)
        time = datetime.fromisoformat(payload["t"])
        cursor = Cursor(time, payload["i"])
        stored_query = payload["q"]
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise invalid from None
    if not isinstance(cursor.id, str) or time.tzinfo is None:
        raise invalid
    if stored_query != query:
        raise InvalidArgument(
            "page_token belongs to a listing with other filters; "
            "keep tenant_id and filters unchanged between pages",
            reason="PAGE_TOKEN_FILTERS_CHANGED",
            field="page_token",
        )
    return cursor
