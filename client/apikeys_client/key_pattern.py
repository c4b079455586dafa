"""Finding apikeys keys in text (leak scanning), without the service.

A key is ``{prefix}_{32 random}{6 checksum}``: the prefix is a lowercase letter, up to 15 more
lowercase letters or digits, optionally ``_`` and 1-16 lowercase letters or digits (``wc_live``);
the random part and the checksum are base62 (``0-9A-Za-z``). The checksum is the CRC-32 (zlib,
IEEE) of everything before it (prefix, ``_`` and the random part, as ASCII), written as 6 base62
digits, most significant first, zero-padded (``0`` is the digit zero). ``KEY_REGEX`` finds
candidates; ``is_key`` also checks the checksum, which rejects strings that only look alike.
"""

import re
import zlib
from collections.abc import Iterator
from typing import Final

BASE62: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
CHECKSUM_LENGTH: Final = 6

# The same expression as the gitleaks rule in deploy/gitleaks.toml (keep them in step).
KEY_REGEX: Final = re.compile(
    r"(?<![A-Za-z0-9_])"
    r"[a-z][a-z0-9]{0,15}(?:_[a-z0-9]{1,16})?_[0-9A-Za-z]{38}"
    r"(?![A-Za-z0-9_])"
)


def checksum(body: str) -> str:
    """The 6 base62 digits of the CRC-32 of ``body`` (``prefix_random``)."""
    number = zlib.crc32(body.encode("ascii"))
    digits = []
    for _ in range(CHECKSUM_LENGTH):
        number, remainder = divmod(number, 62)
        digits.append(BASE62[remainder])
    return "".join(reversed(digits))


def is_key(text: str) -> bool:
    """Shaped like a key and its checksum matches."""
    if not KEY_REGEX.fullmatch(text):
        return False
    return checksum(text[:-CHECKSUM_LENGTH]) == text[-CHECKSUM_LENGTH:]


def find_keys(text: str) -> Iterator[str]:
    """The keys in ``text`` (checksum verified), in order, each once."""
    seen: set[str] = set()
    for match in KEY_REGEX.finditer(text):
        key = match.group(0)
        if key not in seen and is_key(key):
            seen.add(key)
            yield key
