"""End to end: the real app on a real TCP port, driven by headless Chromium through Playwright.

Covers what a person does first: sign in (and a wrong password), see the projects page, create a
blank project, upload a file, open it, create an API key that is shown once and works against API v2,
and, as a site admin, add a user who can then sign in. Screenshots of the main pages go to
$CML_ARTIFACTS_DIR/screenshots (default: <repo>/artifacts/screenshots).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import require_tool

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]
PASSWORD = "correct horse"
CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')
TIMEOUT_MS = 5_000


def screenshots_dir() -> Path:
    path = Path(os.environ.get("CML_ARTIFACTS_DIR", REPO / "artifacts")) / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


class Browser:
    """One page plus what went wrong on it: uncaught JS errors and unexpected HTTP errors."""

    def __init__(self, page: Any, base: str):
        self.page = page
        self.base = base
        self.page_errors: list[str] = []
        self.bad_responses: list[str] = []
        page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))
        page.on("response", self._response)
        # Answers that a step expects to be errors (e.g. 401 for a wrong password), by path.
        self.expected_errors: set[tuple[int, str]] = set()

    def _response(self, response: Any) -> None:
        if response.status >= 400:
            path = response.url.removeprefix(self.base)
            if (response.status, path.split("?")[0]) not in self.expected_errors:
                self.bad_responses.append(f"{response.status} {response.request.method} {path}")

    def url(self, path: str) -> str:
        return self.base + path

    async def shot(self, name: str) -> Path:
        target = screenshots_dir() / f"{name}.png"
        await self.page.screenshot(path=str(target), full_page=True)
        return target

    async def sign_in(self, username: str, password: str = PASSWORD) -> None:
        from playwright.async_api import expect

        await self.page.goto(self.url("/login"))
        await self.page.fill("input[name=username]", username)
        await self.page.fill("input[name=password]", password)
        await self.page.click("form[action='/login'] button[type=submit]")
        await expect(self.page).to_have_url(self.url("/projects"))

    def assert_clean(self) -> None:
        assert self.page_errors == [], f"JavaScript errors on the page: {self.page_errors}"
        assert self.bad_responses == [], f"unexpected HTTP errors: {self.bad_responses}"


@contextlib.asynccontextmanager
async def _browser_for(client: TestClient) -> AsyncIterator[Browser]:
    require_tool(CHROMIUM.exists() and importlib.util.find_spec("playwright") is not None, "chromium and playwright")
    from playwright.async_api import async_playwright

    base = str(client.make_url("")).rstrip("/")
    assert client.server.host == "127.0.0.1" and client.server.port
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            context = await chromium.new_context(viewport={"width": 1280, "height": 800})
            context.set_default_timeout(TIMEOUT_MS)
            context.set_default_navigation_timeout(TIMEOUT_MS)
            page = await context.new_page()
            yield Browser(page, base)
            await context.close()
        finally:
            await chromium.close()


@pytest.fixture
async def browser(client: TestClient) -> AsyncIterator[Browser]:
    """A fresh headless Chromium page pointed at the app that `client` serves on 127.0.0.1."""
    async with _browser_for(client) as b:
        yield b


@pytest.fixture
async def container_browser(container_client: TestClient) -> AsyncIterator[Browser]:
    """The same, on an app whose container engine is Podman."""
    async with _browser_for(container_client) as b:
        yield b


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
    await expect(page.locator("header nav a.active")).to_have_text("Projects")
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
    await expect(page.locator("h1 .badge").first).to_have_text("private")
    await expect(page.locator("#files table.files tbody")).to_contain_text("This folder is empty.")

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
    await expect(page).to_have_url(project_url + "/files/hello.txt")
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


async def _session_in_the_browser(browser: Browser, alice: Any, *, runtime: str, shot: str) -> None:
    """Start a session from the UI, watch its status change live, type in its terminal, stop it."""
    from playwright.async_api import expect

    _, project = await alice.post("/api/v2/projects", json={"name": "Terminal Demo"})
    page = browser.page
    await browser.sign_in("alice")
    await page.goto(browser.url(f"/projects/{project['id']}"))
    await page.click("a.button:has-text('Sessions')")
    await expect(page.locator("h1")).to_have_text("Sessions")
    await page.fill("#start-session input[name=name]", "Explore")
    await page.select_option("#start-session select[name=runtime_identifier]", runtime)
    await page.click("#start-session button[type=submit]")
    await expect(page.locator("#session-status")).to_have_text("ENGINE_RUNNING")
    await expect(page.locator("#terminal-state")).to_have_text("connected")
    await expect(page.locator("#console")).to_contain_text("is running in project terminal-demo")

    await page.click("#terminal")
    await page.keyboard.type("echo answer-$((6*7)) && pwd\n")
    await page.wait_for_function(f"({TERMINAL_TEXT})().includes('answer-42')", timeout=TIMEOUT_MS)
    text = await page.evaluate(TERMINAL_TEXT)
    # The shell runs in the project's directory (/home/cdsw in a container).
    assert project["id"] in text or "/home/cdsw" in text
    await browser.shot(shot)

    # A reload reconnects to the running session.
    await page.reload()
    await expect(page.locator("#terminal-state")).to_have_text("connected")
    await page.click("#terminal")
    await page.keyboard.type("echo again-$((2+3))\n")
    await page.wait_for_function(f"({TERMINAL_TEXT})().includes('again-5')", timeout=TIMEOUT_MS)

    await page.click("#stop-button")
    await expect(page.locator("#session-status")).to_have_text("ENGINE_STOPPED", timeout=15_000)
    await expect(page.locator("#terminal-state")).to_contain_text("ended")
    await expect(page.locator("#stop-button")).to_be_disabled()
    await expect(page.locator("#console")).to_contain_text("Session stopping")
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
    await page.click("a.button:has-text('Jobs')")
    await expect(page.locator("h1")).to_have_text("Jobs")
    await page.fill("#new-job input[name=name]", "Hello")
    await page.fill("#new-job input[name=script]", "hello.py")
    await page.fill("#new-job input[name=arguments]", "--n 3")
    await page.click("#new-job button[type=submit]")
    await expect(page.locator(".flash.ok")).to_contain_text("Created job Hello")
    await page.click("#run-now")
    await expect(page.locator("#session-status")).to_have_text("ENGINE_SUCCEEDED", timeout=15_000)
    await expect(page.locator("#console")).to_contain_text("hello from the job ['--n', '3']")
    await browser.shot("job-run")
    await page.click("a:has-text('Hello')")
    await expect(page.locator("#run-list tbody tr")).to_have_count(1)
    await expect(page.locator("#run-list .status")).to_have_text("ENGINE_SUCCEEDED")
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
    await page.click("a.button:has-text('Applications')")
    await page.fill("#new-app input[name=name]", "Hello app")
    await page.fill("#new-app input[name=subdomain]", "hello")
    await page.fill("#new-app input[name=script]", "app.py")
    await page.click("#new-app button[type=submit]")
    await expect(page.locator(".flash.ok")).to_contain_text("Starting application Hello app")
    for _ in range(50):
        if await page.locator("#app-list tr[data-app=hello] .status").inner_text() == "APPLICATION_RUNNING":
            break
        await page.wait_for_timeout(200)
        await page.reload()
    await expect(page.locator("#app-list tr[data-app=hello] .status")).to_have_text("APPLICATION_RUNNING")
    await browser.shot("applications")
    await page.goto(browser.url("/apps/hello/"))
    await expect(page.locator("h1")).to_have_text("Hello from the app")
    await page.goto(browser.url(f"/projects/{project['id']}/applications"))
    await page.click("#app-list tr[data-app=hello] a:has-text('Hello app')")
    await expect(page.locator("#console")).to_contain_text("serving")
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
    _, builds = await alice.get(f"/api/v2/projects/{pid}/models/{model['id']}/builds")
    build_id = builds["model_builds"][0]["id"]
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
    await page.click("a.button:has-text('Models')")
    await expect(page.locator("h1")).to_have_text("Models")
    await expect(page.locator(f"#model-list tr[data-model='{model['id']}'] .status")).to_have_text("deployed")
    await browser.shot("models")
    await page.click("#model-list a:has-text('Doubler')")
    await expect(page.locator("#model-status")).to_have_text("deployed")
    await expect(page.locator("#access-key")).to_have_text(model["access_key"])
    await expect(page.locator("#console")).to_contain_text("serving predict from predict.py")

    # The example in the box, sent as it is.
    await expect(page.locator("#test-output")).to_be_hidden()
    await page.click("#test-send")
    await expect(page.locator("#test-state")).to_contain_text("200 OK")
    await expect(page.locator("#test-output")).to_contain_text('"feature": 2')
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
    browser.assert_clean()
