"""Job notifications through a real SMTP server (aiosmtpd) started by the test."""

from __future__ import annotations

import asyncio
import dataclasses
import email
import socket
import time
from collections.abc import Iterator
from email.message import Message
from typing import Any

import aiohttp
import pytest
from aiosmtpd.controller import Controller

from cml_appliance.app import create_app
from cml_appliance.auth import api_keys, users
from cml_appliance.core.settings import Settings
from cml_appliance.web.keys import POOL
from tests.conftest import Api, assert_error
from tests.integration.test_jobs_api import project_with_script, wait_run


class Inbox:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 (aiosmtpd's name)
        self.messages.append(email.message_from_bytes(envelope.content))
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[int, Inbox]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield port, inbox
    finally:
        controller.stop()


async def test_run_endings_are_mailed_with_attachments(aiohttp_client: Any, settings: Settings, smtp: tuple[int, Inbox]) -> None:
    port, inbox = smtp
    app = create_app(dataclasses.replace(settings, smtp_host="127.0.0.1", smtp_port=port, smtp_sender="cml@example.com"))
    client = await aiohttp_client(app)
    user = await users.create_user(client.app[POOL], "alice", "alice@example.com", "correct horse")
    alice = Api(client, (await api_keys.create(client.app[POOL], user))[0], "alice")
    pid = await project_with_script(alice)
    form = aiohttp.FormData()
    form.add_field("report.csv", b"metric,value\nauc,0.91\n", filename="report.csv")
    await alice.post(f"/api/v2/projects/{pid}/files", data=form)

    status, job = await alice.post(f"/api/v2/projects/{pid}/jobs", json={
        "name": "nightly", "script": "train.py", "attachments": ["report.csv", "missing.txt"],
        "recipients": [
            {"email": "oncall@example.com", "notify_on_failure": True, "notify_on_timeout": True},
            {"email": "team@example.com", "notify_on_success": True},
        ],
    })
    assert status == 200, job
    assert job["recipients"][0] == {"email": "oncall@example.com", "notify_on_success": False, "notify_on_failure": True,
                                    "notify_on_timeout": True, "notify_on_stop": False}
    _, failing = await alice.post(f"/api/v2/projects/{pid}/jobs/{job['id']}/runs", json={"environment": {"EXIT_CODE": "4"}})
    await wait_run(alice, pid, job["id"], failing["id"], "ENGINE_FAILED")
    _, passing = await alice.post(f"/api/v2/projects/{pid}/jobs/{job['id']}/runs", json={})
    await wait_run(alice, pid, job["id"], passing["id"], "ENGINE_SUCCEEDED")
    deadline = time.monotonic() + 10
    while len(inbox.messages) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert len(inbox.messages) == 2
    failed = next(m for m in inbox.messages if "failed" in m["Subject"])
    assert failed["To"] == "oncall@example.com" and failed["From"] == "cml@example.com"
    assert failed["Subject"] == "[cml-appliance] Job nightly failed (jobs)"
    body = failed.get_payload()[0].get_payload(decode=True).decode()
    assert "exited with code 4" in body and f"/runs/{failing['id']}" in body and "missing.txt" in body
    attachment = failed.get_payload()[1]
    assert attachment.get_filename() == "report.csv" and b"auc,0.91" in attachment.get_payload(decode=True)
    succeeded = next(m for m in inbox.messages if "succeeded" in m["Subject"])
    assert succeeded["To"] == "team@example.com"


async def test_bad_recipients_are_refused(alice: Api) -> None:
    pid = await project_with_script(alice)
    for recipients in ("oncall@example.com", [{"email": "nobody"}], [{"email": "a@b.c", "notify_on_failure": "yes"}],
                       [{"email": "a@b.c", "page_me": True}]):
        status, body = await alice.post(f"/api/v2/projects/{pid}/jobs", json={"name": "n", "script": "train.py", "recipients": recipients})
        assert_error(status, body, 400)
    status, body = await alice.post(f"/api/v2/projects/{pid}/jobs", json={"name": "n", "script": "train.py", "attachments": ["../etc/passwd"]})
    assert_error(status, body, 400)
