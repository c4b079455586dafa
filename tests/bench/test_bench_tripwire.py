"""`python -m bench tripwire`, shortened: it runs, every answer is right, the tripwire wrote.

Never a timing assertion: a run this short measures nothing.
"""

import pytest

from tests.bench import run_bench

SHORT = ["--seconds", "0.3", "--warmup", "0.1", "--rounds", "1", "--no-markdown"]


@pytest.mark.e2e
def test_a_short_run_checks_its_answers_and_the_tripwire() -> None:
    """Both workloads complete with every answer right; the flood leaves one event."""
    done = run_bench("tripwire", *SHORT, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| valid keys |" in done.stdout
    assert "| one revoked key (flood) |" in done.stdout
    assert "answers: all right" in done.stdout
    assert "and 1 PRESENTED_AFTER_REVOCATION event(s)" in done.stdout
