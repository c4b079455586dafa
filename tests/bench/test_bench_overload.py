"""`python -m bench overload`, shortened: it runs on both transports and checks its answers.

Never a timing assertion: a run this short measures nothing.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["--seconds", "0.3", "--no-postgres", "--no-markdown"]


@pytest.mark.e2e
def test_a_short_run_completes_with_right_answers() -> None:
    """Every phase on both transports runs; a wrong or reset answer would fail the run."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("APIKEYS_")}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "overload", *SHORT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for transport in ("gRPC's own pool (before)", "dispatcher (now)"):
        assert f"| {transport} | cache hits, 64 in flight (saturation) |" in done.stdout
        assert f"| {transport} | probe 500/s beside 1 000 unfinished calls |" in done.stdout
