"""The soak benchmark's short version (bench/soak.py --seconds 60): 200 API clients, 50 typing
terminals, 20 model callers and a job run a second on the real `serve`, with no error and the
appliance's memory within its bound. The 5-minute figures are in docs/benchmarks.md."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO


def test_a_minute_of_mixed_load_without_an_error() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "soak.py"), "--seconds", "60"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ), cwd=REPO,
    )
    report = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0, report
    assert "errors: none" in result.stdout and "memory bound (1.5): met" in result.stdout, report
