"""Git's smart HTTP for every project: /git/<owner>/<project slug>.git, through `git http-backend`.

HTTP Basic with the user name and an API v2 key as the password: clone and fetch need the read
role, push the write role. A project the caller cannot see is a 404, as everywhere. Only the
smart protocol's three paths are passed to git (never a file of the repository, never another
path), and `git http-backend` runs sandboxed (gitserver/repos.py). A push to the checked-out
branch updates the project's files when its working tree is clean (receive.denyCurrentBranch =
updateInstead), and is refused with git's own message otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from aiohttp import web

from cml_appliance.auth import api_keys
from cml_appliance.auth.permissions import Role
from cml_appliance.gitserver.repos import Repositories
from cml_appliance.projects import store as project_store
from cml_appliance.web.keys import GIT, POOL, PROJECTS, SETTINGS

log = logging.getLogger(__name__)

REALM = 'Basic realm="cml-appliance git", charset="UTF-8"'
SERVICES = {"git-upload-pack": Role.READ, "git-receive-pack": Role.WRITE}
CHUNK = 64 * 1024


def _text(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=message.rstrip("\n") + "\n", headers=headers)


def _service(request: web.Request, tail: str) -> str | None:
    """Which git service a smart-HTTP request asks for; None for anything else (the dumb
    protocol, a file of the repository, a path that is not git's)."""
    if tail == "info/refs" and request.method in ("GET", "HEAD"):
        service = request.query.get("service", "")
        return service if service in SERVICES else None
    if tail in SERVICES and request.method == "POST":
        return tail
    return None


async def smart_http(request: web.Request) -> web.StreamResponse:
    """GET/POST /git/{owner}/{slug}.git/{info/refs | git-upload-pack | git-receive-pack}."""
    service = _service(request, request.match_info["tail"])
    if service is None:
        return _text(404, "not a git smart-HTTP request: clone https://<host>/git/<owner>/<project>.git")
    pool = request.app[POOL]
    check = await api_keys.check_basic(pool, request.headers.get("Authorization", ""))
    if check.problem or check.user is None:
        return _text(401, check.problem, {"WWW-Authenticate": REALM})
    user = check.user
    project = await project_store.get_by_owner_slug(pool, user, request.match_info["owner"], request.match_info["slug"])
    if project is None or project.role < Role.READ:
        return _text(404, "repository not found")
    if project.role < SERVICES[service]:
        return _text(403, "you may read this project but not push to it: pushing needs the write role")
    if project.creation_status != "success":
        return _text(409, f"the project is not ready ({project.creation_status})")
    repos = request.app[GIT]
    project_dir = request.app[PROJECTS].directory(project)
    if not project_dir.is_dir():
        return _text(409, "the project has no files yet")
    await repos.ensure(project_dir)
    return await _run_backend(request, repos, project_dir, project.public_id, request.match_info["tail"], user.username,
                              request.app[SETTINGS].git_max_push_mb * 1024 * 1024)


async def _run_backend(request: web.Request, repos: Repositories, project_dir: Path, public_id: str, tail: str,
                       username: str, max_push: int) -> web.StreamResponse:
    env = {
        "GIT_PROJECT_ROOT": str(project_dir.parent), "GIT_HTTP_EXPORT_ALL": "1",
        "PATH_INFO": f"/{public_id}/{tail}", "REQUEST_METHOD": request.method,
        "QUERY_STRING": request.query_string, "CONTENT_TYPE": request.headers.get("Content-Type", ""),
        "REMOTE_USER": username, "REMOTE_ADDR": request.remote or "",
        "GIT_HTTP_MAX_REQUEST_BUFFER": str(max_push),
    }
    if request.headers.get("Content-Encoding"):
        env["HTTP_CONTENT_ENCODING"] = request.headers["Content-Encoding"]
    if request.headers.get("Git-Protocol"):
        env["GIT_PROTOCOL"] = request.headers["Git-Protocol"]
    config = ["-c", "receive.denyCurrentBranch=updateInstead", "-c", f"receive.maxInputSize={max_push}",
              "-c", "http.receivepack=true", "-c", "uploadpack.allowFilter=true",
              # A build fetches its snapshot by commit (refs/cml/ are hidden): any reader may
              # fetch an object by its id, as they may read every file of the project anyway.
              "-c", "uploadpack.allowAnySHA1InWant=true"]
    proc = await asyncio.create_subprocess_exec(
        *repos.command(project_dir, [*config, "http-backend"]), cwd=project_dir, env={**repos.environment(), **env},
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    too_large = False

    async def feed() -> None:
        nonlocal too_large
        sent = 0
        try:
            async for chunk in request.content.iter_chunked(CHUNK):
                sent += len(chunk)
                if sent > max_push:
                    too_large = True
                    break
                proc.stdin.write(chunk)
                await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # git stopped reading: its answer says why
        finally:
            with contextlib.suppress(OSError):
                proc.stdin.close()

    feeder = asyncio.ensure_future(feed())
    try:
        status, headers = await _cgi_headers(proc.stdout)
        if too_large:
            return _text(413, f"the push is larger than {max_push // (1024 * 1024)} MB (git_max_push_mb)")
        response = web.StreamResponse(status=status, headers=headers)
        response.headers["Cache-Control"] = "no-cache"
        await response.prepare(request)
        while chunk := await proc.stdout.read(CHUNK):
            await response.write(chunk)
        await feeder
        await response.write_eof()
        return response
    finally:
        feeder.cancel()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()
        stderr = await proc.stderr.read()
        if stderr.strip():
            log.info("git http-backend for project %s: %s", public_id, stderr.decode(errors="replace").strip()[:2000])


async def _cgi_headers(stdout: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """A CGI answer's head: "Status: 403 Forbidden" and headers, up to a blank line."""
    status, headers = 200, {}
    while True:
        line = (await stdout.readline()).decode("latin-1").rstrip("\r\n")
        if not line:
            return status, headers
        name, _, value = line.partition(":")
        if name.lower() == "status":
            status = int(value.strip().split()[0])
        else:
            headers[name.strip()] = value.strip()


def routes() -> list[web.RouteDef]:
    return [web.route("*", "/git/{owner}/{slug}.git/{tail:.*}", smart_http, name="git_smart_http")]
