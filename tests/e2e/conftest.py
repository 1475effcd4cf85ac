"""Browser fixtures: headless Chromium (Debian's) driven by Playwright against the real app on a real
TCP port. A `Browser` records what went wrong on its pages: uncaught JavaScript errors, console
errors (a missing favicon included), and HTTP errors a step did not expect.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

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
TIMEOUT_MS = 5_000
DESKTOP = {"width": 1366, "height": 900}
PHONE = {"width": 390, "height": 844}


def screenshots_dir() -> Path:
    path = Path(os.environ.get("CML_ARTIFACTS_DIR", REPO / "artifacts")) / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


class Browser:
    """One page plus what went wrong on it."""

    def __init__(self, page: Any, base: str):
        self.page = page
        self.base = base
        self.page_errors: list[str] = []
        self.console_errors: list[str] = []
        self.bad_responses: list[str] = []
        # Answers that a step expects to be errors (e.g. 401 for a wrong password), by path.
        self.expected_errors: set[tuple[int, str]] = set()
        page.on("pageerror", lambda exc: self.page_errors.append(f"{page.url}: {exc}"))
        page.on("console", self._console)
        page.on("response", self._response)

    def _console(self, message: Any) -> None:
        if message.type != "error":
            return
        text = message.text
        # A page's expected HTTP error also logs "Failed to load resource": counted once, as a response.
        if "Failed to load resource" in text and self.expected_errors:
            return
        # Chromium aborts the requests in flight when the machine's interfaces change, as Podman
        # and the cluster's CNI do when a container or pod starts elsewhere: the machine's doing,
        # not the page's (a page that does not recover fails the test's own checks).
        if "net::ERR_NETWORK_CHANGED" in text:
            return
        self.console_errors.append(f"{self.page.url}: {text}")

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

    async def assert_fits_phone(self, what: str, shot: str | None = None) -> None:
        """At a phone's width (set here if it is not yet) the page scrolls nothing sideways: wide
        tables scroll inside their own cards. `what` names the page in the failure."""
        if self.page.viewport_size != PHONE:
            await self.page.set_viewport_size(PHONE)
        width = await self.page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], f"{what} is {width} px wide on a {PHONE['width']} px phone"
        if shot:
            await self.shot(shot)

    async def sign_in(self, username: str, password: str = PASSWORD) -> None:
        from playwright.async_api import expect

        await self.page.goto(self.url("/login"))
        await self.page.fill("input[name=username]", username)
        await self.page.fill("input[name=password]", password)
        await self.page.click("form[action='/login'] button[type=submit]")
        await expect(self.page).to_have_url(self.url("/projects"))

    def assert_clean(self) -> None:
        assert self.page_errors == [], f"JavaScript errors on the page: {self.page_errors}"
        assert self.console_errors == [], f"console errors: {self.console_errors}"
        assert self.bad_responses == [], f"unexpected HTTP errors: {self.bad_responses}"


@contextlib.asynccontextmanager
async def browser_for(client: TestClient, viewport: dict[str, int] | None = None) -> AsyncIterator[Browser]:
    require_tool(CHROMIUM.exists() and importlib.util.find_spec("playwright") is not None, "chromium and playwright")
    from playwright.async_api import async_playwright

    base = str(client.make_url("")).rstrip("/")
    assert client.server.host == "127.0.0.1" and client.server.port
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            context = await chromium.new_context(viewport=viewport or {"width": 1280, "height": 800})
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
    async with browser_for(client) as b:
        yield b


@pytest.fixture
async def container_browser(container_client: TestClient) -> AsyncIterator[Browser]:
    """The same, on an app whose container engine is Podman."""
    async with browser_for(container_client) as b:
        yield b


@pytest.fixture
async def kube_browser(kube_client: TestClient) -> AsyncIterator[Browser]:
    """The same, on an app whose workloads run as pods on the test cluster."""
    async with browser_for(kube_client) as b:
        yield b
