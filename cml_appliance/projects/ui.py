"""Pages: the project list, creating a project, and a project's files, collaborators and settings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp_jinja2
from aiohttp import BodyPartReader, MultipartReader, web

from cml_appliance.api.bodies import open_multipart
from cml_appliance.api.listing import ListQuery
from cml_appliance.auth.permissions import PERMISSION_NAMES, Role
from cml_appliance.core.errors import AppError, InvalidArgument
from cml_appliance.applications.service import app_status
from cml_appliance.projects import files, readme
from cml_appliance.projects.service import VISIBILITIES
from cml_appliance.projects.store import Project
from cml_appliance.web.context import check_csrf, current_user
from cml_appliance.web.keys import AMPS, APPLICATIONS, MODELS, POOL, PROJECTS, SETTINGS, TEAMS
from cml_appliance.workloads import store as workload_store
from cml_appliance.web.templating import redirect

PAGE_SIZE = 20
MAX_VIEW_BYTES = 512 * 1024
OVERVIEW_FILES = 24
INLINE_IMAGES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif", ".webp": "image/webp"}


async def project_list(request: web.Request) -> web.StreamResponse:
    user = current_user(request)
    search = request.query.get("q", "").strip()
    try:
        page_no = max(1, int(request.query.get("page", "1")))
    except ValueError:
        page_no = 1
    q = ListQuery(PAGE_SIZE, (page_no - 1) * PAGE_SIZE, {"name": search} if search else {}, [], "")
    projects, more = await request.app[PROJECTS].list_projects(user, q, include_public=True, include_all=False)

    def page_link(n: int) -> str:
        return "/projects?" + urlencode({"q": search, "page": n} if search else {"page": n})

    return aiohttp_jinja2.render_template(
        "projects.html",
        request,
        {
            "projects": projects,
            "search": search,
            "page_no": page_no,
            "prev_link": page_link(page_no - 1) if page_no > 1 else "",
            "next_link": page_link(page_no + 1) if more else "",
        },
    )


async def new_project_page(request: web.Request, *, error: str = "", form: dict[str, str] | None = None, status: int = 200) -> web.StreamResponse:
    user = current_user(request)
    # Who may own it: the user, or a team in which they hold write or admin.
    teams, _ = await request.app[TEAMS].list(member_of=user, limit=200)
    owners = [t.username for t in teams if await request.app[TEAMS].role_of(t, user) in ("write", "admin")]
    return aiohttp_jinja2.render_template(
        "project_new.html", request,
        {"error": error, "form": form or {}, "visibilities": VISIBILITIES, "team_owners": owners}, status=status
    )


async def _form_fields(reader: MultipartReader, request: web.Request) -> tuple[dict[str, str], BodyPartReader | None]:
    """Read plain fields up to the first file part; the CSRF token must come first."""
    fields: dict[str, str] = {}
    checked = False
    async for part in reader:
        if not isinstance(part, BodyPartReader):
            continue
        if part.filename is not None:
            if not checked:
                check_csrf(request, "")
            return fields, part
        value = (await part.read(decode=True)).decode(errors="replace")
        if part.name == "csrf_token":
            check_csrf(request, value)
            checked = True
        elif part.name:
            fields[part.name] = value[:10_000]
    if not checked:
        check_csrf(request, "")
    return fields, None


async def _chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(256 * 1024):
        yield chunk


async def _write_parts(request: web.Request, root: Any, first: BodyPartReader | None, reader: MultipartReader, folder: str) -> int:
    limit = request.app[SETTINGS].max_upload_mb * 1024 * 1024
    count = 0
    part: Any = first
    while part is not None:
        if isinstance(part, BodyPartReader) and part.filename:
            await files.write_upload(root, str(PurePosixPath(folder) / PurePosixPath(part.filename).name), _chunks(part), limit)
            count += 1
        part = await reader.next()
    return count


async def create_project(request: web.Request) -> web.StreamResponse:
    user = current_user(request)
    reader: MultipartReader | None = None
    first_file: BodyPartReader | None = None
    if request.content_type == "multipart/form-data":
        reader = await open_multipart(request)
        fields, first_file = await _form_fields(reader, request)
    else:  # a plain form (no files); the csrf middleware has checked its token
        fields = await _form(request)
    template = fields.get("template", "blank")
    body = {
        "name": fields.get("name", ""),
        "description": fields.get("description", ""),
        "visibility": fields.get("visibility", "private"),
        "template": "local" if template == "upload" else template,
    }
    if fields.get("team_name"):
        body["team_name"] = fields["team_name"]
    if template in ("git", "amp"):
        body["git_url"] = fields.get("git_url", "").strip()
    service = request.app[PROJECTS]
    try:
        if template == "amp":
            project = await request.app[AMPS].create(user, {
                "create_project_request": body, "configure_prototype_request": {"execute_amp_steps": bool(fields.get("execute_amp_steps"))}})
        else:
            project = await service.create(user, body)
    except AppError as exc:
        return await new_project_page(request, error=exc.message, form=fields, status=exc.status)
    uploaded = 0
    if template == "upload" and reader is not None:
        try:
            uploaded = await _write_parts(request, service.directory(project), first_file, reader, "")
        except AppError as exc:
            raise redirect(request, f"/projects/{project.public_id}", "error", f"Project created, but the upload failed: {exc.message}") from None
    note = f" with {uploaded} file(s)" if uploaded else ""
    if template == "git":
        note = "; cloning the repository now"
    elif template == "amp":
        note = "; cloning the AMP, then setting it up"
    raise redirect(request, f"/projects/{project.public_id}", "ok", f"Created project {project.name}{note}.") from None


async def _project(request: web.Request, needed: Role = Role.READ) -> Project:
    return await request.app[PROJECTS].get(current_user(request), request.match_info["project_id"], needed)


def _crumbs(path: str) -> list[tuple[str, str]]:
    parts = [p for p in path.split("/") if p]
    return [(name, "/".join(parts[: i + 1])) for i, name in enumerate(parts)]


def _files_url(project: Project, folder: str) -> str:
    return f"/projects/{project.public_id}/files" + (f"/{quote(folder)}" if folder else "")


def _base_context(project: Project) -> dict[str, Any]:
    return {"project": project, "can_write": project.role >= Role.WRITE, "can_admin": project.role >= Role.ADMIN, "quote": quote}


async def project_page(request: web.Request) -> web.StreamResponse:
    """The overview: what runs now, recent sessions and runs, and the README."""
    user = current_user(request)
    project = await _project(request)
    pool = request.app[POOL]
    active = await workload_store.project_activity(pool, project.id, active=True, limit=50)
    recent = await workload_store.project_activity(pool, project.id, active=False, limit=10)
    _, app_pairs, _ = await request.app[APPLICATIONS].list_for_project(user, project.public_id, ListQuery.first(100))
    models = await request.app[MODELS].summaries(user, project.public_id)
    root = request.app[PROJECTS].directory(project)
    ready = root.exists() and project.creation_status != "creating"
    readme_name = readme.find(root) if ready else None
    entries = files.list_dir(root, "") if ready else []
    context = _base_context(project) | {
        "active_sessions": [a.workload for a in active if a.workload.kind == "session"],
        "active_runs": [{"run": a.workload, "job_public_id": a.job_public_id, "job_name": a.job_name}
                        for a in active if a.workload.kind == "job_run"],
        "recent": recent,
        "apps": [(a, run, app_status(a, run)) for a, run in app_pairs if app_status(a, run) != "APPLICATION_STOPPED"],
        "models": [m for m in models if m["deployment"] is not None and not m["deployment"].stopped],
        "top_files": entries[:OVERVIEW_FILES], "more_files": max(0, len(entries) - OVERVIEW_FILES),
        "readme_name": readme_name,
        "readme_html": readme.render(root, readme_name, project.public_id) if readme_name else "",
    }
    return aiohttp_jinja2.render_template("project.html", request, context)


async def files_page(request: web.Request) -> web.StreamResponse:
    project = await _project(request)
    path = files.clean_relative(request.match_info.get("path", ""))
    root = request.app[PROJECTS].directory(project)
    crumbs = _crumbs(path)
    context = _base_context(project) | {
        "path": path, "crumbs": crumbs,
        "file_crumbs": [(name, f"/projects/{project.public_id}/files/{quote(sub)}") for name, sub in crumbs],
    }
    if root.exists():
        target = files.resolve(root, path)
        if target.is_dir():
            context["entries"] = files.list_dir(root, path)
        else:
            context["file"] = files.file_info(root, path)
            with open(target, "rb") as fh:
                raw = fh.read(MAX_VIEW_BYTES + 4)
            size = target.stat().st_size
            text = _as_text(raw[:MAX_VIEW_BYTES] if size > MAX_VIEW_BYTES else raw)
            context["text"] = text
            context["truncated"] = text is not None and size > MAX_VIEW_BYTES
    else:
        context["entries"] = []
    return aiohttp_jinja2.render_template("project_files.html", request, context)


def _as_text(raw: bytes) -> str | None:
    """The bytes as text, or None for a binary file (NUL bytes, or not UTF-8 apart from a cut end)."""
    if b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start >= len(raw) - 3:  # a character cut by the view's limit
            return raw[: exc.start].decode("utf-8")
        return None


async def collaborators_page(request: web.Request) -> web.StreamResponse:
    project = await _project(request)
    rows, _ = await request.app[PROJECTS].list_collaborators(current_user(request), project.public_id, ListQuery(200, 0, {}, [], ""))
    context = _base_context(project) | {"collaborators": rows, "permissions": PERMISSION_NAMES}
    return aiohttp_jinja2.render_template("project_collaborators.html", request, context)


async def settings_page(request: web.Request) -> web.StreamResponse:
    project = await _project(request)
    context = _base_context(project) | {
        "visibilities": VISIBILITIES, "env_text": "\n".join(f"{k}={v}" for k, v in sorted(project.environment.items())),
    }
    return aiohttp_jinja2.render_template("project_settings.html", request, context)


async def upload(request: web.Request) -> web.StreamResponse:
    project = await _project(request, Role.WRITE)
    folder = files.clean_relative(request.query.get("path", ""))
    back = _files_url(project, folder)
    if request.content_type != "multipart/form-data":
        raise InvalidArgument("the form must be sent as multipart/form-data")
    reader = await open_multipart(request)
    _, first_file = await _form_fields(reader, request)
    try:
        count = await _write_parts(request, request.app[PROJECTS].directory(project), first_file, reader, folder)
    except AppError as exc:
        raise redirect(request, back, "error", f"Upload failed: {exc.message}") from None
    if not count:
        raise redirect(request, back, "error", "Choose at least one file to upload.") from None
    raise redirect(request, back, "ok", f"Uploaded {count} file(s).") from None


async def _form(request: web.Request) -> dict[str, str]:
    return {k: str(v) for k, v in (await request.post()).items()}


async def delete_file(request: web.Request) -> web.StreamResponse:
    project = await _project(request, Role.WRITE)
    form = await _form(request)
    path = files.clean_relative(form.get("path") or request.query.get("path", ""))
    parent = str(PurePosixPath(path).parent) if "/" in path else ""
    back = _files_url(project, parent)
    try:
        files.delete(request.app[PROJECTS].directory(project), path)
    except AppError as exc:
        raise redirect(request, back, "error", exc.message) from None
    raise redirect(request, back, "ok", f"Deleted {path}.") from None


async def make_dir(request: web.Request) -> web.StreamResponse:
    project = await _project(request, Role.WRITE)
    form = await _form(request)
    folder = files.clean_relative(form.get("folder", ""))
    back = _files_url(project, folder)
    try:
        files.make_dir(request.app[PROJECTS].directory(project), str(PurePosixPath(folder) / form.get("name", "").strip()))
    except AppError as exc:
        raise redirect(request, back, "error", exc.message) from None
    raise redirect(request, back, "ok", "Folder created.") from None


async def download(request: web.Request) -> web.StreamResponse:
    project = await _project(request)
    target = files.resolve(request.app[PROJECTS].directory(project), request.match_info["path"])
    if target.is_dir():
        raise InvalidArgument("only files can be downloaded")
    # Only raster images open in the page (a README's pictures); everything else, HTML and SVG
    # above all, is a download, so a project's content never runs on the UI's origin.
    inline = request.query.get("inline") == "1" and target.suffix.lower() in INLINE_IMAGES
    headers = {"Content-Disposition": content_disposition("inline" if inline else "attachment", target.name),
               "X-Content-Type-Options": "nosniff"}
    if inline:
        headers["Content-Type"] = INLINE_IMAGES[target.suffix.lower()]
    return web.FileResponse(target, headers=headers)


def content_disposition(kind: str, name: str) -> str:
    """RFC 6266: an ASCII fallback name and the real one (RFC 5987), whatever characters it has."""
    fallback = "".join(ch if 32 <= ord(ch) < 127 and ch not in '"\\%;' else "_" for ch in name) or "download"
    return f"{kind}; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


async def put_collaborator(request: web.Request) -> web.StreamResponse:
    project = await _project(request, Role.ADMIN)
    form = await _form(request)
    username = form.get("username", "").strip().lower()
    try:
        await request.app[PROJECTS].put_collaborator(current_user(request), project.public_id, username, form.get("permission", ""))
    except AppError as exc:
        raise redirect(request, f"/projects/{project.public_id}/collaborators", "error", exc.message) from None
    raise redirect(request, f"/projects/{project.public_id}/collaborators", "ok", f"{username} is now a collaborator.") from None


async def delete_collaborator(request: web.Request) -> web.StreamResponse:
    project = await _project(request, Role.ADMIN)
    username = request.match_info["username"]
    await request.app[PROJECTS].delete_collaborator(current_user(request), project.public_id, username)
    raise redirect(request, f"/projects/{project.public_id}/collaborators", "ok", f"Removed {username}.") from None


def parse_env_text(text: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep:
            raise InvalidArgument(f"line {n}: write NAME=value")
        env[name.strip()] = value.strip()
    return env


async def save_environment(request: web.Request) -> web.StreamResponse:
    project = await _project(request, Role.WRITE)
    form = await _form(request)
    back = f"/projects/{project.public_id}/settings"
    try:
        await request.app[PROJECTS].set_environment(current_user(request), project.public_id, parse_env_text(form.get("environment", "")))
    except AppError as exc:
        raise redirect(request, back, "error", f"Environment not saved: {exc.message}") from None
    raise redirect(request, back, "ok", "Environment variables saved.") from None


async def save_settings(request: web.Request) -> web.StreamResponse:
    project = await _project(request, Role.WRITE)
    form = await _form(request)
    back = f"/projects/{project.public_id}/settings"
    fields: dict[str, Any] = {k: form[k] for k in ("name", "description", "visibility") if k in form}
    try:
        await request.app[PROJECTS].update(current_user(request), project.public_id, fields)
    except AppError as exc:
        raise redirect(request, back, "error", exc.message) from None
    raise redirect(request, back, "ok", "Project settings saved.") from None


async def delete_project(request: web.Request) -> web.StreamResponse:
    project = await _project(request, Role.ADMIN)
    form = await _form(request)
    if form.get("confirm_name", "") != project.name:
        raise redirect(request, f"/projects/{project.public_id}/settings", "error", "Type the project's name to confirm deletion.") from None
    await request.app[PROJECTS].delete(current_user(request), project.public_id)
    raise redirect(request, "/projects", "ok", f"Deleted project {project.name}.") from None


def routes() -> list[web.RouteDef]:
    base = "/projects/{project_id}"
    return [
        web.get("/projects", project_list, name="ui_projects"),
        web.get("/projects/new", new_project_page, name="ui_project_new"),
        web.post("/projects/new", create_project, name="ui_project_create"),
        web.get(base, project_page, name="ui_project"),
        web.get(base + "/files", files_page, name="ui_project_files_root"),
        web.get(base + "/files/{path:.*}", files_page, name="ui_project_files"),
        web.get(base + "/collaborators", collaborators_page, name="ui_project_collaborators"),
        web.get(base + "/settings", settings_page, name="ui_project_settings_page"),
        web.get(base + "/download/{path:.+}", download, name="ui_project_download"),
        web.post(base + "/upload", upload, name="ui_project_upload"),
        web.post(base + "/delete-file", delete_file, name="ui_project_delete_file"),
        web.post(base + "/mkdir", make_dir, name="ui_project_mkdir"),
        web.post(base + "/collaborators", put_collaborator, name="ui_project_collaborator_put"),
        web.post(base + "/collaborators/{username}/delete", delete_collaborator, name="ui_project_collaborator_delete"),
        web.post(base + "/environment", save_environment, name="ui_project_environment"),
        web.post(base + "/settings", save_settings, name="ui_project_settings"),
        web.post(base + "/delete", delete_project, name="ui_project_delete"),
    ]
