"""Short runs of the benchmark harness (`python -m bench ...`): it works and checks its answers."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_bench(*args: str, timeout: float) -> "subprocess.CompletedProcess[str]":
    """``python -m bench ARGS`` from the repository root, without this shell's APIKEYS_*
    settings (the harness sets each server's own)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("APIKEYS_")}
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
