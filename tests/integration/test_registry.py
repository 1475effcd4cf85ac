"""The registry: Debian's docker-registry run by the appliance on a socket in its data dir, and
the /v2/ proxy in front of it with Docker token auth, driven by our OCI client and by podman."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import aiohttp

from cml_appliance.registry.client import RegistryClient, RegistryError, sha256_digest
from cml_appliance.web.keys import REGISTRY, SETTINGS
from tests.conftest import Api, require_tool

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


async def push_tiny_image(client: RegistryClient, repository: str, tag: str, payload: bytes = b"layer bytes") -> str:
    """A one-layer image (not runnable; the registry does not care) pushed as `tag`."""
    layer, _ = await client.push_blob(repository, payload)
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [layer]},
                         "config": {}}).encode()
    config_digest, _ = await client.push_blob(repository, config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": len(payload)}],
    }).encode()
    return await client.put_manifest(repository, tag, manifest, OCI_MANIFEST)


async def test_the_embedded_registry_lives_on_a_socket_in_the_data_dir(client: Any) -> None:
    require_tool(shutil.which("docker-registry") is not None, "docker-registry (Debian package)")
    status = client.app[REGISTRY]
    assert status.endpoint is not None and status.endpoint.unix_socket, status
    socket_path = Path(status.endpoint.unix_socket)
    data_dir = client.app[SETTINGS].data_dir
    assert socket_path.is_relative_to(data_dir) and stat.S_ISSOCK(socket_path.stat().st_mode)
    assert stat.S_IMODE((data_dir / "registry").stat().st_mode) == 0o700
    resp = await client.get("/readyz")
    assert (await resp.json())["registry"] == "embedded"


async def test_token_auth_grants_what_the_project_role_allows(alice: Api, bob: Api, make_user: Any) -> None:
    require_tool(shutil.which("docker-registry") is not None, "docker-registry (Debian package)")
    client = alice.client
    _, project = await alice.post("/api/v2/projects", json={"name": "Images"})
    repo = f"alice/{project['slug']}/model"
    base = str(client.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as http:
        # The base answers a challenge that names the token endpoint.
        async with http.get(base + "/v2/") as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"].startswith(f'Bearer realm="{base}/v2/token",service="cml-appliance"')
        async with http.get(base + "/v2/token", params={"scope": f"repository:{repo}:pull,push"}) as resp:
            assert resp.status == 401  # no credentials
        owner = RegistryClient(http, base, username="alice", password=alice.key)
        digest = await push_tiny_image(owner, repo, "v1")
        raw, media_type, got = await owner.manifest(repo, "v1")
        assert got == digest and media_type == OCI_MANIFEST
        assert await owner.tags(repo) == ["v1"]
        # Bob sees nothing until he is a collaborator; then he pulls, but may not push.
        outsider = RegistryClient(http, base, username="bob", password=bob.key)
        for attempt in (outsider.manifest(repo, "v1"), push_tiny_image(outsider, repo, "bob")):
            try:
                await attempt
            except RegistryError as exc:
                assert exc.status in (401, 403)
            else:
                raise AssertionError("a stranger reached another user's repository")
        await alice.put(f"/api/v2/projects/{project['id']}/collaborators/bob", json={"permission": "read"})
        reader = RegistryClient(http, base, username="bob", password=bob.key)
        assert (await reader.manifest(repo, "v1"))[2] == digest
        try:
            await push_tiny_image(reader, repo, "bob")
        except RegistryError as exc:
            assert exc.status in (401, 403)
        else:
            raise AssertionError("a reader pushed")
        # The token says exactly what was granted.
        async with http.get(base + "/v2/token", params={"scope": f"repository:{repo}:pull,push", "service": "cml-appliance"},
                            headers=basic("bob", bob.key)) as resp:
            body = await resp.json()
            assert resp.status == 200 and body["expires_in"] == 300 and body["token"] == body["access_token"]
        # Another user's key under alice's name is no credential at all.
        async with http.get(base + "/v2/token", params={"scope": f"repository:{repo}:pull"},
                            headers=basic("alice", bob.key)) as resp:
            assert resp.status == 401
        # A blob of alice's cannot be mounted into carol's repository: it becomes an upload.
        carol = await make_user("carol")
        _, theirs = await carol.post("/api/v2/projects", json={"name": "Theirs"})
        carols = RegistryClient(http, base, username="carol", password=carol.key)
        layer = sha256_digest(b"layer bytes")
        assert await carols.mount(f"carol/{theirs['slug']}/copy", layer, repo) is False
        assert await owner.mount(f"alice/{project['slug']}/copy", layer, repo) is True
        # No catalog of everyone's repositories; names outside projects are refused.
        async with http.get(base + "/v2/_catalog", headers=basic("alice", alice.key)) as resp:
            assert resp.status == 403
        async with http.get(base + "/v2/library/busybox/manifests/latest", headers=basic("alice", alice.key)) as resp:
            assert resp.status in (401, 403, 404)
        # A range request streams part of a blob; an unknown digest is a 404, not a 500.
        async with http.get(base + f"/v2/{repo}/blobs/{layer}", headers={"Range": "bytes=0-4", **basic("alice", alice.key)}) as resp:
            assert resp.status == 206 and await resp.read() == b"layer"
        async with http.get(base + f"/v2/{repo}/blobs/sha256:{'0' * 64}", headers=basic("alice", alice.key)) as resp:
            assert resp.status == 404
        # Deleting a tag's manifest needs the write role.
        assert await owner.delete_manifest(repo, "v1") is True


async def test_podman_pushes_and_pulls_through_the_appliance(alice: Api, bob: Api, busybox_image: str, tmp_path: Path) -> None:
    """The real podman: login with an API key, push a runnable image through the proxy (chunked
    uploads, mounts), pull it back and run it; another user's login pulls nothing."""
    from tests.conftest import _podman_env, podman_cli

    require_tool(shutil.which("docker-registry") is not None, "docker-registry (Debian package)")
    client = alice.client
    _, project = await alice.post("/api/v2/projects", json={"name": "Pulled"})
    host = f"127.0.0.1:{client.server.port}"
    image = f"{host}/alice/{project['slug']}/busybox:1"
    env = {**_podman_env(), "REGISTRY_AUTH_FILE": str(tmp_path / "auth.json")}

    def podman(*args: str, stdin: str = "") -> Any:
        return podman_cli(env, *args, stdin=stdin)

    code, out = await podman("login", "--tls-verify=false", "-u", "alice", "--password-stdin", host, stdin=alice.key)
    assert code == 0 and "Login Succeeded" in out, out
    code, out = await podman("tag", busybox_image, image)
    assert code == 0, out
    code, out = await podman("push", "--tls-verify=false", image)
    assert code == 0, out
    code, out = await podman("rmi", image)
    assert code == 0, out
    code, out = await podman("pull", "--tls-verify=false", image)
    assert code == 0, out
    code, out = await podman("run", "--rm", image, "echo", "pulled through the appliance")
    assert code == 0 and "pulled through the appliance" in out, out
    await podman("rmi", image)
    code, out = await podman("login", "--tls-verify=false", "-u", "bob", "--password-stdin", host, stdin=bob.key)
    assert code == 0, out
    code, out = await podman("pull", "--tls-verify=false", image)
    assert code != 0 and any(word in out.lower() for word in ("denied", "unauthorized", "not found")), out


async def test_oversized_uploads_and_unknown_things_are_clear_4xx(aiohttp_client: Any, settings: Any) -> None:
    """A layer past registry_max_upload_mb is refused (413, whether its size is said up front or
    not) and leaves no blob; unknown digests, tags and repositories are 404s, never a 500."""
    import dataclasses

    from cml_appliance.app import create_app
    from tests.conftest import user_maker

    require_tool(shutil.which("docker-registry") is not None, "docker-registry (Debian package)")
    client = await aiohttp_client(create_app(dataclasses.replace(settings, registry_max_upload_mb=1), allow_local_git=True))
    alice = await user_maker(client)("alice")
    _, project = await alice.post("/api/v2/projects", json={"name": "Limits"})
    repo = f"alice/{project['slug']}/big"
    base = str(client.make_url("")).rstrip("/")
    big = os.urandom(2 * 1024 * 1024)
    async with aiohttp.ClientSession() as http:
        owner = RegistryClient(http, base, username="alice", password=alice.key)
        for attempt in (owner.push_blob(repo, big), owner.push_blob_file(repo, _write(big), sha256_digest(big))):
            try:
                await attempt
            except RegistryError as exc:
                assert exc.status == 413 and "registry_max_upload_mb" in str(exc), exc
            else:
                raise AssertionError("an oversized layer was taken")
        assert await owner.has_blob(repo, sha256_digest(big)) is False
        # A streamed body with no length said up front is cut off too.
        token = await _token(http, base, alice, repo)
        async with http.post(f"{base}/v2/{repo}/blobs/uploads/", headers={"Authorization": f"Bearer {token}"}) as resp:
            location = resp.headers["Location"]

        async def stream() -> Any:
            for start in range(0, len(big), 256 * 1024):
                yield big[start:start + 256 * 1024]

        async with http.patch(base + location, data=stream(), headers={"Authorization": f"Bearer {token}",
                                                                         "Content-Type": "application/octet-stream"}) as resp:
            assert resp.status == 413, await resp.text()
        # Small things still work; unknown ones are 404s.
        assert (await push_tiny_image(owner, repo, "small")).startswith("sha256:")
        for path in (f"/v2/{repo}/manifests/nosuchtag", f"/v2/{repo}/blobs/sha256:{'1' * 64}",
                     f"/v2/alice/{project['slug']}/nothing/manifests/latest", f"/v2/{repo}/manifests/sha256:{'2' * 64}"):
            async with http.get(base + path, headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status in (401, 404), (path, resp.status)  # 401: a repository the token does not name


def _write(data: bytes) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="cml-registry-test-")) / "blob"
    path.write_bytes(data)
    return path


def basic(username: str, password: str) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(username, password)}


async def _token(http: aiohttp.ClientSession, base: str, api: Api, repo: str) -> str:
    async with http.get(base + "/v2/token", params={"scope": f"repository:{repo}:pull,push", "service": "cml-appliance"},
                        headers=basic(api.username, api.key)) as resp:
        return str((await resp.json())["token"])
