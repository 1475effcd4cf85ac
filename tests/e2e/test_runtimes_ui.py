"""Runtimes in headless Chromium: a site administrator adds a docker credential, registers a
custom runtime (an image that cannot be one is refused with why), deprecates it; a user then
starts a session on it from the project's Sessions page and types in its terminal."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

from tests.conftest import BUSYBOX_IMAGE, _podman_env, podman_cli, user_maker
from tests.e2e.conftest import PASSWORD, Browser
from tests.e2e.test_browser import TERMINAL_TEXT


async def test_an_admin_registers_a_runtime_and_a_user_works_on_it(container_browser: Browser, container_client: TestClient,
                                                                    python_image: str) -> None:
    from playwright.async_api import expect

    make = user_maker(container_client)
    await make("root", admin=True, password=PASSWORD)
    alice = await make("alice", password=PASSWORD)
    browser, page = container_browser, container_browser.page
    await browser.sign_in("root")
    await page.goto(browser.url("/runtimes"))

    await page.fill("#docker-credentials input[name=name]", "team registry")
    await page.fill("#docker-credentials input[name=server]", "registry.example.com")
    await page.fill("#docker-credentials input[name=username]", "robot")
    await page.fill("#docker-credentials input[name=password]", "never-shown")
    await page.click("#docker-credentials button:has-text('Add')")
    await expect(page.locator(".flash.ok")).to_contain_text("Saved the docker credential team registry")
    assert "never-shown" not in await page.content()

    # busybox has no python3: refused, and the page says why.
    browser.expected_errors.add((422, "/runtimes/register"))
    code, out = await podman_cli(_podman_env(), "tag", BUSYBOX_IMAGE, "localhost/cml-test-busybox:no-python")
    assert code == 0, out
    await page.fill("#register-runtime input[name=url]", "localhost/cml-test-busybox:no-python")
    await page.click("#register-runtime button[type=submit]")
    await expect(page.locator(".flash.error")).to_contain_text("The image has no working python3")

    await page.fill("#register-runtime input[name=url]", python_image)
    await page.click("#register-runtime button[type=submit]")
    await expect(page.locator(".flash.ok")).to_contain_text(f"Registered {python_image}: Workbench, Python 3.11, Custom")
    row = page.locator("tr", has=page.locator(f"code:text-is('{python_image}')"))
    await row.locator("select[name=status]").select_option("DEPRECATED")
    await row.locator("button:has-text('Set')").click()
    await expect(page.locator(".flash.ok")).to_contain_text("is now deprecated")
    await browser.assert_fits_phone("the runtimes page", shot="runtimes-admin-phone")
    await page.set_viewport_size({"width": 1366, "height": 900})

    # Alice starts a session on the new runtime from the UI; the image really runs.
    _, project = await alice.post("/api/v2/projects", json={"name": "On custom"})
    await page.context.clear_cookies()
    await browser.sign_in("alice")
    await page.goto(browser.url(f"/projects/{project['id']}/sessions"))
    await page.select_option("#start-session select[name=runtime_identifier]", python_image)
    await page.click("#start-session button[type=submit]")
    await expect(page.locator("#session-status")).to_have_text("Running", timeout=30_000)
    await page.click("#terminal")
    await page.keyboard.type("python3 -c 'print(6*7, \"from\", \"python\")'\n")
    await page.wait_for_function(f"() => ({TERMINAL_TEXT})().includes('42 from python')", timeout=15_000)
    await browser.shot("session-on-custom-runtime")
    await page.click("#stop-button")
    await expect(page.locator("#session-status")).to_have_text("Stopped", timeout=15_000)
    browser.assert_clean()


async def test_a_user_sees_the_catalog_without_the_admin_forms(browser: Browser, make_user: Any) -> None:
    from playwright.async_api import expect

    await make_user("alice", password=PASSWORD)
    await browser.sign_in("alice")
    await browser.page.goto(browser.url("/runtimes"))
    await expect(browser.page.locator("h1")).to_have_text("Runtimes")
    await expect(browser.page.locator("#register-runtime, #docker-credentials")).to_have_count(0)
    await expect(browser.page.locator("td >> text=Enabled").first).to_be_visible()
    browser.assert_clean()
