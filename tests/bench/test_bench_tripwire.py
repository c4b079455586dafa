"""`python -m bench tripwire`, shortened: it runs, every answer is right, the tripwire wrote.

Never a timing assertion: a run this short measures nothing.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["--seconds", "0.3", "--warmup", "0.1", "--rounds", "1", "--no-markdown"]


@pytest.mark.e2e
def test_a_short_run_checks_its_answers_and_the_tripwire() -> None:
    """Both workloads complete with every answer right; the flood leaves one event."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("APIKEYS_")}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "tripwire", *SHORT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| valid keys |" in done.stdout
    assert "| one revoked key (flood) |" in done.stdout
    assert "answers: all right" in done.stdout
    assert "and 1 PRESENTED_AFTER_REVOCATION event(s)" in done.stdout
