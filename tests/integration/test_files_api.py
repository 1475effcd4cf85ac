"""Project files over API v2: upload, list, download, move, delete, confined to the project."""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp

from cml_appliance.web.keys import PROJECTS, SETTINGS
from tests.conftest import Api, assert_error


def form(**files: bytes) -> aiohttp.FormData:
    data = aiohttp.FormData()
    for name, content in files.items():
        data.add_field(name, content, filename=os.path.basename(name), content_type="application/octet-stream")
    return data


def multipart(field: str, content: bytes, filename: str) -> aiohttp.FormData:
    data = aiohttp.FormData()
    data.add_field(field, content, filename=filename, content_type="application/octet-stream")
    return data


async def new_project(api: Api, name: str = "files") -> str:
    status, body = await api.post("/api/v2/projects", json={"name": name})
    assert status == 200, body
    return body["id"]


async def project_dir(api: Api, project_id: str) -> Path:
    return api.client.app[SETTINGS].projects_dir / project_id


async def test_upload_list_download_move_delete(alice: Api) -> None:
    pid = await new_project(alice)
    status, body = await alice.post(f"/api/v2/projects/{pid}/files", data=multipart("data/train.csv", b"a,b\n1,2\n", "x.csv"))
    assert status == 200, body
    assert body["files"] == [{"path": "data/train.csv", "is_dir": False, "file_size": "8"}]

    status, body = await alice.get(f"/api/v2/projects/{pid}/files")
    assert body == {"files": [{"path": "data", "is_dir": True}]}
    status, body = await alice.get(f"/api/v2/projects/{pid}/files/data")
    assert body["files"] == [{"path": "data/train.csv", "is_dir": False, "file_size": "8"}]

    status, content = await alice.post(f"/api/v2/projects/{pid}/files/data/train.csv:download")
    assert status == 200 and content == b"a,b\n1,2\n"

    status, moved = await alice.patch(f"/api/v2/projects/{pid}/files/data/train.csv", json={"path": "inputs/train.csv"})
    assert status == 200 and moved["path"] == "inputs/train.csv"
    status, body = await alice.get(f"/api/v2/projects/{pid}/files/data/train.csv")
    assert_error(status, body, 404)

    status, body = await alice.delete(f"/api/v2/projects/{pid}/files/inputs")
    assert (status, body) == (200, {})
    assert not (await project_dir(alice, pid) / "inputs").exists()


async def test_upload_overwrites_unless_asked_not_to(alice: Api) -> None:
    pid = await new_project(alice)
    await alice.post(f"/api/v2/projects/{pid}/files", data=multipart("a.txt", b"one", "a.txt"))
    await alice.post(f"/api/v2/projects/{pid}/files", data=multipart("a.txt", b"two", "a.txt"))
    _, content = await alice.post(f"/api/v2/projects/{pid}/files/a.txt:download")
    assert content == b"two"
    # CML's own behaviour on request: never overwrite, pick name(1).ext.
    status, body = await alice.post(
        f"/api/v2/projects/{pid}/files", data=multipart("a.txt", b"three", "a.txt"), params={"overwrite": "false"}
    )
    assert body["files"][0]["path"] == "a(1).txt"


async def test_swagger_style_file_field_uses_the_filename(alice: Api) -> None:
    pid = await new_project(alice)
    status, body = await alice.post(f"/api/v2/projects/{pid}/files", data=multipart("file", b"x", "notes.md"))
    assert status == 200 and body["files"][0]["path"] == "notes.md"


async def test_path_traversal_is_refused(alice: Api, tmp_path: Path) -> None:
    pid = await new_project(alice)
    root = await project_dir(alice, pid)
    outside = tmp_path / "secret.txt"
    outside.write_text("top secret")
    os.symlink(outside, root / "link-out")
    os.symlink(tmp_path, root / "dir-out")

    for name in ("../escape.txt", "a/../../x", "dir-out/planted.txt", "..\\..\\win.txt"):
        status, body = await alice.post(f"/api/v2/projects/{pid}/files", data=multipart(name, b"x", "x"))
        assert_error(status, body, 400)
    # aiohttp's multipart parser drops a leading "/" from field names: the file lands inside the project.
    status, body = await alice.post(f"/api/v2/projects/{pid}/files", data=multipart("/tmp/abs.txt", b"x", "x"))
    assert status == 200 and body["files"][0]["path"] == "tmp/abs.txt"
    assert (root / "tmp" / "abs.txt").exists()
    await alice.delete(f"/api/v2/projects/{pid}/files/tmp")
    assert not (tmp_path / "planted.txt").exists()
    assert not (root.parent / "escape.txt").exists()

    for path in ("..%2F..%2Fetc", "%2Fetc%2Fpasswd", "link-out", "dir-out"):
        status, body = await alice.get(f"/api/v2/projects/{pid}/files/{path}")
        assert_error(status, body, 400)
    status, body = await alice.post(f"/api/v2/projects/{pid}/files/link-out:download")
    assert_error(status, body, 400)
    status, body = await alice.patch(f"/api/v2/projects/{pid}/files/link-out", json={"path": "../../moved"})
    assert_error(status, body, 400)
    # The listing hides links that leave the project; deleting one removes the link, not its target.
    _, listing = await alice.get(f"/api/v2/projects/{pid}/files")
    assert listing["files"] == []
    status, _ = await alice.delete(f"/api/v2/projects/{pid}/files/link-out")
    assert status == 200 and outside.read_text() == "top secret"
    status, body = await alice.delete(f"/api/v2/projects/{pid}/files/..%2F{pid}")
    assert_error(status, body, 400)


async def test_oversized_upload_leaves_nothing(alice: Api) -> None:
    pid = await new_project(alice)
    root = await project_dir(alice, pid)
    too_big = b"x" * (alice.client.app[SETTINGS].max_upload_mb * 1024 * 1024 + 1)
    status, body = await alice.post(f"/api/v2/projects/{pid}/files", data=multipart("big.bin", too_big, "big.bin"))
    assert_error(status, body, 413)
    assert [p.name for p in root.iterdir()] == [".git"]  # the repository, and nothing else
    # An existing file is untouched by a failed replacement.
    await alice.post(f"/api/v2/projects/{pid}/files", data=multipart("keep.bin", b"original", "keep.bin"))
    status, _ = await alice.post(f"/api/v2/projects/{pid}/files", data=multipart("keep.bin", too_big, "keep.bin"))
    assert status == 413
    assert (root / "keep.bin").read_bytes() == b"original"
    assert sorted(p.name for p in root.iterdir()) == [".git", "keep.bin"]


async def test_bad_file_requests(alice: Api) -> None:
    pid = await new_project(alice)
    await alice.post(f"/api/v2/projects/{pid}/files", data=multipart("a.txt", b"1", "a.txt"))
    await alice.post(f"/api/v2/projects/{pid}/files", data=multipart("b.txt", b"2", "b.txt"))
    status, body = await alice.post(f"/api/v2/projects/{pid}/files", json={"a": 1})
    assert_error(status, body, 400)
    status, body = await alice.patch(f"/api/v2/projects/{pid}/files/a.txt", json={"path": "b.txt"})
    assert_error(status, body, 409)
    status, body = await alice.patch(f"/api/v2/projects/{pid}/files/a.txt", json={})
    assert_error(status, body, 400)
    status, body = await alice.patch(f"/api/v2/projects/{pid}/files/a.txt", json={"path": 3})
    assert_error(status, body, 400)
    status, body = await alice.get(f"/api/v2/projects/{pid}/files/nope")
    assert_error(status, body, 404)
    status, body = await alice.post(f"/api/v2/projects/{pid}/files/a.txt:explode")
    assert_error(status, body, 404)
    status, body = await alice.delete(f"/api/v2/projects/{pid}/files/")
    assert status in (400, 404, 405)


async def test_deleting_a_project_removes_its_files(alice: Api) -> None:
    pid = await new_project(alice)
    await alice.post(f"/api/v2/projects/{pid}/files", data=multipart("a.txt", b"1", "a.txt"))
    root = await project_dir(alice, pid)
    assert root.exists()
    await alice.delete(f"/api/v2/projects/{pid}")
    assert not root.exists()
    assert alice.client.app[PROJECTS].projects_dir.exists()
