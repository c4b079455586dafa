"""CSRF: a per-session token (the synchronizer-token pattern) in every form, checked on every
POST before anything else runs. SameSite=Strict on the session cookie already keeps other
sites' requests from carrying it; the token is the second, independent line."""

import secrets

FIELD = "csrf_token"
HEADER = "x-csrf-token"  # htmx requests may send it as a header instead


def valid(expected: str, given: str | None) -> bool:
    return bool(expected) and given is not None and secrets.compare_digest(expected, given)
