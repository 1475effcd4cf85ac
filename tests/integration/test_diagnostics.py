"""Diagnostics bundles: a site administrator asks for one over a window, it is made in the
background, and the archive holds the log lines, settings, system facts, workloads, builds and
audit events of that window, with the site's secrets and tokens replaced; others may not ask."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import tarfile
from typing import Any

from cml_appliance.web.keys import SETTINGS
from tests.conftest import Api


async def _finished(api: Api, request_id: str) -> dict[str, Any]:
    for _ in range(200):
        status, body = await api.get(f"/api/v2/diagnostics/bundle/status/{request_id}")
        assert status == 200, body
        if body["status"] != "DIAG_IN_PROGRESS":
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"the bundle is still being made: {body}")


async def test_a_bundle_holds_the_windows_logs_and_facts_without_secrets(admin: Api, alice: Api) -> None:
    settings = alice.client.app[SETTINGS]
    _, project = await alice.post("/api/v2/projects", json={"name": "diag"})
    status, session = await alice.post(f"/api/v2/projects/{project['id']}/sessions", json={"name": "probe"})
    assert status == 200, session
    # A log line holding the site's key, a bearer token and a password in a URL: all scrubbed.
    logging.getLogger("cml_appliance.test").warning(
        "leak check %s Bearer abcdefghijklmnop https://x.example/?password=hunter22&ok=1", settings.secret_key)

    status, asked = await alice.post("/api/v2/diagnostics/bundle", json={})
    assert status == 403, asked
    status, asked = await admin.post("/api/v2/diagnostics/bundle", json={"start_time": "2026-13-01 00:00:00"})
    assert status == 400 and "start_time" in asked["message"], asked
    status, asked = await admin.post("/api/v2/diagnostics/bundle", json={})
    assert status == 200 and asked["status"] == "DIAG_IN_PROGRESS" and asked["request_id"], asked
    done = await _finished(admin, asked["request_id"])
    assert done["status"] == "DIAG_COMPLETED", done

    status, raw = await admin.get(f"/api/v2/diagnostics/download/{asked['request_id']}")
    assert status == 200
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tar:
        files = {m.name.split("/", 1)[1]: tar.extractfile(m).read().decode() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert set(files) == {"README.txt", "appliance.log", "settings.json", "system.json", "workloads.json", "builds.json",
                          "audit.jsonl"}
    everything = "".join(files.values())
    assert settings.secret_key not in everything and "hunter22" not in everything and "abcdefghijklmnop" not in everything
    assert "leak check <redacted> Bearer <redacted>" in files["appliance.log"]
    assert json.loads(files["settings.json"])["secret_key"] == "<redacted>"
    system = json.loads(files["system.json"])
    assert system["migrations"][-1] >= 22 and "local" in system["engines"] and system["postgres"]
    workloads = json.loads(files["workloads.json"])
    assert [w["public_id"] for w in workloads] == [session["id"]] and "environment" not in workloads[0]
    assert any(json.loads(line)["action"] == "project.create" for line in files["audit.jsonl"].splitlines())

    status, body = await alice.get(f"/api/v2/diagnostics/download/{asked['request_id']}")
    assert status == 403, body
    status, body = await admin.get("/api/v2/diagnostics/bundle/status/nope-nope")
    assert status == 404, body
