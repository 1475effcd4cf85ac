"""Teams in headless Chromium: one user makes a team, adds another as a Contributor, creates a
project owned by the team; the other signs in and works in it; on a phone too."""

from __future__ import annotations

from typing import Any

from tests.e2e.conftest import PASSWORD, PHONE, Browser


async def test_a_team_shares_its_project(browser: Browser, make_user: Any) -> None:
    from playwright.async_api import expect

    await make_user("alice", password=PASSWORD)
    await make_user("bob", password=PASSWORD)
    page = browser.page
    await browser.sign_in("alice")

    await page.click("nav[aria-label=Main] >> text=Teams")
    await page.fill("#new-team input[name=username]", "data-science")
    await page.fill("#new-team input[name=bio]", "churn and forecasting")
    await page.click("#new-team button[type=submit]")
    await expect(page.locator("h1")).to_have_text("data-science")
    await page.fill("#add-member input[name=username]", "bob")
    await page.select_option("#add-member select[name=permission]", "write")
    await page.click("#add-member button[type=submit]")
    await expect(page.locator("tr[data-member=bob] select")).to_have_value("write")
    browser.expected_errors.add((400, "/teams/data-science/members"))
    await page.fill("#add-member input[name=username]", "nobody")
    await page.click("#add-member button[type=submit]")
    await expect(page.locator(".flash.error")).to_contain_text("no user named 'nobody'")
    await browser.shot("team")

    await page.goto(browser.url("/projects/new"))
    await page.fill("#new-project input[name=name]", "Churn")
    await page.select_option("#new-project select[name=team_name]", "data-science")
    await page.click("#new-project button[type=submit]")
    await expect(page.locator(".page-head")).to_contain_text("data-science")
    project_url = page.url

    # bob, a Contributor of the team, finds the project and may upload to it.
    await page.context.clear_cookies()
    await browser.sign_in("bob")
    await page.goto(browser.url("/teams/data-science"))
    await expect(page.locator("#team-projects")).to_contain_text("Churn")
    await page.goto(project_url + "/files")
    await expect(page.locator("form#upload, input[type=file]").first).to_be_attached()
    await page.set_viewport_size(PHONE)
    await page.goto(browser.url("/teams/data-science"))
    await browser.assert_fits_phone("the team page", shot="team-phone")
    browser.assert_clean()


async def test_a_site_admin_sets_quotas_and_sees_what_each_uses(browser: Browser, make_user: Any) -> None:
    from playwright.async_api import expect

    await make_user("root", admin=True, password=PASSWORD)
    alice = await make_user("alice", password=PASSWORD)
    _, project = await alice.post("/api/v2/projects", json={"name": "busy"})
    _, session = await alice.post(f"/api/v2/projects/{project['id']}/sessions",
                                  json={"runtime_identifier": "host/python3", "cpu": 1, "memory": 2})
    page = browser.page
    await browser.sign_in("root")
    await page.goto(browser.url("/admin/users"))
    await page.click("text=Quotas")
    await page.fill("#default-user input[name=cpu]", "1")
    await page.fill("#default-user input[name=memory]", "4")
    await page.click("#default-user button[type=submit]")
    row = page.locator("tr[data-account=alice]")
    await expect(row).to_contain_text("1 vCPU, 2 GB")  # in use
    await expect(row).to_contain_text("1 vCPU, 4 GB (default)")
    await browser.shot("admin-quotas")
    # alice is at her quota: a second session is refused, and says why.
    status, body = await alice.post(f"/api/v2/projects/{project['id']}/sessions", json={"runtime_identifier": "host/python3"})
    assert status == 429 and "alice's quota of 1 vCPU, 4 GB" in body["message"], body
    await row.locator("input[name=cpu]").fill("3")
    await row.locator("button[value=set]").click()
    await expect(page.locator("tr[data-account=alice]")).to_contain_text("3 vCPU")
    await browser.assert_fits_phone("the quotas page", shot="admin-quotas-phone")
    await alice.post(f"/api/v2/projects/{project['id']}/sessions/{session['id']}:stop")
    browser.assert_clean()


async def test_a_site_admin_sees_usage_as_charts(browser: Browser, make_user: Any) -> None:
    """A session ran for half an hour an hour ago: the usage page charts it (vCPU, memory, GPUs),
    sums it per user and team, and lists it; on a phone too."""
    from datetime import UTC, datetime, timedelta

    from playwright.async_api import expect

    from cml_appliance.web.keys import POOL

    await make_user("root", admin=True, password=PASSWORD)
    alice = await make_user("alice", password=PASSWORD)
    status, team = await alice.post("/api/v2/site/teams", json={"username": "forecasting"})
    assert status == 200, team
    _, project = await alice.post("/api/v2/projects", json={"name": "Demand", "team_name": "forecasting"})
    began = datetime.now(UTC) - timedelta(hours=1)
    await alice.client.app[POOL].execute(
        "INSERT INTO workloads (public_id, kind, project_id, creator_id, engine, status, name, runtime_identifier, cpu,"
        " memory, created_at, starting_at, running_at, finished_at)"
        " SELECT 'usage-1', 'session', p.id, u.id, 'local', 'ENGINE_STOPPED', 'Backtest', 'host/python3', 2, 4, $1, $1, $1, $2"
        " FROM projects p, users u WHERE p.public_id = $3 AND u.username = 'alice'",
        began, began + timedelta(minutes=30), project["id"])
    page = browser.page
    await browser.sign_in("root")
    await page.click("nav[aria-label=Main] >> text=Site admin")
    await page.click("nav[aria-label='Site administration'] >> text=Usage")
    await expect(page.locator("h1")).to_have_text("Usage")
    for kind in ("cpu", "memory", "gpu"):
        await expect(page.locator(f".chart[data-key={kind}] canvas").first).to_be_attached()
    accounts = page.locator("#usage-accounts tbody tr")
    await expect(accounts).to_have_count(2)  # alice and her team
    await expect(accounts.first).to_contain_text("1.00")  # 2 vCPU for half an hour
    await expect(page.locator("#usage-recent")).to_contain_text("Backtest")
    await expect(page.locator("#usage-recent")).to_contain_text("Stopped")
    await expect(page.locator("#usage-recent")).to_contain_text("30 min 0 s")
    await page.click("text=Last 7 days")
    await expect(page.locator(".window-tabs [aria-current=page]")).to_have_text("Last 7 days")
    await browser.shot("usage")
    await page.set_viewport_size(PHONE)
    await page.reload()
    await browser.assert_fits_phone("the usage page", shot="usage-phone")
    browser.assert_clean()


async def test_a_site_admin_makes_and_downloads_a_diagnostics_bundle(browser: Browser, make_user: Any) -> None:
    import tarfile

    from playwright.async_api import expect

    await make_user("root", admin=True, password=PASSWORD)
    page = browser.page
    await browser.sign_in("root")
    await page.goto(browser.url("/admin/users"))
    await page.click("nav[aria-label='Site administration'] >> text=Diagnostics")
    await page.select_option("#make-bundle select[name=window]", "hour")
    await page.click("#make-bundle button[type=submit]")
    await expect(page.locator(".flash.ok")).to_contain_text("Making a bundle of the last hour")
    link = page.locator("#bundles a:has-text('Download')")
    await expect(link).to_have_count(1, timeout=15_000)  # the page refreshes itself while it is made
    await expect(page.locator("#bundles")).to_contain_text("Ready")
    async with page.expect_download() as info:
        await link.click()
    download = await info.value
    path = await download.path()
    with tarfile.open(path, "r:gz") as tar:
        assert any(name.endswith("/system.json") for name in tar.getnames())
    await browser.shot("diagnostics")
    browser.assert_clean()


async def test_a_site_admin_closes_an_engine_to_sessions_and_sets_gpu_limits(browser: Browser, make_user: Any) -> None:
    """Site admin → Resources: the local engine closed to sessions refuses a user's start with
    why; a GPU kind's limits are saved (the kind is one a cluster's node would offer)."""
    from playwright.async_api import expect

    from cml_appliance.web.keys import POOL

    await make_user("root", admin=True, password=PASSWORD)
    alice = await make_user("alice", password=PASSWORD)
    gpu_id = await alice.client.app[POOL].fetchval(
        "INSERT INTO accelerator_labels (label_key, label_value, available, max_gpu_count)"
        " VALUES ('nvidia.com/gpu.product', 'Tesla-T4', false, 4) RETURNING id")
    page = browser.page
    await browser.sign_in("root")
    await page.goto(browser.url("/admin/resources"))
    row = page.locator("#resource-groups tr[data-group=local]")
    await row.locator("input[name=allow_sessions]").uncheck()
    await row.locator("button[type=submit]").click()
    await expect(page.locator(".flash.ok")).to_contain_text("Saved what the local resource group takes")
    await expect(page.locator("#resource-groups tr[data-group=local] input[name=allow_sessions]")).not_to_be_checked()
    gpu = page.locator("#accelerators tr[data-accelerator=Tesla-T4]")
    await expect(gpu).to_contain_text("no node offers it now")
    await gpu.locator("input[name=max_gpu_per_workload]").fill("2")
    await gpu.locator("input[name=default_quota]").fill("1")
    await gpu.locator("button[type=submit]").click()
    await expect(page.locator(".flash.ok")).to_contain_text("Saved the GPU limits")
    await expect(page.locator("#accelerators tr[data-accelerator=Tesla-T4] input[name=max_gpu_per_workload]")).to_have_value("2")
    browser.expected_errors.add((400, f"/admin/resources/accelerators/{gpu_id}"))
    await gpu.locator("input[name=default_quota]").fill("many")
    await gpu.locator("button[type=submit]").click()
    await expect(page.locator(".flash.error")).to_contain_text("default_quota must be a number")
    await browser.assert_fits_phone("the resources page", shot="resources-phone")

    _, project = await alice.post("/api/v2/projects", json={"name": "closed"})
    status, body = await alice.post(f"/api/v2/projects/{project['id']}/sessions", json={"name": "refused"})
    assert status == 400 and "does not take sessions" in body["message"], body
    browser.assert_clean()
