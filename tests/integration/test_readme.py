"""The README's two commands: exactly two, CI runs the test one, and the serve one works from a
clean copy of the repository (a fresh venv, the embedded Postgres, the first-run set-up page)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.integration.test_cli import free_port

REPO = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_names_two_commands_and_ci_runs_the_test_one() -> None:
    assert readme_commands() == ["./scripts/serve.sh", "./scripts/test.sh"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "./scripts/test.sh" in ci


def test_serve_command_works_from_a_clean_copy(tmp_path: Path) -> None:
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    copy = tmp_path / "checkout"
    for name in tracked.decode().split("\0"):
        if not name or not (REPO / name).exists():
            continue
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CML_") and k != "DATABASE_URL"}
    env["PYTHON"] = sys.executable
    env["CML_LOG_LEVEL"] = "WARNING"
    # Ports of its own for the listeners beside the UI's: others may be taken on this machine.
    env.update({"CML_APPS_PORT": "0", "CML_EDITORS_PORT": "0", "CML_GRPC_PORT": "0"})
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        ["./scripts/serve.sh", "--port", str(port)], cwd=copy, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300  # a fresh venv: pip installs every dependency
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
                    ready = resp.status == 200
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        log.seek(0)
        assert ready, f"serve.sh did not become ready:\n{log.read()[-4000:]}"
        # First visit: no users yet, so the set-up page asks for the administrator.
        with urllib.request.urlopen(url + "/login", timeout=5) as resp:
            assert resp.url.endswith("/setup") and "Create administrator" in resp.read().decode()
        assert (copy / ".cml-data" / "postgres" / "PG_VERSION").exists()
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
