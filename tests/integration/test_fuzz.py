"""Fuzzing: schemathesis (from PyPI) drives every operation of CML's own swagger against the real
`cml-appliance serve`, signed in as a site administrator with a project of its own, with a fixed
seed and example budget. No answer may be a 5xx, and the server may log no unexpected error.

Operations whose path parameters CML names with dots (`{project.id}`) are left out: schemathesis
cannot build them from this swagger (it reports a schema error, not an answer of ours).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.conftest import REPO, require_tool
from tests.integration.test_cli import CLI, cli_env, free_port, fresh_db, run, wait_ready  # noqa: F401 (fixtures)

SWAGGER = REPO / "tests" / "data" / "cml-api-v2.swagger.json"
EXAMPLES = 10
SEED = 20261206


def test_no_operation_of_cmls_swagger_makes_the_server_fail(cli_env: dict[str, str], fresh_db: str, tmp_path: Path) -> None:
    schemathesis = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    require_tool(schemathesis is not None, "schemathesis (requirements-test.txt)")
    assert schemathesis is not None
    cli_env["CML_DATABASE_URL"] = fresh_db
    assert run(["migrate"], cli_env).returncode == 0
    assert run(["users", "create", "fuzz", "--email", "f@example.com", "--password-stdin", "--admin"], cli_env,
               "longpassword\n").returncode == 0
    key = run(["api-keys", "create", "fuzz"], cli_env).stdout.strip().splitlines()[-1]
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(CLI + ["serve", "--port", str(port), "--no-migrate"], env=cli_env, stdout=log, stderr=log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        request = urllib.request.Request(url + "/api/v2/projects", data=json.dumps({"name": "fuzzed"}).encode(),
                                         headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 200
        result = subprocess.run(
            [schemathesis, "run", str(SWAGGER), "--url", url, "-H", f"Authorization: Bearer {key}",
             "--checks", "not_a_server_error", "--max-examples", str(EXAMPLES), "--seed", str(SEED),
             "--phases", "examples,fuzzing", "--request-timeout", "10", "--exclude-path-regex", r"\{[a-z_]+\.[a-z_.]+\}",
             "--no-color"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    report = result.stdout[-6000:]
    assert "Server error" not in result.stdout and result.returncode == 0, report
    tested = [line for line in result.stdout.splitlines() if line.strip().startswith("Tested:")]
    assert tested and int(tested[0].split(":")[1]) > 100, report
    unexpected = [line for line in log_path.read_text().splitlines() if "unexpected error" in line]
    assert not unexpected, unexpected[:3]
