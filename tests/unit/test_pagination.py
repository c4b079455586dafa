"""Page sizes and opaque page tokens bound to their query (AIP-158)."""

import base64
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apikeys_server.domain.errors import InvalidArgument
from apikeys_server.domain.pagination import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    MAX_TOKEN_LENGTH,
    Cursor,
    decode,
    encode,
    page_size,
)

QUERY = "tenant=acme;revoked=0"
CURSOR = Cursor(datetime(2025, 6, 1, 12, 0, 0, 123456, tzinfo=UTC), "key_abc123")


def token_of(payload: object) -> str:
    raw = json.dumps(payload).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


class TestPageSize:
    def test_negative_is_invalid(self) -> None:
        """A negative page_size is INVALID_ARGUMENT."""
        with pytest.raises(InvalidArgument, match="page_size"):
            page_size(-1)

    def test_zero_means_default(self) -> None:
        """page_size 0 means the default of 50."""
        assert page_size(0) == DEFAULT_PAGE_SIZE == 50

    @pytest.mark.parametrize("requested", [1, 7, 50, 999, 1000])
    def test_within_bounds_is_kept(self, requested: int) -> None:
        """A size between 1 and the maximum is used as asked."""
        assert page_size(requested) == requested

    @pytest.mark.parametrize("requested", [1001, 10**6, 2**31 - 1])
    def test_above_maximum_is_capped(self, requested: int) -> None:
        """A size above 1000 is capped to 1000, not refused."""
        assert page_size(requested) == MAX_PAGE_SIZE == 1000


class TestTokens:
    def test_empty_token_is_first_page(self) -> None:
        """An empty page_token means the first page."""
        assert decode("", QUERY) is None

    def test_round_trip(self) -> None:
        """A token decodes to the cursor it was made from, with microseconds and timezone."""
        assert decode(encode(CURSOR, QUERY), QUERY) == CURSOR

    def test_round_trip_other_offset(self) -> None:
        """A cursor with a non-UTC offset decodes to the same instant."""
        cursor = Cursor(datetime(2025, 1, 1, tzinfo=timezone(timedelta(hours=2))), "key_x")
        decoded = decode(encode(cursor, QUERY), QUERY)
        assert decoded is not None
        assert decoded.time == cursor.time

    def test_token_is_url_safe_and_opaque(self) -> None:
        """Tokens use the URL-safe alphabet without padding."""
        token = encode(CURSOR, QUERY)
        assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")

    def test_token_from_other_query_is_invalid(self) -> None:
        """A token made for other filters is INVALID_ARGUMENT telling to keep filters unchanged."""
        token = encode(CURSOR, QUERY)
        with pytest.raises(InvalidArgument, match="other filters"):
            decode(token, "tenant=globex;revoked=0")

    @pytest.mark.parametrize(
        "token",
        [
            "garbage",
            "!!!!",
            "====",
            "a",
            "é" * 8,
            "\x00\x00\x00\x00",
            "A" * (MAX_TOKEN_LENGTH + 1),
            "A" * 1_000_000,
            base64.urlsafe_b64encode(b"\xff\xfe\xfd\xfc").decode(),
            token_of([1, 2, 3]),
            token_of("text"),
            token_of(None),
            token_of(42),
            token_of({}),
            token_of({"q": QUERY, "t": "2025-06-01T12:00:00+00:00"}),
            token_of({"q": QUERY, "i": "key_x"}),
            token_of({"t": "2025-06-01T12:00:00+00:00", "i": "key_x"}),
            token_of({"q": QUERY, "t": "yesterday", "i": "key_x"}),
            token_of({"q": QUERY, "t": 1717243200, "i": "key_x"}),
            token_of({"q": QUERY, "t": "2025-06-01T12:00:00", "i": "key_x"}),
            token_of({"q": QUERY, "t": "2025-06-01T12:00:00+00:00", "i": 5}),
            token_of({"q": QUERY, "t": "2025-06-01T12:00:00+00:00", "i": None}),
        ],
        ids=lambda t: repr(t[:40]),
    )
    def test_forged_tokens_are_invalid(self, token: str) -> None:
        """Garbage, non-base64, non-JSON, wrong shape, naive time and huge tokens are refused."""
        with pytest.raises(InvalidArgument, match="page_token"):
            decode(token, QUERY)

    def test_truncated_token_is_invalid(self) -> None:
        """Any truncation of a real token is refused, never decoded to another cursor."""
        token = encode(CURSOR, QUERY)
        for length in range(1, len(token)):
            with pytest.raises(InvalidArgument):
                decode(token[:length], QUERY)

    def test_tampered_query_in_token_is_invalid(self) -> None:
        """Editing the query inside a token does not let it through for another query."""
        payload = {"q": "tenant=globex;revoked=0", "t": CURSOR.time.isoformat(), "i": CURSOR.id}
        with pytest.raises(InvalidArgument):
            decode(token_of(payload), QUERY)

    @settings(deadline=None)  # a loaded CI machine must not turn slowness into failure
    @given(st.text(max_size=200))
    def test_arbitrary_text_is_refused_cleanly(self, token: str) -> None:
        """Any text is either the first page, a cursor, or INVALID_ARGUMENT, never a crash."""
        try:
            result = decode(token, QUERY)
        except InvalidArgument:
            return
        assert result is None or isinstance(result, Cursor)

    @settings(deadline=None)  # a loaded CI machine must not turn slowness into failure
    @given(st.binary(max_size=200))
    def test_arbitrary_bytes_behind_base64_are_refused_cleanly(self, raw: bytes) -> None:
        """Any base64-wrapped bytes decode or raise INVALID_ARGUMENT, never anything else."""
        token = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        try:
            result = decode(token, QUERY)
        except InvalidArgument:
            return
        assert result is None or isinstance(result, Cursor)
