"""Fuzzing: schemathesis (from PyPI) drives every operation of CML's own swagger, and then every
operation of the appliance's own OpenAPI document (GET /api/v2/openapi.json: what CML lacks),
against the real `cml-appliance serve`, signed in as a site administrator, with a fixed seed and
example budget. No answer may be a 5xx, every answer must match its schema, and the server may
log no unexpected error.

The fuzzer is given real identifiers (a project with a file, a job and a finished run, a stopped
session, an application, a model) so that it reaches the handlers behind them instead of 404s.
It may change and stop all of them, but not delete the project or the key it signs in with:
the operations after those would only see 401s and 404s.

Operations whose path parameters CML names with dots (`{project.id}`) are left out: schemathesis
cannot build them from this swagger (it reports a schema error, not an answer of ours).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import REPO, require_tool
from tests.integration.test_cli import CLI, cli_env, free_port, fresh_db, run, wait_ready  # noqa: F401 (fixtures)

SWAGGER = REPO / "tests" / "data" / "cml-api-v2.swagger.json"
EXAMPLES = 10
SEED = 20261206
NEVER = ["DeleteProject", "DeleteV2Keys", "DeleteV2Key"]
# The model endpoint answers for the model, as CML's does: 502 (its replicas died answering),
# 503 (not deployed: the fuzzed model never is), 504 (the function took too long). Those are the
# model's state, not the appliance failing; every other route may answer no 5xx at all.
MODEL_ENDPOINT_STATUSES = """
[[operations]]
include-operation-id = ["CallModel", "CallModelAltus"]
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "502", "503", "504"]
"""


def _unimplemented_statuses() -> str:
    """CML's operations with no meaning here answer 501 by design (api/unimplemented.py)."""
    from cml_appliance.api.unimplemented import UNIMPLEMENTED

    operations = ", ".join(f'"{operation}"' for _, _, operation, _ in UNIMPLEMENTED)
    return f"""
[[operations]]
include-operation-id = [{operations}]
checks.not_a_server_error.expected-statuses = ["4xx", "501"]
"""


def _call(url: str, key: str, method: str, path: str, body: Any = None, raw: bytes | None = None,
          content_type: str = "application/json") -> dict[str, Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read() or b"{}")


def _until(what: str, check: Any, deadline: float = 60) -> Any:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {deadline} s")


def _identifiers(url: str, key: str) -> dict[str, str]:
    """Real things for the fuzzer to work on, each in a state it can be changed from."""
    project = _call(url, key, "POST", "/api/v2/projects", {"name": "fuzzed"})
    pid = project["id"]
    boundary = "fuzzboundary"
    upload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"hello.py\"; filename=\"hello.py\"\r\n\r\n"
              f"print('hello')\r\ndef predict(args):\r\n    return args\r\n--{boundary}--\r\n").encode()
    _call(url, key, "POST", f"/api/v2/projects/{pid}/files", raw=upload, content_type=f"multipart/form-data; boundary={boundary}")
    job = _call(url, key, "POST", f"/api/v2/projects/{pid}/jobs", {"name": "fuzz job", "script": "hello.py"})
    run_ = _call(url, key, "POST", f"/api/v2/projects/{pid}/jobs/{job['id']}/runs", {})
    _until("the job run's end", lambda: _call(url, key, "GET", f"/api/v2/projects/{pid}/jobs/{job['id']}/runs/{run_['id']}")
           ["status"] in ("ENGINE_SUCCEEDED", "ENGINE_FAILED"))
    session = _call(url, key, "POST", f"/api/v2/projects/{pid}/sessions", {"name": "fuzz session"})
    _call(url, key, "POST", f"/api/v2/projects/{pid}/sessions/{session['id']}:stop")
    app = _call(url, key, "POST", f"/api/v2/projects/{pid}/applications", {"name": "fuzz app", "subdomain": "fuzz", "script": "hello.py"})
    model = _call(url, key, "POST", f"/api/v2/projects/{pid}/models",
                  {"project_id": pid, "name": "fuzz model", "description": "fuzzed"})
    team = _call(url, key, "POST", "/api/v2/site/teams", {"username": "fuzz-team"})
    return {"project_id": pid, "path": "hello.py", "job_id": job["id"], "run_id": run_["id"], "session_id": session["id"],
            "application_id": app["id"], "app_id": app["id"], "model_id": model["id"], "username": "fuzz",
            "owner": "fuzz", "slug": project["slug"], "team_name": team["username"]}


def _schemathesis(schemathesis: str, schema: str, url: str, key: str, config: Path, cwd: Path,
                  exclude: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [schemathesis, "--config-file", str(config), "run", schema, "--url", url, "-H", f"Authorization: Bearer {key}",
         "--checks", "not_a_server_error,response_schema_conformance", "--max-examples", str(EXAMPLES),
         "--seed", str(SEED), "--phases", "examples,fuzzing", "--request-timeout", "10",
         *exclude, "--no-color"],
        capture_output=True, text=True, timeout=600, cwd=cwd,
    )


def _assert_clean(result: subprocess.CompletedProcess[str], at_least: int) -> None:
    report = result.stdout[-8000:]
    assert "Server error" not in result.stdout and result.returncode == 0, report
    tested = [line for line in result.stdout.splitlines() if line.strip().startswith("Tested:")]
    assert tested and int(tested[0].split(":")[1]) >= at_least, report


def test_no_operation_makes_the_server_fail_or_answer_off_its_schema(cli_env: dict[str, str], fresh_db: str, tmp_path: Path) -> None:
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
        ids = _identifiers(url, key)
        config = tmp_path / "schemathesis.toml"
        config.write_text("[parameters]\n" + "".join(f'"path.{name}" = "{value}"\n' for name, value in ids.items())
                          + MODEL_ENDPOINT_STATUSES + _unimplemented_statuses())
        # Ours first: CML's operations include deleting the job, application and model given.
        ours = _schemathesis(schemathesis, url + "/api/v2/openapi.json", url, key, config, tmp_path, [])
        cml = _schemathesis(schemathesis, str(SWAGGER), url, key, config, tmp_path,
                            ["--exclude-path-regex", r"\{[a-z_]+\.[a-z_.]+\}", *[f"--exclude-operation-id={op}" for op in NEVER]])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    artifacts = Path(os.environ.get("CML_ARTIFACTS_DIR", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "fuzz-cml-swagger.txt").write_text(cml.stdout)
    (artifacts / "fuzz-own-openapi.txt").write_text(ours.stdout)
    _assert_clean(cml, 100)
    _assert_clean(ours, 18)
    unexpected = [line for line in log_path.read_text().splitlines() if "unexpected error" in line]
    assert not unexpected, unexpected[:3]
