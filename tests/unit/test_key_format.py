"""Key format: generation, shape and checksum checks, digest and hint."""

import hashlib
import re
import zlib

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from apikeys_server.domain.key_format import (
    BASE62,
    CHECKSUM_LENGTH,
    HINT_LENGTH,
    RANDOM_LENGTH,
    KeyFormat,
    digest,
)

AK = KeyFormat("ak")
# One key shared by the property tests: hypothesis varies the typo, not the key.
SAMPLE_KEY = AK.generate()
BODY_START = len("ak_")


class TestGenerate:
    def test_generated_keys_are_well_formed(self) -> None:
        """Every generated key passes its own deployment's shape and checksum check."""
        for _ in range(200):
            assert AK.is_well_formed(AK.generate())

    def test_generated_key_has_prefix_and_38_base62_characters(self) -> None:
        """A key is `{prefix}_` followed by 32 random and 6 checksum base62 characters."""
        key = KeyFormat("wc_live").generate()
        assert key.startswith("wc_live_")
        body = key[len("wc_live_") :]
        assert len(body) == RANDOM_LENGTH + CHECKSUM_LENGTH == 38
        assert set(body) <= set(BASE62)

    def test_generated_keys_differ(self) -> None:
        """Generated keys are random: a thousand of them are all distinct."""
        keys = {AK.generate() for _ in range(1000)}
        assert len(keys) == 1000


class TestWellFormed:
    @settings(deadline=None)  # a loaded CI machine must not turn slowness into failure
    @given(
        position=st.integers(min_value=0, max_value=len(SAMPLE_KEY) - 1),
        replacement=st.sampled_from(BASE62 + "_-+/= .lIO0"),
    )
    def test_checksum_rejects_any_one_character_typo(self, position: int, replacement: str) -> None:
        """Changing any single character of a valid key makes it malformed."""
        assume(SAMPLE_KEY[position] != replacement)
        typo = SAMPLE_KEY[:position] + replacement + SAMPLE_KEY[position + 1 :]
        assert not AK.is_well_formed(typo)

    @settings(deadline=None)  # a loaded CI machine must not turn slowness into failure
    @given(position=st.integers(min_value=BODY_START, max_value=len(SAMPLE_KEY) - 2))
    def test_checksum_rejects_swapped_adjacent_characters(self, position: int) -> None:
        """Swapping two adjacent different characters of the body makes the key malformed."""
        first, second = SAMPLE_KEY[position], SAMPLE_KEY[position + 1]
        assume(first != second)
        swapped = SAMPLE_KEY[:position] + second + first + SAMPLE_KEY[position + 2 :]
        assert not AK.is_well_formed(swapped)

    @settings(deadline=None)  # a loaded CI machine must not turn slowness into failure
    @given(text=st.text(max_size=120))
    def test_arbitrary_text_never_raises(self, text: str) -> None:
        """Any text gets a plain True/False answer, and random text is never well formed."""
        assert AK.is_well_formed(text) is False

    def test_key_of_another_prefix_is_malformed(self) -> None:
        """A wc_test key never passes the shape check of a wc_live deployment, nor the reverse."""
        live, test = KeyFormat("wc_live"), KeyFormat("wc_test")
        assert not live.is_well_formed(test.generate())
        assert not test.is_well_formed(live.generate())

    def test_key_with_prefix_swapped_but_same_body_is_malformed(self) -> None:
        """Re-prefixing a valid key breaks its checksum, which covers the prefix too."""
        live, test = KeyFormat("wc_live"), KeyFormat("wc_test")
        key = test.generate()
        assert not live.is_well_formed("wc_live_" + key[len("wc_test_") :])

    @pytest.mark.parametrize(
        "text",
        [
            "",
            " ",
            "\n",
            "\x00",
            "None",
            "null",
            "undefined",
            "0",
            "ak",
            "ak_",
            "ak_" + "0" * 38,
            "x" * (1024 * 1024),
            "ak_" + "a" * (1024 * 1024),
            "ak_" + "é" * 38,
            "ak_" + "٣" * 38,
            "ak_" + "Ａ" * 38,
            "ak_" + "\ud800" * 38,
            "🔑" * 41,
        ],
        ids=repr,
    )
    def test_garbage_is_malformed_without_exception(self, text: str) -> None:
        """Empty, huge, unicode, control and null-ish strings are rejected, never raised on."""
        assert AK.is_well_formed(text) is False

    @pytest.mark.parametrize(
        "mangle",
        [
            lambda k: " " + k,
            lambda k: k + " ",
            lambda k: k + "\n",
            lambda k: k + "\r\n",
            lambda k: "\t" + k,
            lambda k: k[:-1],
            lambda k: k + "0",
            lambda k: k.upper(),
            lambda k: k.replace("_", "-", 1),
            lambda k: k[BODY_START:],
        ],
        ids=[
            "leading-space",
            "trailing-space",
            "trailing-newline",
            "trailing-crlf",
            "leading-tab",
            "truncated",
            "extended",
            "uppercased",
            "dash-separator",
            "no-prefix",
        ],
    )
    def test_whitespace_and_length_variants_are_malformed(self, mangle) -> None:
        """A valid key with surrounding whitespace, a changed length or case does not pass."""
        key = AK.generate()
        assert AK.is_well_formed(key)
        assert not AK.is_well_formed(mangle(key))


def _reference_is_well_formed(key: str) -> bool:
    """The documented shape, spelled the slow way: a regex and the CRC decoded digit by digit."""
    if not re.fullmatch(r"ak_[0-9A-Za-z]{38}", key):
        return False
    value = 0
    for char in key[-CHECKSUM_LENGTH:]:
        value = value * 62 + BASE62.index(char)
    return value == zlib.crc32(key[:-CHECKSUM_LENGTH].encode("ascii"))


class TestShapeMatchesTheDefinition:
    @settings(max_examples=500)
    @given(
        position=st.integers(min_value=0, max_value=40),
        replacement=st.sampled_from([*BASE62[:5], "_", "-", "é", "٣", "Ａ", "\x00", " ", "ß"]),
    )
    def test_any_one_character_change_is_judged_as_the_definition_does(
        self, position: int, replacement: str
    ) -> None:
        """The fast check (alphabet by isascii/isalnum, checksum by digit pairs) answers what
        the regex and a digit-by-digit decode answer, for keys and near-keys alike."""
        key = SAMPLE_KEY[:position] + replacement + SAMPLE_KEY[position + 1 :]
        assert AK.is_well_formed(key) is _reference_is_well_formed(key)

    def test_generated_and_reencoded_keys_agree(self) -> None:
        """Fresh keys, and fresh bodies with every possible last checksum digit."""
        for _ in range(50):
            key = AK.generate()
            for char in BASE62:
                near = key[:-1] + char
                assert AK.is_well_formed(near) is _reference_is_well_formed(near)


class TestDigest:
    def test_digest_is_sha256_of_the_key(self) -> None:
        """The stored digest is the SHA-256 of the UTF-8 key, 32 bytes."""
        key = AK.generate()
        assert digest(key) == hashlib.sha256(key.encode()).digest()
        assert len(digest(key)) == 32

    def test_digest_differs_per_key(self) -> None:
        """Different keys have different digests; the same key always the same digest."""
        first, second = AK.generate(), AK.generate()
        assert digest(first) != digest(second)
        assert digest(first) == digest(first)

    def test_digest_of_lone_surrogate_does_not_raise(self) -> None:
        """Text that is not valid UTF-8 (a lone surrogate) still digests instead of raising."""
        assert len(digest("ak_\ud800")) == 32


class TestHint:
    def test_hint_is_prefix_and_four_characters(self) -> None:
        """The hint shows the prefix, '_', the first 4 random characters and an ellipsis."""
        fmt = KeyFormat("wc_live")
        key = fmt.generate()
        hint = fmt.hint(key)
        assert hint == key[: len("wc_live_") + HINT_LENGTH] + "…"
        assert hint.startswith("wc_live_")

    def test_hint_never_contains_the_whole_key(self) -> None:
        """The hint reveals at most 4 secret characters: not the key, not its checksum."""
        key = AK.generate()
        hint = AK.hint(key)
        assert key not in hint
        assert len(hint.rstrip("…")) == BODY_START + HINT_LENGTH
        assert key[-CHECKSUM_LENGTH:] not in hint


class TestPrefix:
    @pytest.mark.parametrize("prefix", ["ak", "wc_live", "wc_test", "a", "a1_b2", "a" * 16])
    def test_valid_prefixes_are_accepted(self, prefix: str) -> None:
        """Lowercase letters and digits, starting with a letter, with at most one '_'."""
        assert KeyFormat(prefix).prefix == prefix

    @pytest.mark.parametrize(
        "prefix",
        [
            "",
            "AK",
            "Ak",
            "1ak",
            "_ak",
            "ak_",
            "a_b_c",
            "ak-live",
            "ak live",
            "ak.live",
            "a" * 17,
            "ak_" + "x" * 17,
            "ák",
            "ak\n",
        ],
        ids=repr,
    )
    def test_invalid_prefixes_are_rejected(self, prefix: str) -> None:
        """A prefix that scanners could not match cleanly raises ValueError naming it."""
        with pytest.raises(ValueError, match="prefix"):
            KeyFormat(prefix)
