"""Leak detection: the key regex and checksum (client) and the gitleaks rule, against keys the
server generates and strings that only look like keys."""

import re
import tomllib
from pathlib import Path

import pytest

from apikeys_client.key_pattern import KEY_REGEX, checksum, find_keys, is_key
from apikeys_server.domain.key_format import KeyFormat

GITLEAKS = Path(__file__).parents[2] / "deploy" / "gitleaks.toml"
PREFIXES = ["ak", "wc_live", "x", "abcdefghijklmnop_qrstuvwxyz012345"]


def gitleaks_regex() -> re.Pattern[str]:
    [rule] = tomllib.loads(GITLEAKS.read_text())["rules"]
    # RE2 and Python agree on this expression (no lookaround, \b, classes, a group).
    return re.compile(rule["regex"])


@pytest.mark.parametrize("prefix", PREFIXES)
def test_generated_keys_are_keys(prefix: str) -> None:
    key_format = KeyFormat(prefix)
    for _ in range(200):
        key = key_format.generate()
        assert is_key(key)
        assert key_format.is_well_formed(key)
        assert checksum(key[:-6]) == key[-6:]


def test_finds_keys_in_text() -> None:
    keys = [KeyFormat("ak").generate(), KeyFormat("wc_live").generate()]
    text = (
        f'export APIKEY={keys[0]}\nconfig = {{"key": "{keys[1]}"}}\n'
        f"again: {keys[0]}, ak_short, AK_{keys[0][3:]}\n"
    )
    assert list(find_keys(text)) == keys


def near_misses(key: str) -> list[str]:
    random_part = key[3:-6]
    flipped = "B" if key[5] == "A" else "A"
    return [
        key[:-1] + ("0" if key[-1] != "0" else "1"),  # checksum off by one digit
        key[:5] + flipped + key[6:],  # a typo in the random part
        key[:-1],  # one short
        key + "0",  # one long (glued to more characters)
        "x" + key,  # glued before (another prefix)
        "AK" + key[2:],  # upper-case prefix
        key.replace("_", "-", 1),  # another separator
        "ak_" + random_part + "!" * 6,  # not base62
    ]


def test_rejects_strings_that_only_look_alike() -> None:
    for _ in range(100):
        key = KeyFormat("ak").generate()
        for miss in near_misses(key):
            assert not is_key(miss), miss
            assert key not in list(find_keys(f"value: {miss} ")), miss


def test_gitleaks_rule_matches_keys_not_lookalikes() -> None:
    rule = gitleaks_regex()
    for _ in range(100):
        key = KeyFormat("ak").generate()
        found = rule.search(f'token = "{key}"\n')
        assert found is not None and found.group(1) == key
        # Shape-level near-misses (gitleaks cannot check the checksum; is_key does).
        for miss in near_misses(key)[2:]:
            match = rule.search(f"token = {miss}\n")
            assert match is None or match.group(1) != key, miss


def test_client_regex_is_the_documented_shape() -> None:
    assert KEY_REGEX.fullmatch("ak_" + "A" * 38)
    assert not KEY_REGEX.fullmatch("ak_" + "A" * 37)
    assert not KEY_REGEX.fullmatch("Ak_" + "A" * 38)
