"""A small client of the OCI distribution API: what the builder needs (manifests, configs,
blobs, uploads, cross-repository mounts, tags), over aiohttp.

It speaks to the backing registry directly (over its Unix socket: no credentials), or to any
registry that asks for Docker token auth, when given a user name and password: on a 401 with a
Bearer challenge it fetches a token from the realm and tries again, as podman does.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")
ACCEPT = ", ".join(MANIFEST_TYPES + INDEX_TYPES)
UPLOAD_CHUNK = 8 * 1024 * 1024


class RegistryError(Exception):
    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(f"registry answered {status}: {message}")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _challenge_params(header: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="([^"]*)"', header))


class RegistryClient:
    def __init__(self, session: aiohttp.ClientSession, base_url: str, *, username: str = "", password: str = ""):
        self.session = session
        self.base = base_url.rstrip("/")
        self.username = username
        self.password = password
        self._tokens: dict[str, str] = {}  # scope -> bearer token

    async def _request(self, method: str, path_or_url: str, *, scope: str, headers: dict[str, str] | None = None,
                       data: Any = None, params: dict[str, str] | None = None, ok: tuple[int, ...] = (200,)) -> aiohttp.ClientResponse:
        url = path_or_url if path_or_url.startswith("http") else self.base + path_or_url
        for attempt in range(2):
            sent = dict(headers or {})
            if scope in self._tokens:
                sent["Authorization"] = f"Bearer {self._tokens[scope]}"
            resp = await self.session.request(method, url, headers=sent, data=data, params=params, allow_redirects=True)
            if resp.status == 401 and attempt == 0 and self.username and not isinstance(data, AsyncIterator):
                challenge = resp.headers.get("WWW-Authenticate", "")
                await resp.release()
                if challenge.lower().startswith("bearer"):
                    await self._fetch_token(challenge, scope)
                    continue
            if resp.status not in ok:
                text = (await resp.text())[:500]
                resp.release()
                raise RegistryError(resp.status, text)
            return resp
        raise AssertionError("unreachable")

    async def _fetch_token(self, challenge: str, scope: str) -> None:
        params = _challenge_params(challenge)
        # Several scopes (a mount: push here, pull there) are asked for together, space-separated.
        query = [("service", params.get("service", ""))] + [("scope", s) for s in scope.split(" ") if s]
        async with self.session.get(params["realm"], params=query, headers={
                "Authorization": aiohttp.encode_basic_auth(self.username, self.password)}) as resp:
            if resp.status != 200:
                raise RegistryError(resp.status, "the token service refused: " + (await resp.text())[:300])
            body = await resp.json()
        self._tokens[scope] = body.get("token") or body["access_token"]

    @staticmethod
    def scope(repository: str, actions: str = "pull") -> str:
        return f"repository:{repository}:{actions}"

    # --- reading ----------------------------------------------------------------------------

    async def manifest(self, repository: str, reference: str) -> tuple[bytes, str, str]:
        """(raw bytes, media type, digest) of a manifest."""
        resp = await self._request("GET", f"/v2/{repository}/manifests/{reference}", scope=self.scope(repository),
                                   headers={"Accept": ACCEPT})
        async with resp:
            raw = await resp.read()
            media_type = resp.headers.get("Content-Type", "").split(";")[0] or json.loads(raw).get("mediaType", "")
        return raw, media_type, sha256_digest(raw)

    async def blob(self, repository: str, digest: str) -> bytes:
        resp = await self._request("GET", f"/v2/{repository}/blobs/{digest}", scope=self.scope(repository))
        async with resp:
            data = await resp.read()
        if sha256_digest(data) != digest:
            raise RegistryError(502, f"blob {digest} arrived with another digest")
        return data

    async def has_blob(self, repository: str, digest: str) -> bool:
        resp = await self._request("HEAD", f"/v2/{repository}/blobs/{digest}", scope=self.scope(repository), ok=(200, 404))
        async with resp:
            return resp.status == 200

    async def tags(self, repository: str) -> list[str]:
        resp = await self._request("GET", f"/v2/{repository}/tags/list", scope=self.scope(repository), ok=(200, 404))
        async with resp:
            return [] if resp.status == 404 else list((await resp.json()).get("tags") or [])

    # --- writing ----------------------------------------------------------------------------

    async def mount(self, repository: str, digest: str, source: str) -> bool:
        """Link a blob of `source` into `repository` without uploading it; False when the
        registry would rather have an upload (the blob is not there, or may not be read)."""
        scope = f"repository:{repository}:pull,push repository:{source}:pull"
        resp = await self._request("POST", f"/v2/{repository}/blobs/uploads/", scope=scope,
                                   params={"mount": digest, "from": source}, ok=(201, 202))
        async with resp:
            if resp.status == 201:
                return True
            location = resp.headers.get("Location", "")
        # An upload session was opened instead: cancel it, the caller uploads.
        if location:
            cancel = await self._request("DELETE", self._absolute(location), scope=scope, ok=(204, 404))
            cancel.release()
        return False

    async def push_blob(self, repository: str, data: bytes, digest: str | None = None) -> tuple[str, bool]:
        """Upload a blob unless the repository has it; (digest, whether bytes were sent)."""
        digest = digest or sha256_digest(data)
        if await self.has_blob(repository, digest):
            return digest, False
        scope = f"repository:{repository}:pull,push"
        resp = await self._request("POST", f"/v2/{repository}/blobs/uploads/", scope=scope, ok=(202,))
        async with resp:
            location = self._absolute(resp.headers["Location"])
        for start in range(0, len(data), UPLOAD_CHUNK) if len(data) > UPLOAD_CHUNK else ():
            chunk = data[start:start + UPLOAD_CHUNK]
            resp = await self._request("PATCH", location, scope=scope, data=chunk, ok=(202,), headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{start}-{start + len(chunk) - 1}"})
            async with resp:
                location = self._absolute(resp.headers["Location"])
        final = str(URL(location).update_query(digest=digest))
        body = data if len(data) <= UPLOAD_CHUNK else b""
        resp = await self._request("PUT", final, scope=scope, data=body, ok=(201,),
                                   headers={"Content-Type": "application/octet-stream"})
        resp.release()
        return digest, True

    async def push_blob_file(self, repository: str, path: Path, digest: str,
                             progress: Callable[[int], None] | None = None) -> bool:
        """Upload a file as a blob in chunks, unless the repository has it; whether bytes were sent.
        `progress` hears the bytes sent so far after each chunk."""
        if await self.has_blob(repository, digest):
            return False
        scope = f"repository:{repository}:pull,push"
        resp = await self._request("POST", f"/v2/{repository}/blobs/uploads/", scope=scope, ok=(202,))
        async with resp:
            location = self._absolute(resp.headers["Location"])
        sent = 0
        with open(path, "rb") as fh:
            while chunk := fh.read(UPLOAD_CHUNK):
                resp = await self._request("PATCH", location, scope=scope, data=chunk, ok=(202,), headers={
                    "Content-Type": "application/octet-stream", "Content-Range": f"{sent}-{sent + len(chunk) - 1}"})
                async with resp:
                    location = self._absolute(resp.headers["Location"])
                sent += len(chunk)
                if progress is not None:
                    progress(sent)
        resp = await self._request("PUT", str(URL(location).update_query(digest=digest)), scope=scope, data=b"", ok=(201,),
                                   headers={"Content-Type": "application/octet-stream"})
        resp.release()
        return True

    async def put_manifest(self, repository: str, reference: str, raw: bytes, media_type: str) -> str:
        resp = await self._request("PUT", f"/v2/{repository}/manifests/{reference}", scope=f"repository:{repository}:pull,push",
                                   data=raw, headers={"Content-Type": media_type}, ok=(201,))
        async with resp:
            return resp.headers.get("Docker-Content-Digest") or sha256_digest(raw)

    async def delete_manifest(self, repository: str, reference: str) -> bool:
        """Delete a tag's manifest (by digest, as the API wants); False when there was none."""
        if not reference.startswith("sha256:"):
            try:
                _, _, reference = await self.manifest(repository, reference)
            except RegistryError as exc:
                if exc.status == 404:
                    return False
                raise
        resp = await self._request("DELETE", f"/v2/{repository}/manifests/{reference}",
                                   scope=f"repository:{repository}:delete", ok=(202, 404))
        resp.release()
        return resp.status == 202

    def _absolute(self, location: str) -> str:
        return location if location.startswith("http") else self.base + location
