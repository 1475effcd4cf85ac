"""Runtime add-ons: an administrator uploads a tarball of files with its metadata; a session that
asks for the add-on sees its files read-only at /runtime-addons/<identifier>, in the local
engine's sandbox, in a Podman container and in a pod; archives that could escape, links, and what is not
an archive are refused; disabled and deleted add-ons cannot be asked for."""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any

import aiohttp

from cml_appliance.web.keys import SETTINGS
from tests.conftest import BUSYBOX_IMAGE, Api, assert_error, user_maker
from tests.integration.sessions_helpers import open_terminal, start_running_session

FILES = {"bin/hello": b"#!/bin/sh\necho hello from the add-on\n", "data/nested/ref.txt": b"reference data\n",
         "with space & ü.txt": b"odd name\n", "empty.txt": b""}


def tarball(files: dict[str, bytes], *, link: str = "", gz: bool = True) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz" if gz else "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o700  # unreadable to others: the appliance fixes that
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo("escape")
            info.type, info.linkname = tarfile.SYMTYPE, link
            tar.addfile(info)
    return out.getvalue()


async def upload(api: Api, metadata: Any, archive: bytes) -> tuple[int, Any]:
    form = aiohttp.FormData()
    form.add_field("metadata", json.dumps(metadata).encode(), filename="metadata.json", content_type="application/json")
    form.add_field("tarball", archive, filename="addon.tar.gz", content_type="application/gzip")
    return await api.post("/api/v2/runtimeaddons/custom", data=form)


async def sees_addon(api: Api, pid: str, sid: str) -> str:
    term = await open_terminal(api, pid, sid)
    await term.send("cat /runtime-addons/team-tools/data/nested/ref.txt '/runtime-addons/team-tools/with space & ü.txt';"
                    " sh /runtime-addons/team-tools/bin/hello; touch /runtime-addons/team-tools/mine || echo cannot-$((2*3))\n")
    return await term.expect("cannot-6")  # the add-on is read-only


async def test_an_addon_is_uploaded_and_mounted_read_only_into_sessions(admin: Api, alice: Api) -> None:
    status, body = await upload(alice, {"identifier": "team-tools"}, tarball(FILES))
    assert_error(status, body, 403)
    status, addon = await upload(admin, {"identifier": "team-tools", "display_name": "Team tools", "component": "Tools"},
                                 tarball(FILES))
    assert status == 200, addon
    assert addon["identifier"] == "team-tools" and addon["status"] == "AVAILABLE" and addon["component"] == "Tools"
    assert_error(*await upload(admin, {"identifier": "team-tools"}, tarball(FILES)), 409)
    for bad, why in ((tarball({"../outside.txt": b"x"}), "tar"), (tarball(FILES, link="/etc/passwd"), "links"),
                     (b"not an archive", "tar archive")):
        status, body = await upload(admin, {"identifier": f"bad-{len(bad)}"}, bad)
        assert_error(status, body, 400)
        assert why in body["message"], body
    assert_error(*await upload(admin, {"identifier": "../x"}, tarball(FILES)), 400)
    status, empty = await upload(admin, {"identifier": "empty"}, tarball({}))  # nothing in it: an empty add-on
    assert status == 200 and empty["status"] == "AVAILABLE", empty
    _, listed = await alice.get("/api/v2/runtimeaddons", params={"search_filter": json.dumps({"component": "Tools"})})
    assert [a["identifier"] for a in listed["runtime_addons"]] == ["team-tools"]

    _, project = await alice.post("/api/v2/projects", json={"name": "addons"})
    pid = project["id"]
    session = await start_running_session(alice, pid, runtime_identifier="host/python3",
                                          runtime_addon_identifiers=["team-tools"])
    screen = await sees_addon(alice, pid, session["id"])
    assert "reference data" in screen and "odd name" in screen and "hello from the add-on" in screen, screen
    await alice.post(f"/api/v2/projects/{pid}/sessions/{session['id']}:stop")

    status, body = await alice.post(f"/api/v2/projects/{pid}/sessions", json={"runtime_addon_identifiers": ["nope"]})
    assert_error(status, body, 400)
    status, body = await admin.post("/api/v2/runtimeaddons:updatestatus", json={"status": "DISABLED", "identifiers": ["team-tools"]})
    assert status == 200 and body == {"rows_affected": 1}, body
    status, body = await alice.post(f"/api/v2/projects/{pid}/sessions", json={"runtime_addon_identifiers": ["team-tools"]})
    assert_error(status, body, 400)
    assert "is disabled" in body["message"], body
    folder = alice.client.app[SETTINGS].data_dir / "runtime-addons" / str(addon["id"])
    assert (folder / "data" / "nested" / "ref.txt").is_file()
    await admin.post("/api/v2/runtimeaddons:updatestatus", json={"status": "DELETED", "ids": [addon["id"]]})
    assert not folder.exists()
    assert_error(*await admin.post("/api/v2/runtimeaddons:updatestatus", json={"status": "AVAILABLE", "ids": [addon["id"]]}), 404)


async def test_an_addon_is_mounted_into_a_container(aiohttp_client: Any, container_settings: Any) -> None:
    from cml_appliance.app import create_app

    client = await aiohttp_client(create_app(container_settings, allow_local_git=True))
    make = user_maker(client)
    admin, carl = await make("root", admin=True), await make("carl")
    status, addon = await upload(admin, {"identifier": "team-tools"}, tarball(FILES, gz=False))
    assert status == 200, addon
    _, project = await carl.post("/api/v2/projects", json={"name": "boxed addons"})
    session = await start_running_session(carl, project["id"], runtime_identifier=BUSYBOX_IMAGE,
                                          runtime_addon_identifiers=["team-tools"])
    screen = await sees_addon(carl, project["id"], session["id"])
    assert "reference data" in screen and "hello from the add-on" in screen, screen
    await carl.post(f"/api/v2/projects/{project['id']}/sessions/{session['id']}:stop")


async def test_an_addon_is_mounted_into_a_pod(kube_client: Any) -> None:
    """On the test cluster the node sees the appliance's disk (no projects volume), so the add-on
    is a read-only hostPath volume of the pod."""
    make = user_maker(kube_client)
    admin, kim = await make("root", admin=True), await make("kim")
    status, addon = await upload(admin, {"identifier": "team-tools"}, tarball(FILES))
    assert status == 200, addon
    _, project = await kim.post("/api/v2/projects", json={"name": "addons in a pod"})
    session = await start_running_session(kim, project["id"], runtime_identifier=BUSYBOX_IMAGE,
                                          runtime_addon_identifiers=["team-tools"])
    screen = await sees_addon(kim, project["id"], session["id"])
    assert "reference data" in screen and "odd name" in screen and "hello from the add-on" in screen, screen
    await kim.post(f"/api/v2/projects/{project['id']}/sessions/{session['id']}:stop")
