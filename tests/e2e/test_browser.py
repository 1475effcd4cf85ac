"""End to end: the real app on a real TCP port, driven by headless Chromium through Playwright.

Covers what a person does first: sign in (and a wrong password), see the projects page, create a
blank project, upload a file, open it, create an API key that is shown once and works against API v2,
and, as a site admin, add a user who can then sign in. Screenshots of the main pages go to
$CML_ARTIFACTS_DIR/screenshots (default: <repo>/artifacts/screenshots).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from tests.conftest import wait_build
from tests.e2e.conftest import PASSWORD, PHONE, TIMEOUT_MS, Browser

CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


async def test_sign_in_create_project_upload_and_view_file(browser: Browser, make_user: Any, tmp_path: Path) -> None:
    from playwright.async_api import expect

    await make_user("alice")
    page = browser.page

    # A page that needs a session sends you to sign in, then back.
    await page.goto(browser.url("/projects/new"))
    await expect(page).to_have_url(re.compile(r"/login\?next=/projects/new$"))
    await expect(page.locator("h1")).to_have_text("Sign in")
    await expect(page.locator("link[rel=stylesheet]")).to_have_count(1)
    # The stylesheet really loaded: the top bar is dark, not the browser's default.
    assert await page.eval_on_selector(".topbar", "e => getComputedStyle(e).backgroundColor") == "rgb(15, 23, 42)"

    # Wrong password: an error on the same page, the username kept, no session.
    browser.expected_errors.add((401, "/login"))
    await page.fill("input[name=username]", "alice")
    await page.fill("input[name=password]", "wrong horse")
    await page.click("form[action='/login'] button[type=submit]")
    await expect(page.locator(".flash.error[role=alert]")).to_have_text("Wrong username or password.")
    await expect(page.locator("input[name=username]")).to_have_value("alice")
    await expect(page.locator("header nav")).to_have_count(0)
    await browser.shot("login-wrong-password")

    # Right password: on to where we were going.
    await page.fill("input[name=password]", PASSWORD)
    await page.click("form[action='/login'] button[type=submit]")
    await expect(page).to_have_url(browser.url("/projects/new"))
    await expect(page.locator(".signout .who")).to_have_text("alice")

    await page.goto(browser.url("/projects"))
    await expect(page.locator("h1")).to_have_text("Projects")
    await expect(page.locator(".card.empty")).to_contain_text("No projects yet.")
    await expect(page.locator("header nav a[aria-current=page]")).to_have_text("Projects")
    await expect(page.locator("header nav a", has_text="Site admin")).to_have_count(0)
    await browser.shot("projects-empty")

    # Create a blank project through the form.
    await page.click("a.button.primary[href='/projects/new']")
    await expect(page.locator("h1")).to_have_text("New project")
    await page.fill("#new-project input[name=name]", "Browser Demo")
    await page.fill("#new-project textarea[name=description]", "Made by the end-to-end test")
    await page.select_option("#new-project select[name=visibility]", "private")
    await page.check("#new-project input[name=template][value=blank]")
    await page.click("#new-project button[type=submit]")
    await expect(page).to_have_url(re.compile(r"/projects/[^/]+$"))
    project_url = page.url
    assert not project_url.endswith("/projects/new")
    await expect(page.locator(".flash.ok")).to_have_text("Created project Browser Demo.")
    await expect(page.locator("h1")).to_contain_text("Browser Demo")
    await expect(page.locator(".page-head .badge").first).to_have_text("private")
    await expect(page.locator("nav.crumbs")).to_have_text(re.compile(r"Projects\s*/?\s*alice\s*/?\s*Browser Demo"))
    await expect(page.locator("#overview-files")).to_contain_text("No files yet.")
    await page.click(".project-tabs a:has-text('Files')")
    await expect(page.locator("#files table.files tbody")).to_contain_text("This folder is empty.")
    project_url = project_url + "/files"

    # Upload a small text file through the upload form.
    content = "hello from the browser\nsecond line: <b>not bold</b>\n"
    local = tmp_path / "hello.txt"
    local.write_text(content)
    await page.set_input_files("#upload-form input[type=file][name=files]", str(local))
    await page.click("#upload-form button[type=submit]")
    await expect(page.locator(".flash.ok")).to_have_text("Uploaded 1 file(s).")
    assert page.url == project_url
    row = page.locator('tr[data-path="hello.txt"]')
    await expect(row).to_be_visible()
    await expect(row.locator("td").nth(1)).to_have_text(f"{len(content.encode())} B")
    await browser.shot("project-with-file")

    # Open the file: its text, escaped, in the viewer.
    await page.click('tr[data-path="hello.txt"] a')
    await expect(page).to_have_url(project_url + "/hello.txt")
    viewer = page.locator("[data-testid=file-content]")
    await expect(viewer).to_have_text(content)
    await expect(viewer.locator("b")).to_have_count(0)
    await expect(page.locator(".file-head a.button", has_text="Download")).to_be_visible()
    await browser.shot("file-view")

    # Back on the list, the project is there and the search box finds it or not.
    await page.click("header nav a[href='/projects']")
    card = page.locator("li.project-card", has_text="Browser Demo")
    await expect(card).to_have_count(1)
    await expect(card.locator("p.muted")).to_have_text("Made by the end-to-end test")
    await expect(card.locator(".project-owner")).to_have_text("alice /")
    await browser.shot("projects-list")
    await page.fill("input[name=q]", "demo")
    await page.press("input[name=q]", "Enter")
    await expect(page).to_have_url(re.compile(r"/projects\?q=demo$"))
    await expect(page.locator("li.project-card")).to_have_count(1)
    await page.fill("input[name=q]", "nothing-like-it")
    await page.press("input[name=q]", "Enter")
    await expect(page.locator(".card.empty")).to_contain_text("No project matches")
    await expect(page.locator("li.project-card")).to_have_count(0)

    browser.assert_clean()


async def test_api_key_shown_once_works_and_admin_adds_user(browser: Browser, make_user: Any) -> None:
    from playwright.async_api import expect

    await make_user("root", admin=True)
    page = browser.page
    await browser.sign_in("root")
    await expect(page.locator("header nav a", has_text="Site admin")).to_be_visible()

    # Create a key: shown once, on the answer to the form.
    await page.click("header nav a[href='/settings/api-keys']")
    await expect(page.locator("h1")).to_have_text("API keys")
    await page.fill("input[name=comments]", "browser test key")
    await page.click("form[action='/settings/api-keys'] button[type=submit]")
    shown = page.locator("[data-testid=new-api-key]")
    await expect(shown).to_be_visible()
    secret = (await shown.inner_text()).strip()
    assert len(secret) >= 20 and not re.search(r"\s", secret), secret
    await expect(page.locator("section.card table tbody")).to_contain_text("browser test key")
    await browser.shot("api-key-created")

    # The key works against API v2, with no cookie at all.
    async with aiohttp.ClientSession() as http:
        async with http.get(browser.url("/api/v2/projects"), headers={"Authorization": f"Bearer {secret}"}) as resp:
            assert resp.status == 200, await resp.text()
            body = await resp.json()
            assert body["projects"] == []
        async with http.get(browser.url("/api/v2/projects"), headers={"Authorization": f"Bearer {secret}x"}) as resp:
            assert resp.status == 401

    # Never shown again.
    await page.goto(browser.url("/settings/api-keys"))
    await expect(page.locator("section.card table tbody")).to_contain_text("browser test key")
    await expect(page.locator("[data-testid=new-api-key]")).to_have_count(0)
    assert secret not in await page.content()
    await browser.shot("api-keys")

    # A site admin adds a user.
    await page.click("header nav a[href='/admin/users']")
    await expect(page.locator("h1")).to_have_text("Users")
    form = page.locator("form[action='/admin/users']")
    await form.locator("input[name=username]").fill("carol")
    await form.locator("input[name=name]").fill("Carol Example")
    await form.locator("input[name=email]").fill("carol@example.com")
    await form.locator("input[name=password]").fill("carol's password")
    await form.locator("button[type=submit]").click()
    await expect(page.locator(".flash.ok")).to_have_text("Created user carol.")
    carol = page.locator('tr[data-username="carol"]')
    await expect(carol).to_contain_text("Carol Example")
    await expect(carol).to_contain_text("carol@example.com")
    await expect(carol.locator("td").nth(3)).to_have_text("user")
    await expect(page.locator('tr[data-username="root"] td.actions')).to_have_text("you")
    await browser.shot("admin-users")

    # The new user can sign in, and is no site admin.
    await page.click(".signout button[type=submit]")
    await expect(page).to_have_url(browser.url("/login"))
    await browser.sign_in("carol", "carol's password")
    await expect(page.locator(".signout .who")).to_have_text("carol")
    await expect(page.locator("header nav a", has_text="Site admin")).to_have_count(0)

    browser.assert_clean()


async def test_flash_message_is_shown_only_once(client: TestClient, make_user: Any) -> None:
    """Over plain HTTP (no browser launch, to keep this file fast); the screenshots show the effect:
    "Uploaded 1 file(s)." is still on file-view.png and projects-list.png."""
    await make_user("dave")
    page = await client.get("/login")
    token = CSRF_RE.search(await page.text())
    assert token
    resp = await client.post("/login", data={"csrf_token": token.group(1), "username": "dave", "password": PASSWORD})
    assert resp.status == 200 and str(resp.url).endswith("/projects")
    token = CSRF_RE.search(await resp.text())
    assert token
    form = aiohttp.FormData()
    form.add_field("csrf_token", token.group(1))
    form.add_field("name", "Flash Once")
    form.add_field("template", "blank")
    resp = await client.post("/projects/new", data=form)
    assert resp.status == 200 and "Created project Flash Once." in await resp.text()
    # The next page shows no message.
    resp = await client.get("/projects")
    assert resp.status == 200 and "Flash Once" in await resp.text()
    assert "Created project Flash Once." not in await resp.text()


TERMINAL_TEXT = """() => {
  const buffer = window.cmlTerminal && window.cmlTerminal.buffer.active;
  if (!buffer) return "";
  const lines = [];
  for (let i = 0; i < buffer.length; i++) lines.push(buffer.getLine(i).translateToString(true));
  return lines.join("\\n");
}"""


async def test_session_terminal_in_the_browser(browser: Browser, make_user: Any) -> None:
    alice = await make_user("alice")
    await _session_in_the_browser(browser, alice, runtime="host/python3", shot="session-terminal")


async def test_container_session_terminal_in_the_browser(container_browser: Browser, container_client: TestClient) -> None:
    from cml_appliance.auth import api_keys, users
    from cml_appliance.web.keys import POOL
    from tests.conftest import BUSYBOX_IMAGE, Api

    pool = container_client.app[POOL]
    user = await users.create_user(pool, "alice", "alice@example.com", PASSWORD)
    secret, _ = await api_keys.create(pool, user)
    alice = Api(container_client, secret, "alice")
    await _session_in_the_browser(container_browser, alice, runtime=BUSYBOX_IMAGE, shot="session-container-terminal")


async def test_kubernetes_session_in_the_browser_shows_where_it_runs_and_why_it_waits(
    kube_browser: Browser, kube_client: TestClient
) -> None:
    """A session as a pod: the same page, terminal and live status, plus its namespace and node;
    a session the node cannot take shows the scheduler's reason in words, on a phone too."""
    from playwright.async_api import expect

    from cml_appliance.auth import api_keys, users
    from cml_appliance.web.keys import POOL, SETTINGS
    from tests.conftest import BUSYBOX_IMAGE, Api

    pool = kube_client.app[POOL]
    user = await users.create_user(pool, "alice", "alice@example.com", PASSWORD)
    secret, _ = await api_keys.create(pool, user)
    alice = Api(kube_client, secret, "alice")
    namespace = f"{kube_client.app[SETTINGS].kubernetes_namespace_prefix}-user-alice"
    page = kube_browser.page

    async def where_it_runs() -> None:
        await expect(page.locator("#session-summary .meta")).to_contain_text(
            f"kubernetes engine · namespace {namespace} · node localhost")

    await _session_in_the_browser(kube_browser, alice, runtime=BUSYBOX_IMAGE, shot="session-kubernetes-terminal",
                                  while_running=where_it_runs)

    _, project = await alice.post("/api/v2/projects", json={"name": "Too Big"})
    status, waiting = await alice.post(f"/api/v2/projects/{project['id']}/sessions",
                                       json={"runtime_identifier": BUSYBOX_IMAGE, "cpu": 8, "memory": 1, "name": "Huge"})
    assert status == 200, waiting
    await page.set_viewport_size(PHONE)
    await page.goto(kube_browser.url(f"/projects/{project['id']}/sessions"))
    row = page.locator(f"tr[data-session='{waiting['id']}']")
    await expect(row).to_contain_text("Insufficient cpu", timeout=30_000)
    await expect(row.locator(".status")).to_have_text("Scheduling")
    await kube_browser.shot("sessions-kubernetes-waiting-phone")
    await page.goto(kube_browser.url(f"/projects/{project['id']}/sessions/{waiting['id']}"))
    await expect(page.locator("#session-reason")).to_contain_text("waiting for a node")
    await kube_browser.assert_fits_phone("the waiting session's page", shot="session-kubernetes-waiting-phone")
    await alice.post(f"/api/v2/projects/{project['id']}/sessions/{waiting['id']}:stop")
    kube_browser.assert_clean()


async def _session_in_the_browser(browser: Browser, alice: Any, *, runtime: str, shot: str,
                                  while_running: Any = None) -> None:
    """Start a session from the UI, watch its status change live, type in its terminal, stop it."""
    from playwright.async_api import expect

    _, project = await alice.post("/api/v2/projects", json={"name": "Terminal Demo"})
    page = browser.page
    await browser.sign_in("alice")
    await page.goto(browser.url(f"/projects/{project['id']}"))
    await page.click(".project-tabs a:has-text('Sessions')")
    await expect(page.locator("h1")).to_have_text("Sessions")
    await page.fill("#start-session input[name=name]", "Explore")
    await page.select_option("#start-session select[name=runtime_identifier]", runtime)
    await page.click("#start-session button[type=submit]")
    await expect(page.locator("#session-status")).to_have_attribute("data-status", "ENGINE_RUNNING", timeout=15_000)
    await expect(page.locator("#session-status")).to_have_text("Running")
    await expect(page.locator("#session-status")).to_have_attribute("title", "ENGINE_RUNNING")
    await expect(page.locator("#terminal-state")).to_have_text("connected")
    # The session's first line comes through its log stream (a pod's, read from the kubelet, can
    # take a few seconds under load).
    await expect(page.locator("#console")).to_contain_text("is running in project terminal-demo", timeout=20_000)
    if while_running is not None:
        await while_running()

    await page.click("#terminal")
    await page.keyboard.type("echo answer-$((6*7)) && pwd\n")
    await page.wait_for_function(f"() => ({TERMINAL_TEXT})().includes('answer-42')", timeout=TIMEOUT_MS)
    text = await page.evaluate(TERMINAL_TEXT)
    # The shell runs in the project's directory (/home/cdsw in a container).
    assert project["id"] in text or "/home/cdsw" in text
    await browser.shot(shot)

    # A reload reconnects to the running session.
    await page.reload()
    await expect(page.locator("#terminal-state")).to_have_text("connected")
    await page.click("#terminal")
    await page.keyboard.type("echo again-$((2+3))\n")
    await page.wait_for_function(f"() => ({TERMINAL_TEXT})().includes('again-5')", timeout=TIMEOUT_MS)

    await page.click("#stop-button")
    await expect(page.locator(".flash.ok")).to_have_text(re.compile("Stopping the session"))
    # The status moves on without a reload, the stale message goes, the stop button too.
    await expect(page.locator("#session-status")).to_have_text("Stopped", timeout=15_000)
    await expect(page.locator(".flash.ok")).to_have_count(0, timeout=15_000)
    await expect(page.locator("#terminal-state")).to_contain_text("ended")
    await expect(page.locator("#stop-button")).to_have_count(0)
    await expect(page.locator("#console")).to_contain_text("Session stopping")
    await expect(page.locator("#session-summary .ended")).to_contain_text("ran ")
    # The terminal's last screen stays, read-only, after a reload too.
    await page.reload()
    await expect(page.locator("#terminal-state")).to_contain_text("last screen")
    await page.wait_for_function(f"() => ({TERMINAL_TEXT})().includes('again-5')", timeout=TIMEOUT_MS)
    await browser.shot("session-stopped")
    browser.assert_clean()


async def test_jobs_pages_create_run_and_read_output(browser: Browser, make_user: Any) -> None:
    from playwright.async_api import expect

    alice = await make_user("alice")
    _, project = await alice.post("/api/v2/projects", json={"name": "Jobs Demo"})
    form = aiohttp.FormData()
    form.add_field("hello.py", b"import sys\nprint('hello from the job', sys.argv[1:])\n", filename="hello.py")
    await alice.post(f"/api/v2/projects/{project['id']}/files", data=form)
    page = browser.page
    await browser.sign_in("alice")
    await page.goto(browser.url(f"/projects/{project['id']}"))
    await page.click(".project-tabs a:has-text('Jobs')")
    await expect(page.locator("h1")).to_have_text("Jobs")
    await page.fill("#new-job input[name=name]", "Hello")
    await page.fill("#new-job input[name=script]", "hello.py")
    await page.fill("#new-job input[name=arguments]", "--n 3")
    # The checkboxes sit beside their labels.
    box = await page.locator("#new-job input[name=kill_on_timeout]").bounding_box()
    label = await page.locator("#new-job label.check", has_text="Stop runs at the timeout").bounding_box()
    assert box and label and abs((box["y"] + box["height"] / 2) - (label["y"] + label["height"] / 2)) < 6
    await page.click("#new-job button[type=submit]")
    await expect(page.locator(".flash.ok")).to_contain_text("Created job Hello")
    await page.click("#run-now")
    await expect(page.locator("#session-status")).to_have_text("Succeeded", timeout=15_000)
    await expect(page.locator("#console")).to_contain_text("hello from the job ['--n', '3']")
    await expect(page.locator("#run-summary .exit-code")).to_have_text("exit code 0")
    await browser.shot("job-run")
    # Run again, from the run's page.
    first_run = page.url
    await page.click("#run-again")
    await expect(page).not_to_have_url(first_run)
    await expect(page.locator("#session-status")).to_have_text("Succeeded", timeout=15_000)
    await page.click("nav.crumbs a:has-text('Hello')")
    await expect(page.locator("#run-list tbody tr")).to_have_count(2)
    await expect(page.locator("#run-list .status").first).to_have_text("Succeeded")
    # A bad schedule on the form is a readable error, not a 500.
    browser.expected_errors.add((400, f"/projects/{project['id']}/jobs"))
    await page.goto(browser.url(f"/projects/{project['id']}/jobs"))
    await page.fill("#new-job input[name=name]", "Broken")
    await page.fill("#new-job input[name=script]", "hello.py")
    await page.fill("#new-job input[name=schedule]", "every tuesday")
    await page.click("#new-job button[type=submit]")
    await expect(page.locator(".flash.error")).to_contain_text("not a 5-field cron expression")
    browser.assert_clean()


async def test_applications_page_create_and_open(browser: Browser, make_user: Any) -> None:
    from playwright.async_api import expect

    alice = await make_user("alice")
    _, project = await alice.post("/api/v2/projects", json={"name": "Apps Demo"})
    app_py = (b"import http.server, os\n"
              b"class H(http.server.BaseHTTPRequestHandler):\n"
              b"    def do_GET(self):\n"
              b"        body = b'<h1>Hello from the app</h1>'\n"
              b"        self.send_response(200); self.send_header('Content-Type', 'text/html')\n"
              b"        self.send_header('Content-Length', str(len(body))); self.end_headers(); self.wfile.write(body)\n"
              b"print('serving', flush=True)\n"
              b"http.server.HTTPServer(('127.0.0.1', int(os.environ['CDSW_APP_PORT'])), H).serve_forever()\n")
    form = aiohttp.FormData()
    form.add_field("app.py", app_py, filename="app.py")
    await alice.post(f"/api/v2/projects/{project['id']}/files", data=form)
    page = browser.page
    await browser.sign_in("alice")
    await page.goto(browser.url(f"/projects/{project['id']}"))
    await page.click(".project-tabs a:has-text('Applications')")
    await page.fill("#new-app input[name=name]", "Hello app")
    await page.fill("#new-app input[name=subdomain]", "hello")
    await page.fill("#new-app input[name=script]", "app.py")
    await page.click("#new-app button[type=submit]")
    await expect(page.locator(".flash.ok")).to_contain_text("Starting application Hello app")
    # Running shows up without a reload.
    await expect(page.locator("#app-list tr[data-app=hello] .status")).to_have_text("Running", timeout=15_000)
    await expect(page.locator("#app-list tr[data-app=hello] .status")).to_have_attribute("title", "APPLICATION_RUNNING")
    await browser.shot("applications")
    await page.goto(browser.url("/apps/hello/"))
    await expect(page.locator("h1")).to_have_text("Hello from the app")
    await page.goto(browser.url(f"/projects/{project['id']}/applications"))
    await page.click("#app-list tr[data-app=hello] a:has-text('Hello app')")
    await expect(page.locator("#console")).to_contain_text("serving")
    # Stop and start again from the application's page; its status follows live.
    await page.click("#stop-app")
    await expect(page.locator("#app-status")).to_have_text("Stopped", timeout=15_000)
    await expect(page.locator("#open-app")).to_have_count(0)
    await page.click("#restart-app")
    await expect(page.locator("#app-status")).to_have_text("Running", timeout=15_000)
    await expect(page.locator("#open-app")).to_be_visible()
    browser.assert_clean()


async def test_model_page_sends_a_test_request(browser: Browser, make_user: Any) -> None:
    """A deployed model's page: the test box sends its JSON and shows the function's answer, or its error."""
    import asyncio

    from playwright.async_api import expect

    alice = await make_user("alice")
    _, project = await alice.post("/api/v2/projects", json={"name": "Models Demo"})
    pid = project["id"]
    form = aiohttp.FormData()
    form.add_field("predict.py", b"def predict(args):\n    if 'boom' in args:\n        raise ValueError('boom requested')\n"
                                 b"    return {'doubled': {k: v * 2 for k, v in args.items()}}\n", filename="predict.py")
    await alice.post(f"/api/v2/projects/{pid}/files", data=form)
    status, model = await alice.post(f"/api/v2/projects/{pid}/models", json={
        "name": "Doubler", "auto_build_model": True, "auto_build_config": {"file_path": "predict.py", "function_name": "predict"},
        "auto_deploy_model": True, "auto_deployment_config": {"replicas": 1},
    })
    assert status == 200, model
    build_id = (await wait_build(alice, pid, model["id"], deployed=True))["id"]
    deployments_url = f"/api/v2/projects/{pid}/models/{model['id']}/builds/{build_id}/deployments"
    for _ in range(100):
        _, deployments = await alice.get(deployments_url)
        if deployments["model_deployments"][0]["status"] == "deployed":
            break
        await asyncio.sleep(0.1)
    assert deployments["model_deployments"][0]["status"] == "deployed"

    page = browser.page
    await browser.sign_in("alice")
    await page.goto(browser.url(f"/projects/{pid}"))
    await page.click(".project-tabs a:has-text('Models')")
    await expect(page.locator("h1")).to_have_text("Models")
    await expect(page.locator(f"#model-list tr[data-model='{model['id']}'] .status")).to_have_text("Deployed")
    await browser.shot("models")
    await page.click("#model-list a:has-text('Doubler')")
    await expect(page.locator("#model-status")).to_have_text("Deployed")
    # The curl example names a key to fill in, not a variable of the workloads.
    await expect(page.locator("#curl-example")).to_contain_text("Bearer <YOUR_API_KEY>")
    await expect(page.locator("#curl-example")).not_to_contain_text("CDSW_APIV2_KEY")
    await expect(page.locator("#access-key")).to_have_text(model["access_key"])
    await expect(page.locator("#console")).to_contain_text("serving predict from predict.py")

    # The example in the box comes from the function's code (it reads args['boom'] only by `in`,
    # so no key): {} is sent as it is.
    await expect(page.locator("#test-output")).to_be_hidden()
    await expect(page.locator("#test-input")).to_have_value("{}")
    await page.click("#test-send")
    await expect(page.locator("#test-state")).to_contain_text("200 OK")
    await expect(page.locator("#test-output")).to_contain_text('"doubled": {}')
    await browser.shot("model")

    # The function's own error is shown as the message.
    browser.expected_errors.add((400, f"/projects/{pid}/models/{model['id']}/test"))
    await page.fill("#test-input", '{"boom": 1}')
    await page.click("#test-send")
    await expect(page.locator("#test-state")).to_contain_text("boom requested")
    # Text that is not JSON is caught before it is sent.
    await page.fill("#test-input", '{"a": ')
    await page.click("#test-send")
    await expect(page.locator("#test-state")).to_contain_text("not valid JSON")
    await page.fill("#test-input", '{"a": 21}')
    await page.click("#test-send")
    await expect(page.locator("#test-output")).to_contain_text('"a": 42')
    # The last request that worked is back in the box after a reload.
    await page.reload()
    await expect(page.locator("#test-input")).to_have_value('{"a": 21}')
    # Stopping the deployment from the page: the statuses follow live, and agree.
    await page.click("#deployments button:has-text('Stop')")
    await expect(page.locator("#deployments .status").first).to_have_text("Stopped", timeout=15_000)
    await expect(page.locator("#model-status")).to_have_text("Not deployed")
    await expect(page.locator("#replicas .status")).to_have_count(0)
    browser.assert_clean()


SPY_APP = rb'''import http.server, os
PAGE = b"""<!doctype html><title>spy</title><pre id=out>running</pre><script>
(async () => {
  const ui = new URLSearchParams(location.search).get("ui");
  const term = new URLSearchParams(location.search).get("term");
  const out = {origin: location.origin, cookies: document.cookie};
  document.cookie = "mine=1; path=/";
  out.own = document.cookie;
  const attempt = async (name, f) => { try { out[name] = await f(); } catch (e) { out[name] = "blocked"; } };
  await attempt("api", async () => { const r = await fetch(ui + "/api/v2/projects", {credentials: "include"}); return "read " + r.status; });
  await attempt("page", async () => { const r = await fetch(ui + "/settings/api-keys", {credentials: "include"}); return "read " + (await r.text()).includes("csrf_token"); });
  await attempt("post", async () => {
    await fetch(ui + "/settings/api-keys", {method: "POST", mode: "no-cors", credentials: "include",
      body: new URLSearchParams({comments: "stolen", audiences: "API"})});
    return "sent";
  });
  await attempt("terminal", () => new Promise((resolve) => {
    const ws = new WebSocket(ui.replace("http", "ws") + term);
    ws.onopen = () => { resolve("open"); ws.close(); };
    ws.onerror = () => resolve("blocked");
  }));
  document.getElementById("out").textContent = JSON.stringify(out);
})();
</script>"""
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Type", "text/html")
        self.send_header("X-Seen-Cookie", self.headers.get("Cookie") or "")
        self.send_header("Content-Length", str(len(PAGE))); self.end_headers(); self.wfile.write(PAGE)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["CDSW_APP_PORT"])), H).serve_forever()
'''


async def test_an_application_cannot_read_the_ui_or_act_as_its_visitor(browser: Browser, make_user: Any) -> None:
    """A hostile application, opened by a signed-in user from the UI, runs on an origin of its
    own: it sees none of the UI's cookies, cannot read the API or a page (and so no CSRF token),
    its forged form post is refused, and the user's terminal WebSocket will not open for it."""
    import json

    from playwright.async_api import expect

    from tests.integration.sessions_helpers import start_running_session
    from tests.integration.test_applications import wait_app

    alice = await make_user("alice")
    _, project = await alice.post("/api/v2/projects", json={"name": "Spied on"})
    pid = project["id"]
    form = aiohttp.FormData()
    form.add_field("spy.py", SPY_APP, filename="spy.py")
    await alice.post(f"/api/v2/projects/{pid}/files", data=form)
    _, app = await alice.post(f"/api/v2/projects/{pid}/applications", json={"name": "Spy", "subdomain": "spy", "script": "spy.py"})
    session = await start_running_session(alice, pid)
    await wait_app(alice, pid, app["id"], "APPLICATION_RUNNING")
    _, keys_before = await alice.get("/api/v2/users/alice/v2_keys")

    page = browser.page
    await browser.sign_in("alice")
    term = f"/api/v2/projects/{pid}/sessions/{session['id']}/terminal"
    response = await page.goto(browser.url(f"/apps/spy/?ui={browser.base}&term={term}"))
    assert response is not None and response.headers.get("x-seen-cookie", "") == "", "the application saw the appliance's cookies"
    await expect(page.locator("#out")).not_to_have_text("running", timeout=15_000)
    seen = json.loads(await page.locator("#out").text_content() or "{}")
    assert seen["origin"] != browser.base, seen
    assert "cml_" not in seen["cookies"] and seen["own"] == "mine=1", seen
    assert (seen["api"], seen["page"], seen["terminal"]) == ("blocked", "blocked", "blocked"), seen
    _, keys_after = await alice.get("/api/v2/users/alice/v2_keys")
    assert keys_after == keys_before, "the application's forged form created an API key"
    # The user's own pages still work, and the UI's origin never served the application.
    await page.goto(browser.url("/projects"))
    await expect(page.locator("h1")).to_have_text("Projects")
