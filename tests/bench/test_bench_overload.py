"""`python -m bench overload`, shortened: it runs on both transports and checks its answers.

Never a timing assertion: a run this short measures nothing.
"""

import pytest

from tests.bench import run_bench

SHORT = ["--seconds", "0.3", "--no-postgres", "--no-markdown"]


@pytest.mark.e2e
def test_a_short_run_completes_with_right_answers() -> None:
    """Every phase on both transports runs; a wrong or reset answer would fail the run."""
    done = run_bench("overload", *SHORT, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    for transport in ("gRPC's own pool (before)", "dispatcher (now)"):
        assert f"| {transport} | cache hits, 64 in flight (saturation) |" in done.stdout
        assert f"| {transport} | probe 500/s beside 1 000 unfinished calls |" in done.stdout
