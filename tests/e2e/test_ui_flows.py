"""Browser flows of the UI beyond the crawl: folders in the file table, live lists and the
"Cloning…" page moving on by themselves, the phone menu, and the main flow done from the keyboard
alone (sign in, create a project, start a session, run a job)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient

from cml_appliance.web.keys import POOL, PROJECTS
from tests.e2e.conftest import PASSWORD, PHONE, TIMEOUT_MS, Browser, browser_for


async def test_folders_open_show_their_contents_and_are_deleted_after_a_confirmation(browser: Browser, client: TestClient,
                                                                                      make_user: Any) -> None:
    from playwright.async_api import expect

    alice = await make_user("alice")
    _, project = await alice.post("/api/v2/projects", json={"name": "Folders"})
    root = client.app[PROJECTS].projects_dir / project["id"]
    (root / "data/raw").mkdir(parents=True)
    (root / "data/raw/a.csv").write_text("a\n1\n")
    (root / "data/readme.txt").write_text("about the data\n")
    page = browser.page
    await browser.sign_in("alice")
    await page.goto(browser.url(f"/projects/{project['id']}/files"))
    await page.click('tr[data-path="data"] a')
    await expect(page).to_have_url(re.compile(r"/files/data$"))
    await expect(page.locator('tr[data-path="data/raw"]')).to_contain_text("folder")
    await expect(page.locator('tr[data-path="data/readme.txt"]')).to_contain_text("15 B")
    await page.click('tr[data-path="data/raw"] a')
    await expect(page.locator('tr[data-path="data/raw/a.csv"]')).to_be_visible()
    await expect(page.locator(".folder-path")).to_have_text(re.compile(r"folders\s*/\s*data\s*/\s*raw"))
    await page.click(".folder-path a:has-text('folders')")

    # Cancelling the question keeps the folder; accepting deletes it with its contents.
    questions: list[str] = []

    async def answer(dialog: Any, accept: bool) -> None:
        questions.append(dialog.message)
        await (dialog.accept() if accept else dialog.dismiss())

    page.once("dialog", lambda d: answer(d, False))
    await page.click('tr[data-path="data"] button:has-text("Delete")')
    await expect(page.locator('tr[data-path="data"]')).to_be_visible()
    assert questions == ["Delete the folder data and everything in it?"]
    assert (root / "data/raw/a.csv").exists()
    page.once("dialog", lambda d: answer(d, True))
    await page.click('tr[data-path="data"] button:has-text("Delete")')
    await expect(page.locator(".flash.ok")).to_have_text("Deleted data.")
    await expect(page.locator('tr[data-path="data"]')).to_have_count(0)
    assert not (root / "data").exists()
    browser.assert_clean()


async def test_the_cloning_page_moves_on_by_itself(browser: Browser, client: TestClient, make_user: Any, tmp_path: Path) -> None:
    """The page of a project being cloned shows Cloning…, then its files and README when the clone
    ends, or why it failed, with no reload. The clone's end is played by the database row (what
    ProjectService._clone writes), so the test controls when it comes."""
    from playwright.async_api import expect

    alice = await make_user("alice")
    pool: asyncpg.Pool = client.app[POOL]
    page = browser.page
    await browser.sign_in("alice")
    for outcome in ("success", "failure"):
        _, project = await alice.post("/api/v2/projects", json={"name": f"Clone {outcome}"})
        await pool.execute("UPDATE projects SET creation_status = 'creating', git_url = 'https://example.org/x.git'"
                           " WHERE public_id = $1", project["id"])
        await page.goto(browser.url(f"/projects/{project['id']}"))
        await expect(page.locator("#project-state")).to_contain_text("Cloning https://example.org/x.git")
        (client.app[PROJECTS].projects_dir / project["id"] / "README.md").write_text("# Cloned at last\n")
        await pool.execute("UPDATE projects SET creation_status = $2, creation_message = $3 WHERE public_id = $1",
                           project["id"], outcome, "git failed: repository not found" if outcome == "failure" else "")
        if outcome == "success":
            await expect(page.locator("#project-state")).to_be_empty()
            await expect(page.locator("#readme h1")).to_have_text("Cloned at last")
            await expect(page.locator("#overview-files")).to_contain_text("README.md")
        else:
            await expect(page.locator("#project-state [role=alert]")).to_contain_text("repository not found")
    browser.assert_clean()


async def test_lists_follow_the_state_without_a_reload(browser: Browser, client: TestClient, make_user: Any) -> None:
    from playwright.async_api import expect

    alice = await make_user("alice")
    _, project = await alice.post("/api/v2/projects", json={"name": "Live lists"})
    pid = project["id"]
    (client.app[PROJECTS].projects_dir / pid / "job.py").write_text("import time\ntime.sleep(1)\nprint('done')\n")
    page = browser.page
    await browser.sign_in("alice")

    # Sessions: a session started elsewhere appears, runs, stops.
    await page.goto(browser.url(f"/projects/{pid}/sessions"))
    await expect(page.locator("#session-list tbody")).to_contain_text("No sessions yet.")
    _, session = await alice.post(f"/api/v2/projects/{pid}/sessions", json={"name": "Elsewhere", "runtime_identifier": "host/python3"})
    row = page.locator(f'tr[data-session="{session["id"]}"]')
    await expect(row.locator(".status")).to_have_text("Running", timeout=15_000)
    await alice.post(f"/api/v2/projects/{pid}/sessions/{session['id']}:stop")
    await expect(row.locator(".status")).to_have_text("Stopped", timeout=15_000)
    await expect(row.locator(".ended .duration")).to_contain_text("ran ")

    # My sessions, across projects.
    await page.goto(browser.url("/sessions"))
    await expect(page.locator(f'tr[data-session="{session["id"]}"]')).to_contain_text("Live lists")
    _, second = await alice.post(f"/api/v2/projects/{pid}/sessions", json={"name": "Second", "runtime_identifier": "host/python3"})
    await expect(page.locator(f'tr[data-session="{second["id"]}"] .status')).to_have_text("Running", timeout=15_000)
    await alice.post(f"/api/v2/projects/{pid}/sessions/{second['id']}:stop")

    # Jobs: a run started elsewhere shows as the job's last run, then how it ended.
    _, job = await alice.post(f"/api/v2/projects/{pid}/jobs", json={"name": "Sleeper", "script": "job.py"})
    await page.goto(browser.url(f"/projects/{pid}/jobs"))
    cell = page.locator(f'tr[data-job="{job["id"]}"] .status')
    await expect(cell).to_have_text("Never run")
    await alice.post(f"/api/v2/projects/{pid}/jobs/{job['id']}/runs", json={})
    await expect(cell).to_have_text(re.compile("Scheduling|Starting|Running"), timeout=15_000)
    await expect(cell).to_have_text("Succeeded", timeout=15_000)
    browser.assert_clean()


async def test_the_menu_folds_on_a_phone(client: TestClient, make_user: Any) -> None:
    from playwright.async_api import expect

    await make_user("alice")
    async with browser_for(client, PHONE) as browser:
        page = browser.page
        await browser.sign_in("alice")
        menu = page.locator(".menu-toggle")
        await expect(menu).to_be_visible()
        await expect(page.locator("header nav a:has-text('Runtimes')")).to_be_hidden()
        await menu.click()
        await expect(menu).to_have_attribute("aria-expanded", "true")
        await page.click("header nav a:has-text('Runtimes')")
        await expect(page.locator("h1")).to_have_text("Runtimes")
        await browser.assert_fits_phone("the runtimes page")
        browser.assert_clean()


async def tab_to(page: Any, selector: str, limit: int = 60) -> None:
    """Press Tab until the focus is on `selector` (as a keyboard user does)."""
    from playwright.async_api import Error

    for _ in range(limit):
        try:
            if await page.evaluate("(s) => document.activeElement && document.activeElement.matches(s)", selector):
                return
        except Error as exc:  # the Enter before was a link or a form: the next page is loading
            if "context was destroyed" not in str(exc):
                raise
            await page.wait_for_load_state()
            continue
        await page.keyboard.press("Tab")
    raise AssertionError(f"{selector} never got the focus by Tab")


async def test_the_main_flow_works_from_the_keyboard(browser: Browser, client: TestClient, make_user: Any) -> None:
    from playwright.async_api import expect

    await make_user("alice")
    page = browser.page
    keys = page.keyboard
    await page.goto(browser.url("/login"))
    await tab_to(page, "input[name=username]")
    await keys.type("alice")
    await tab_to(page, "input[name=password]")
    await keys.type("correct horse")
    await keys.press("Enter")
    await expect(page).to_have_url(browser.url("/projects"))

    await tab_to(page, "a[href='/projects/new']")
    await keys.press("Enter")
    await tab_to(page, "#new-project input[name=name]")
    await keys.type("Keyboard only")
    await tab_to(page, "#new-project button[type=submit]")
    await keys.press("Enter")
    await expect(page.locator(".flash.ok")).to_have_text("Created project Keyboard only.")
    project_url = page.url
    (client.app[PROJECTS].projects_dir / project_url.rsplit("/", 1)[1] / "hello.py").write_text("print('typed, not clicked')\n")

    await tab_to(page, ".project-tabs a[href$='/sessions']")
    await keys.press("Enter")
    await tab_to(page, "#start-session button[type=submit]")
    await keys.press("Enter")
    await expect(page.locator("#session-status")).to_have_text("Running", timeout=15_000)
    await expect(page.locator("#terminal-state")).to_have_text("connected")
    await page.wait_for_function("() => document.activeElement && document.activeElement.closest('#terminal')", timeout=TIMEOUT_MS)
    await keys.type("echo keys-$((40+2))\n")
    await page.wait_for_function("() => { const b = window.cmlTerminal && window.cmlTerminal.buffer.active; if (!b) return false;"
                                 " for (let i = 0; i < b.length; i++) if (b.getLine(i).translateToString(true).includes('keys-42')) return true;"
                                 " return false; }", timeout=TIMEOUT_MS)
    # Out of the terminal (xterm keeps Tab for the shell), then stop the session with the keyboard.
    await page.evaluate("document.activeElement.blur()")
    await tab_to(page, "#stop-button")
    await keys.press("Enter")
    await expect(page.locator("#session-status")).to_have_text("Stopped", timeout=15_000)

    await tab_to(page, ".project-tabs a[href$='/jobs']")
    await keys.press("Enter")
    await tab_to(page, "#new-job input[name=name]")
    await keys.type("Typed job")
    await tab_to(page, "#new-job input[name=script]")
    await keys.type("hello.py")
    await tab_to(page, "#new-job input[name=kill_on_timeout]")
    await keys.press("Space")  # checkboxes toggle from the keyboard
    await expect(page.locator("#new-job input[name=kill_on_timeout]")).not_to_be_checked()
    await tab_to(page, "#new-job button[type=submit]")
    await keys.press("Enter")
    await expect(page.locator(".flash.ok")).to_contain_text("Created job Typed job")
    await tab_to(page, "#run-now")
    await keys.press("Enter")
    await expect(page.locator("#session-status")).to_have_text("Succeeded", timeout=15_000)
    await expect(page.locator("#console")).to_contain_text("typed, not clicked")
    browser.assert_clean()


async def test_the_new_project_form_shows_only_the_chosen_templates_fields(browser: Browser, make_user: Any) -> None:
    from playwright.async_api import expect

    await make_user("alice")
    page = browser.page
    await browser.sign_in("alice")
    await page.goto(browser.url("/projects/new"))
    git_url = page.locator("#new-project input[name=git_url]")
    files = page.locator("#new-project input[name=files]")
    await expect(git_url).to_be_hidden()
    await expect(files).to_be_hidden()
    await page.check("#new-project input[name=template][value=git]")
    await expect(git_url).to_be_visible()
    await expect(files).to_be_hidden()
    await page.check("#new-project input[name=template][value=upload]")
    await expect(git_url).to_be_hidden()
    await expect(files).to_be_visible()
    # A bad git URL comes back with the git field shown and filled in.
    browser.expected_errors.add((400, "/projects/new"))
    await page.check("#new-project input[name=template][value=git]")
    await page.fill("#new-project input[name=name]", "Bad URL")
    await page.fill("#new-project input[name=git_url]", "ftp://example.org/x")
    await page.evaluate("() => document.querySelector('#new-project input[name=git_url]').type = 'text'")  # past the browser's own check
    await page.click("#new-project button[type=submit]")
    await expect(page.locator(".flash.error")).to_contain_text("is not a git URL")
    await expect(git_url).to_be_visible()
    await expect(git_url).to_have_value("ftp://example.org/x")
    browser.assert_clean()


async def test_a_builds_log_streams_on_the_model_page(browser: Browser, client: TestClient, make_user: Any) -> None:
    """Building from the model page shows the build's log as it is made, and its word when done."""
    import shutil

    from playwright.async_api import expect

    from tests.conftest import require_tool

    require_tool(shutil.which("docker-registry") is not None, "docker-registry (Debian package)")
    alice = await make_user("alice")
    _, project = await alice.post("/api/v2/projects", json={"name": "Logged builds"})
    root = client.app[PROJECTS].projects_dir / project["id"]
    (root / "pkg" / "deep").mkdir(parents=True)
    (root / "pkg" / "deep" / "util.py").write_text("X = 1\n")
    (root / "predict.py").write_text("def predict(args):\n    return args\n")
    _, model = await alice.post(f"/api/v2/projects/{project['id']}/models", json={"name": "logged"})
    page = browser.page
    await browser.sign_in("alice")
    await page.goto(browser.url(f"/projects/{project['id']}/models/{model['id']}"))
    await page.fill("#new-build input[name=file_path]", "predict.py")
    await page.fill("#new-build input[name=function_name]", "predict")
    await page.uncheck("#new-build input[name=deploy]")
    await page.click("#new-build button[type=submit]")
    await expect(page.locator(".flash.ok")).to_contain_text("Its log follows below")
    console = page.locator("#build-output #console")
    await expect(console).to_contain_text("[1/4] Fetching snapshot", timeout=20_000)
    await expect(console).to_contain_text("Done in", timeout=20_000)
    await expect(page.locator("#builds tr[data-build] .status").first).to_have_text("Built", timeout=20_000)
    browser.assert_clean()


async def test_a_project_from_an_amp_sets_itself_up_while_the_page_watches(browser: Browser, make_user: Any,
                                                                            tmp_path: Path) -> None:
    """New project → AMP: the page shows each task as it runs and, at the end, that it is set up;
    the AMP's job ran and its application exists."""
    from playwright.async_api import expect

    from tests.integration.test_amps import APP, METADATA, SERVE, TRAIN, git_repo

    alice = await make_user("alice", password=PASSWORD)
    url = git_repo(tmp_path / "amp", {".project-metadata.yaml": METADATA, "code/train.py": TRAIN,
                                      "code/serve.py": SERVE, "code/app.py": APP})
    page = browser.page
    await browser.sign_in("alice")
    await page.goto(browser.url("/projects/new"))
    await page.fill("#new-project input[name=name]", "Churn prototype")
    await page.check("#new-project input[name=template][value=amp]")
    await page.fill("#new-project input[name=git_url]", url)
    await expect(page.locator("#new-project input[name=execute_amp_steps]")).to_be_checked()
    await page.click("#new-project button[type=submit]")
    await expect(page.locator(".flash.ok")).to_contain_text("cloning the AMP, then setting it up")
    await expect(page.locator("#amp-state")).to_contain_text("AMP set up: 6 task(s) done", timeout=120_000)
    await browser.shot("project-from-amp")
    _, projects = await alice.get("/api/v2/projects")
    pid = projects["projects"][0]["id"]
    _, apps = await alice.get(f"/api/v2/projects/{pid}/applications")
    assert [a["name"] for a in apps["applications"]] == ["Churn UI"]
    browser.assert_clean()
