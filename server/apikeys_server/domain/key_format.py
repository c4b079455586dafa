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
# Longer than any well-formed key of any valid prefix: rejects oversized input before the regex.
MAX_KEY_LENGTH: Final = 80


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, remainder = divmod(number, 62)
        digits.append(BASE62[remainder])
    return "".join(reversed(digits))


_DIGIT_VALUE: Final = {char: value for value, char in enumerate(BASE62)}


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), CHECKSUM_LENGTH)


def _decode_base62(text: str) -> int:
    number = 0
    for char in text:
        number = number * 62 + _DIGIT_VALUE[char]
    return number


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
        self._shape = re.compile(re.escape(prefix) + f"_[0-9A-Za-z]{{{body_length}}}")

    def generate(self) -> str:
        body = self.prefix + "_" + "".join(secrets.choice(BASE62) for _ in range(RANDOM_LENGTH))
        return body + _checksum(body)

    def is_well_formed(self, key: str) -> bool:
        """Prefix, length, alphabet and checksum, without touching any cache or database."""
        if len(key) > MAX_KEY_LENGTH or not self._shape.fullmatch(key):
            return False
        # Decoding six digits is half the cost of encoding the CRC (this runs twice per Verify);
        # base62 of width 6 is a bijection below 62**6 > 2**32, so both compare the same.
        body, checksum = key[:-CHECKSUM_LENGTH], key[-CHECKSUM_LENGTH:]
        return _decode_base62(checksum) == zlib.crc32(body.encode("ascii"))

    def hint(self, key: str) -> str:
        """Prefix and the first characters of the random part, for humans telling keys apart."""
        start = len(self.prefix) + 1
        return key[: start + HINT_LENGTH] + "…"
