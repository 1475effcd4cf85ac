"""The authorization matrix, generated from the router: every API and page route × anonymous,
another user, viewer, operator, contributor, project admin, owner, site admin, and a workload's
own key (its project, another project). Each answer must match the rule tests/integration/
authz_table.py gives the route, and every route must have a rule.

A refusal is 401 (no credentials; a page redirects to sign-in instead), 403 or 404 (no access
reads as not found); any other answer (200, 302, 400,
409, 503, ...) means the permission check let the caller through. Refusals are checked for every
principal; the way through is checked for the weakest principal the rule allows (one call each,
so the routes that delete or stop things are called last, on objects made for them).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import secrets
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from cml_appliance.auth import api_keys, users
from cml_appliance.web.keys import DIAGNOSTICS, POOL, PROJECTS
from tests.conftest import Api, wait_build
from tests.integration.authz_table import MLFLOW_RULE, RULES

CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')
ROLES = ["read", "operator", "write", "admin"]
PROJECT_RULES = set(ROLES) | {"session_owner"}


@dataclasses.dataclass
class Principal:
    name: str
    user: str | None  # None: anonymous
    role: str | None = None  # on the project: read .. admin, "owner", or None
    site_admin: bool = False
    workload_key_for: str | None = None  # "own" or "other": a workload's key scoped to that project
    key: str = ""
    session: aiohttp.ClientSession | None = None
    csrf: str = ""


def allowed(rule: str, who: Principal, route_name: str) -> bool:
    ui = route_name.startswith("ui_") or route_name in ("index",)
    if who.workload_key_for and ui:
        return False  # keys do not open pages (not used there)
    if rule == "public":
        return True
    if who.workload_key_for == "ended":
        return False
    if rule == "own_auth":  # checks its own credentials: without any, a refusal
        return who.user is not None
    if who.user is None:
        return False
    if rule == "signed_in":
        return True
    if rule == "user_not_workload":
        return who.workload_key_for is None
    if rule == "site_admin":
        return who.site_admin
    if rule == "self":
        return True  # each principal calls it with its own username (another's is checked below)
    if rule == "team_admin":
        return (who.role == "owner" or who.site_admin) and not who.workload_key_for  # the owner made the team
    if rule == "session_creator":
        return who.role == "owner" or who.workload_key_for == "own"  # the session is the owner's
    if rule == "registered_model_owner" and who.workload_key_for == "other":
        return True  # not a project's: the key acts as its user, the model's owner
    if who.workload_key_for == "other":
        return False
    if who.site_admin or who.role == "owner" or who.workload_key_for == "own":
        return True
    if who.role is None:
        return False
    if rule == "session_owner":
        return who.role == "admin"  # the session is the owner's
    if rule == "registered_model_owner":
        return False  # the model is the owner's (allowed above), private
    return ROLES.index(who.role) >= ROLES.index(rule)


async def _world(client: TestClient, owner: Api) -> dict[str, str]:
    """A project with something of every kind; ids by path parameter name."""
    _, project = await owner.post("/api/v2/projects", json={"name": f"matrix {secrets.token_hex(4)}"})
    pid = project["id"]
    root = client.app[PROJECTS].projects_dir / pid
    (root / "job.py").write_text("import time\ntime.sleep(60)\n")
    (root / "app.py").write_text("import time\ntime.sleep(60)\n")
    (root / "predict.py").write_text("def predict(a):\n    return a\n")
    (root / "notes.txt").write_text("notes\n")
    _, job = await owner.post(f"/api/v2/projects/{pid}/jobs", json={"name": "j", "script": "job.py"})
    _, run = await owner.post(f"/api/v2/projects/{pid}/jobs/{job['id']}/runs", json={})
    _, session = await owner.post(f"/api/v2/projects/{pid}/sessions", json={"runtime_identifier": "host/python3"})
    _, app = await owner.post(f"/api/v2/projects/{pid}/applications", json={"name": "a", "subdomain": f"a{secrets.token_hex(4)}", "script": "app.py"})
    _, model = await owner.post(f"/api/v2/projects/{pid}/models", json={
        "name": "m", "auto_build_model": True, "auto_build_config": {"file_path": "predict.py", "function_name": "predict"},
        "auto_deploy_model": True, "auto_deployment_config": {"replicas": 1}})
    build_id = (await wait_build(owner, pid, model["id"], deployed=True))["id"]
    _, deployments = await owner.get(f"/api/v2/projects/{pid}/models/{model['id']}/builds/{build_id}/deployments")
    replica_id = await client.app[POOL].fetchval(
        "SELECT public_id FROM workloads WHERE kind = 'model_replica' ORDER BY id DESC LIMIT 1")
    # An experiment with a run that logged a metric, a file and a model, registered (privately).
    _, experiment = await owner.post(f"/api/v2/projects/{pid}/experiments", json={"name": "e"})
    eid = experiment["id"]
    _, exp_run = await owner.post(f"/api/v2/projects/{pid}/experiments/{eid}/runs", json={})
    await owner.post(f"/api/v2/projects/{pid}/experiments/{eid}/runs/{exp_run['id']}:logbatch",
                     json={"metrics": [{"key": "loss", "value": 0.5}]})
    artifacts = f"/mlflow/{pid}/api/2.0/mlflow-artifacts/artifacts/{eid}/{exp_run['id']}/artifacts"
    for name, body in (("notes.txt", b"notes"), ("model/MLmodel", b"flavors: {}\n")):
        await owner.put(f"{artifacts}/{name}", data=body)
    _, team = await owner.post("/api/v2/site/teams", json={"username": f"team{secrets.token_hex(4)}"})
    owner_id = await client.app[POOL].fetchval("SELECT id FROM users WHERE username = $1", owner.username)
    bundle = await client.app[DIAGNOSTICS].request(owner_id, None, None)
    for _ in range(200):
        if (await client.app[DIAGNOSTICS].get(bundle["public_id"]))["status"] != "DIAG_IN_PROGRESS":
            break
        await asyncio.sleep(0.05)
    accelerator_id = await client.app[POOL].fetchval(
        "INSERT INTO accelerator_labels (label_key, label_value) VALUES ('nvidia.com/gpu.product', $1) RETURNING id",
        f"matrix-{secrets.token_hex(4)}")
    credential_id = await client.app[POOL].fetchval(
        "INSERT INTO docker_credentials (name, server, username, password_sealed) VALUES ($1, 'r.example.com', 'u', 'x')"
        " RETURNING id", f"matrix {secrets.token_hex(4)}")
    _, registered = await owner.post("/api/v2/registry/models", json={
        "project_id": pid, "run_id": exp_run["id"], "model_path": "model", "model_name": f"m{secrets.token_hex(4)}"})
    return {
        "project_id": pid, "job_id": job["id"], "run_id": run["id"], "session_id": session["id"], "app_id": app["id"],
        "model_id": model["id"], "build_id": build_id, "deployment_id": deployments["model_deployments"][0]["id"],
        "replica_id": replica_id, "path": "notes.txt", "owner": "owner", "slug": project["slug"],
        "experiment_id": eid, "experiment_run_id": exp_run["id"], "metric_key": "loss",
        "registered_model_id": registered["model_id"], "version_id": registered["model_versions"][0]["model_version_id"],
        "team_name": team["username"], "ui_credential_id": str(credential_id), "accelerator_id": str(accelerator_id),
        "request_id": bundle["public_id"],
    }


def _url(path: str, ids: dict[str, str], who: Principal, route: str) -> str:
    values = dict(ids)
    values["username"] = who.user or "owner"
    values["key_id"] = "nokey"
    values["id"] = "1"
    values["tail"] = "x/"
    values["tag_key"] = "t"
    values["kind"] = "user"
    values["user_id"] = str(ids.get("user_ids", {}).get(who.user or "", 999999))  # each looks itself up
    values["action"] = "stop" if "deployment" in route else "restart"
    if "collaborator" in route:
        values["username"] = "uread"  # a collaborator, and not the caller
    if route == "ui_admin_accelerator":
        values["id"] = ids["accelerator_id"]
    if route == "ui_delete_docker_credential":
        values["id"] = ids["ui_credential_id"]
    if route == "api_download_file":
        values["path"] = ids["path"] + ":download"
    if "experiment" in route:  # an experiment's run, not a job's
        values["run_id"] = ids["experiment_run_id"]
    if "registered" in route:  # a registered model, not a project's model
        values["model_id"] = ids["registered_model_id"]
    return re.sub(r"{(\w+)(:[^}]*)?}", lambda m: values.get(m.group(1), "x1"), path)


async def test_every_route_answers_every_principal_as_its_rule_says(client: TestClient, make_user: Any) -> None:
    pool = client.app[POOL]
    owner = await make_user("owner")
    principals = [Principal("anonymous", None), Principal("stranger", "stranger")]
    principals += [Principal(role, f"u{role}", role) for role in ROLES] + [Principal("owner", "owner", "owner")]
    principals.append(Principal("site admin", "root", site_admin=True))
    ids = await _world(client, owner)
    _, elsewhere = await owner.post("/api/v2/projects", json={"name": "elsewhere"})
    for who in principals:
        if who.user and who.user != "owner":
            api = await make_user(who.user, admin=who.site_admin)
            who.key = api.key
    async def grant(world: dict[str, str]) -> None:
        for who in principals:
            if who.role in ROLES:
                await owner.put(f"/api/v2/projects/{world['project_id']}/collaborators/{who.user}", json={"permission": who.role})

    await grant(ids)
    ids["user_ids"] = {r["username"]: r["id"] for r in await pool.fetch("SELECT id, username FROM users")}  # type: ignore[assignment]
    who_owner = next(p for p in principals if p.role == "owner")
    who_owner.key = owner.key
    owner_user = await users.get_by_username(pool, "owner")
    for which, public_id in (("own", ids["project_id"]), ("other", elsewhere["id"]), ("ended", ids["project_id"])):
        row_id = await pool.fetchval("SELECT id FROM projects WHERE public_id = $1", public_id)
        secret, record = await api_keys.create(pool, owner_user, scope_project_id=row_id)
        if which == "ended":  # a workload's key is revoked when the workload ends
            await pool.execute("DELETE FROM api_keys WHERE key_id = $1", record.key_id)
        principals.append(Principal(f"workload key ({which})", "owner", workload_key_for=which, key=secret))

    base = str(client.make_url("")).rstrip("/")
    jar_sessions = []
    for who in principals:
        who.session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        jar_sessions.append(who.session)
        if who.user and not who.workload_key_for:
            page = await (await who.session.get(base + "/login")).text()
            token = CSRF_RE.search(page).group(1)  # type: ignore[union-attr]
            await who.session.post(base + "/login", data={"csrf_token": token, "username": who.user, "password": "correct horse"})
            page = await (await who.session.get(base + "/projects")).text()
        else:
            page = await (await who.session.get(base + "/login")).text()
        match = CSRF_RE.search(page)
        who.csrf = match.group(1) if match else ""

    routes = []
    for route in client.app.router.routes():
        if route.method == "HEAD" or route.name is None:
            continue
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter") or ""
        routes.append((route.name, route.method, path))
    rules = RULES | {name: MLFLOW_RULE for name, _, _ in routes if name.startswith("mlflow_") and name not in RULES}
    # CML's operations that have no meaning here: 501 for anyone signed in (api/unimplemented.py).
    rules |= {name: "signed_in" for name, _, _ in routes if name.startswith("api_unimplemented_")}
    missing = sorted({name for name, _, _ in routes} - set(rules))
    assert not missing, f"routes without a rule in authz_table.py: {missing}"

    async def call(who: Principal, method: str, url: str, name: str) -> int:
        assert who.session is not None
        headers = {"Authorization": f"Bearer {who.key}"} if who.key and (name.startswith("api_") or name.startswith("model")) else {}
        data: Any = None
        json_body: Any = None
        if method in ("POST", "PUT", "PATCH", "DELETE"):
            if name.startswith("ui_") or name in ("logout", "login_post", "setup_post"):
                data = {"csrf_token": who.csrf}
            elif method != "DELETE":
                json_body = {}
        session = who.session if not (who.key and headers) else aiohttp.ClientSession()
        try:
            async with session.request(method, url, headers=headers, data=data, json=json_body, allow_redirects=False,
                                       timeout=aiohttp.ClientTimeout(total=20)) as resp:
                return resp.status
        finally:
            if session is not who.session:
                await session.close()

    def order(route: tuple[str, str, str]) -> int:
        """Calls that end or remove things come last, the widest last of all: a stop before the
        deletes, leaves before the project, and the key that deleting all keys takes, at the end."""
        name, method = route[0], route[1]
        if name in ("api_delete_keys", "logout"):
            return 5
        if name in ("api_delete_project", "ui_project_delete"):
            return 4
        if name in ("api_delete_job", "ui_job_delete", "api_delete_application", "api_delete_model", "ui_model_delete"):
            return 3
        if method == "DELETE" or "delete" in name:
            return 2
        if re.search(r"stop|restart|regenerate|action", name):
            return 1
        return 0

    problems: list[str] = []
    checks = 0
    try:
        ordered = sorted(routes, key=order)
        for name, method, path in ordered:
            rule = rules[name]
            if rule == "skip":
                continue
            refused_by_rule = [p for p in principals if not allowed(rule, p, name)]
            for who in refused_by_rule:
                if who.workload_key_for and (name.startswith("ui_") or name == "index"):
                    continue
                status = await call(who, method, base + _url(path, ids, who, name), name)
                checks += 1
                ok = status in (401, 403, 404) or (who.user is None and status == 302 and name.startswith("ui_"))
                if not ok:
                    problems.append(f"{method} {path} ({name}, {rule}) let {who.name} through: {status}")
            if rule == "self":  # another user's keys
                for who in principals:
                    if who.user and not who.site_admin and who.user != "owner" and not who.workload_key_for:
                        status = await call(who, method, base + _url(path, ids | {}, dataclasses.replace(who, user="owner"), name), name)
                        checks += 1
                        if status not in (403, 404):
                            problems.append(f"{method} {path} ({name}) let {who.name} act on the owner's keys: {status}")
            weakest = next((p for p in principals if allowed(rule, p, name) and not p.workload_key_for
                            and (p.user is not None or rule == "public")
                            and (p.role in (rule, None) or rule not in PROJECT_RULES or p.role == "admin")), None)
            if weakest is None or rule == "own_auth" or name in ("login_post", "setup_post", "logout"):
                continue
            world = ids
            if order((name, method, path)) >= 2:  # it removes something: on objects of its own
                world = await _world(client, owner)
                await grant(world)
            status = await call(weakest, method, base + _url(path, world, weakest, name), name)
            checks += 1
            # Deleting a key that is not there is a 404 past the check.
            if status in (401, 403) or (status == 404 and name not in ("api_delete_key", "ui_api_keys_delete")):
                problems.append(f"{method} {path} ({name}, {rule}) refused {weakest.name}, whom the rule allows: {status}")
    finally:
        for session in jar_sessions:
            await session.close()
    assert not problems, f"{len(problems)} of {checks} answers break the table:\n" + "\n".join(problems)
    assert checks > 500
