"""Server-side sessions: the browser holds only a random id in an HttpOnly, SameSite=Strict
cookie (Secure over HTTPS); the operator's key and its client stay here, in memory.

A restart of the console signs everyone out, which is what an admin page should do anyway.
Every visitor gets a session, signed in or not, so the sign-in form has a CSRF token too;
signing in issues a new id (no session fixation) and a new CSRF token.
"""

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from apikeys_client import ApiKeysClient

COOKIE_NAME = "apikeys_console"
# Sessions kept at most; past it the least recently used go first (a flood of anonymous
# visitors cannot grow memory without bound, nor push out a signed-in operator for long).
MAX_SESSIONS = 10_000


def _token() -> str:
    return secrets.token_urlsafe(32)


@dataclass(eq=False)
class Session:
    id: str
    csrf_token: str
    last_seen: float
    # The signed-in operator's client (it holds the key as its x-api-key); None: anonymous.
    client: ApiKeysClient | None = field(default=None, repr=False)
    is_platform: bool = False
    # The tenant worked on: the key's own, or the one a platform key picked ("" not yet).
    tenant: str = ""
    # A one-time notice for the next page (e.g. "signed out after 15 minutes idle").
    notice: str = ""

    @property
    def signed_in(self) -> bool:
        return self.client is not None


class SessionStore:
    """Sessions by id, forgotten ``idle_seconds`` after their last request."""

    def __init__(self, idle_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._idle = idle_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def get(self, session_id: str | None) -> tuple[Session | None, bool]:
        """The live session of this id, its idle clock restarted, and whether one of that id
        had just expired (to tell the operator why they are signed out)."""
        if not session_id:
            return None, False
        now = self._clock()
        with self._lock:
            expired = self._prune(now, keep=session_id)
            session = self._sessions.get(session_id)
            if session is None:
                return None, session_id in expired
            session.last_seen = now
            self._sessions.move_to_end(session_id)
            return session, False

    def new(self) -> Session:
        session = Session(_token(), _token(), self._clock())
        with self._lock:
            self._sessions[session.id] = session
            while len(self._sessions) > MAX_SESSIONS:
                _, oldest = self._sessions.popitem(last=False)
                _close(oldest)
        return session

    def sign_in(
        self, old: Session, client: ApiKeysClient, *, is_platform: bool, tenant: str
    ) -> Session:
        """A new session (new id, new CSRF token) for the operator; the old one is dropped."""
        self.drop(old)
        session = self.new()
        session.client, session.is_platform, session.tenant = client, is_platform, tenant
        return session

    def drop(self, session: Session) -> None:
        with self._lock:
            self._sessions.pop(session.id, None)
        _close(session)

    def close(self) -> None:
        with self._lock:
            dropped = list(self._sessions.values())
            self._sessions.clear()
        for session in dropped:
            _close(session)

    def _prune(self, now: float, keep: str) -> set[str]:
        """Drops idle sessions (oldest first, so it stops at the first live one)."""
        expired: set[str] = set()
        while self._sessions:
            session_id, session = next(iter(self._sessions.items()))
            if now - session.last_seen <= self._idle:
                break
            del self._sessions[session_id]
            _close(session)
            expired.add(session_id)
        kept = self._sessions.get(keep)
        if kept is not None and now - kept.last_seen > self._idle:
            del self._sessions[keep]
            _close(kept)
            expired.add(keep)
        return expired

    def __len__(self) -> int:
        return len(self._sessions)


def _close(session: Session) -> None:
    if session.client is not None:
        session.client.close()
        session.client = None
