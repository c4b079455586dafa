"""The key format: ``{prefix}_{32 base62 random}{6 base62 CRC32 of what precedes}``.

The GitHub scheme: the prefix lets secret scanners find leaked keys and keeps environments
apart (``wc_live`` keys never verify on a ``wc_test`` deployment), and the checksum rejects
typos and garbage without a lookup.
"""

import hashlib
import re
import secrets
import zlib
from typing import Final

BASE62: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
RANDOM_LENGTH: Final = 32
CHECKSUM_LENGTH: Final = 6
HINT_LENGTH: Final = 4
PREFIX_PATTERN: Final = re.compile(r"[a-z][a-z0-9]{0,15}(_[a-z0-9]{1,16})?")


# Every pair of base62 digits, in order: a checksum is three lookups (62**6 > 2**32).
_PAIRS: Final = tuple(high + low for high in BASE62 for low in BASE62)
_PAIR: Final = len(_PAIRS)  # 62**2
_TWO_PAIRS: Final = _PAIR * _PAIR


def _checksum(body: str) -> str:
    """The CRC32 of ``body`` (ASCII) in CHECKSUM_LENGTH (6) base62 digits."""
    crc = zlib.crc32(body.encode())
    return _PAIRS[crc // _TWO_PAIRS] + _PAIRS[crc // _PAIR % _PAIR] + _PAIRS[crc % _PAIR]


def digest(key: str) -> bytes:
    """The SHA-256 of the key: what is stored and looked up, never the key itself."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class KeyFormat:
    """Generates and shape-checks the keys of one deployment prefix."""

    def __init__(self, prefix: str) -> None:
        if not PREFIX_PATTERN.fullmatch(prefix):
            raise ValueError(
                f"key prefix {prefix!r} must be lowercase letters and digits, "
                "optionally one '_' (e.g. 'wc_live')"
            )
        self.prefix = prefix
        body_length = RANDOM_LENGTH + CHECKSUM_LENGTH
        # What every key of this deployment starts with, and the length of each.
        self.head = prefix + "_"
        self.length = len(self.head) + body_length
        self._body_start = len(self.head)

    def generate(self) -> str:
        body = self.prefix + "_" + "".join(secrets.choice(BASE62) for _ in range(RANDOM_LENGTH))
        return body + _checksum(body)

    def is_well_formed(self, key: str) -> bool:
        """Prefix, length, alphabet and checksum, without touching any cache or database."""
        if len(key) != self.length or not key.startswith(self.head):
            return False
        # isascii() and isalnum() together are exactly [0-9A-Za-z], at half a regex's cost.
        body = key[self._body_start :]
        if not (body.isascii() and body.isalnum()):
            return False
        return key.endswith(_checksum(key[:-CHECKSUM_LENGTH]))

    def hint(self, key: str) -> str:
        """Prefix and the first characters of the random part, for humans telling keys apart."""
        start = len(self.prefix) + 1
        return key[: start + HINT_LENGTH] + "…"
