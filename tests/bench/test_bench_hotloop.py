"""`python -m bench.hotloop` runs: every handler answers its requests (figures are not judged)."""

from bench import hotloop


def test_every_handler_is_measured() -> None:
    """A tiny run (20 keys, 2 passes) measures the five handlers; the run itself asserts that
    the real handler found every valid key VALID."""
    figures = hotloop.measure(working_set=20, passes=2)
    assert set(figures) == {
        "authenticated echo",
        "cache hit, inline floor",
        "cache hit",
        "malformed key",
        "unknown key (repeated)",
    }
    assert all(figure > 0 for figure in figures.values())
