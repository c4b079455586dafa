"""The Verify benchmark: ``python -m bench`` (``make bench``), ``--smoke`` for CI.

Runs, in one go and interleaved, an echo server (the ceiling: the project's own gRPC server
factory with a servicer that returns a constant answer) and the real server over SQLite and
PostgreSQL, each pinned to one core while the load generator runs on another. Every figure
is reported as a ratio to echo measured in the same run; see BENCHMARKS.md.
"""
