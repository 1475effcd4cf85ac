"""Every page the UI links to, on a realistic site, at 1366 px and at 390 px (a phone).

The crawler starts from the navigation and follows every link of the appliance's own pages
(downloads and JSON links are fetched, not rendered; applications are the users' own content and
are left out). A page fails on: an HTTP error, an uncaught JavaScript error, a console error (a
missing favicon included), an element wider than the viewport that no scrolling box holds, and,
at desktop width, any WCAG 2 A/AA violation axe-core finds (labels, text alternatives, colour
contrast, ...), and any inline script or event handler. Screenshots of the main pages at both widths go to the artifacts folder
(docs/ui.md links them; scripts/screenshots.sh makes them anew).
"""

from __future__ import annotations

import re
from collections import deque
from pathlib import Path
from typing import Any
from urllib.parse import urldefrag, urlsplit

from aiohttp.test_utils import TestClient

from tests.conftest import Api
from tests.e2e.conftest import DESKTOP, PHONE, Browser, browser_for
from tests.e2e.realistic import build_site

MAX_PAGES = 400
# Not pages to render: files to download, JSON, the application proxy (users' own content), the
# live stream, and what a link would change.
FETCH_ONLY = re.compile(r"^/projects/[^/]+/download/|^/api/|/logs$")
SKIP = re.compile(r"^/apps/|^/live|^/logout")

OVERFLOW = """() => {
  const vw = document.documentElement.clientWidth;
  const found = [];
  if (document.documentElement.scrollWidth > vw + 1)
    found.push(`the page scrolls sideways: ${document.documentElement.scrollWidth}px wide in ${vw}px`);
  for (const el of document.body.querySelectorAll("*")) {
    const r = el.getBoundingClientRect();
    if (r.width === 0 || r.height === 0 || r.right <= vw + 1) continue;
    // Held: a scrolling or clipping box contains it. An absolutely placed element escapes every
    // box until its containing block (the nearest positioned ancestor).
    let held = false;
    let escapes = ["absolute", "fixed"].includes(getComputedStyle(el).position);
    for (let a = el.parentElement; a && a !== document.body; a = a.parentElement) {
      const style = getComputedStyle(a);
      const clips = style.overflowX !== "visible" && a.getBoundingClientRect().right <= vw + 1;
      if (clips && (!escapes || style.position !== "static")) { held = true; break; }
      if (style.position !== "static") escapes = false;
    }
    if (!held) {
      const name = el.tagName.toLowerCase() + (el.id ? "#" + el.id : "") + (el.className && typeof el.className === "string" ? "." + el.className.trim().replace(/\\s+/g, ".") : "");
      found.push(`${name} reaches ${Math.round(r.right)}px: ${(el.textContent || "").trim().slice(0, 60)}`);
    }
  }
  if (found.length === 1 && found[0].startsWith("the page")) {  // held everywhere, yet the page is wide: name the widest
    const wide = Array.from(document.body.querySelectorAll("*")).map(e => [e, e.getBoundingClientRect().right])
      .filter(([e, right]) => right > vw + 1).sort((a, b) => b[1] - a[1]).slice(0, 3);
    for (const [e, right] of wide) found.push(`widest: ${e.tagName.toLowerCase()}${e.id ? "#" + e.id : ""}.${String(e.className).replace(/\\s+/g, ".")} reaches ${Math.round(right)}px`);
  }
  return found.slice(0, 8);
}"""

# No user data may ever sit in script: no inline handlers, no inline scripts (the CSP forbids
# them too; this names the page that would try).
INLINE_SCRIPT = """() => {
  const found = [];
  for (const el of document.querySelectorAll("*"))
    for (const attr of el.attributes) if (attr.name.startsWith("on")) found.push(`${el.tagName.toLowerCase()} ${attr.name}`);
  for (const s of document.querySelectorAll("script:not([src])")) if (s.type !== "application/json") found.push("inline <script>");
  return found;
}"""
# Pages only: a link marked download is a file (artifacts; test_experiments_ui.py downloads one).
LINKS = """() => Array.from(document.querySelectorAll("a[href]:not([download])"), a => a.getAttribute("href"))"""
STATUSES = """() => Array.from(document.querySelectorAll("[data-status]"), e => e.dataset.status)"""


async def axe_violations(page: Any) -> list[str]:
    from axe_playwright_python.async_playwright import Axe

    results = await Axe().run(page, options={"runOnly": {"type": "tag", "values": ["wcag2a", "wcag2aa", "wcag21aa"]},
                                             "resultTypes": ["violations"]})
    found = []
    for violation in results.response["violations"]:
        targets = ", ".join(str(node["target"]) for node in violation["nodes"][:3])
        found.append(f"{violation['id']} ({violation['impact']}): {violation['help']} at {targets}")
    return found


async def crawl(browser: Browser, client: TestClient, *, accessibility: bool, shots: dict[str, str], prefix: str) -> dict[str, Any]:
    """Visit everything reachable from /projects; return what was seen and what went wrong."""
    page = browser.page
    queue: deque[str] = deque(["/projects", "/sessions", "/runtimes", "/settings/api-keys", "/admin/users"])
    seen: set[str] = set(queue)
    problems: list[str] = []
    statuses: set[str] = set()
    visited: list[str] = []
    fetched: set[str] = set()
    while queue and len(visited) < MAX_PAGES:
        path = queue.popleft()
        response = await page.goto(browser.url(path), wait_until="load")
        visited.append(path)
        if response is None or response.status >= 400:
            problems.append(f"{path}: HTTP {response.status if response else 'no answer'}")
            continue
        # Let the live stream connect and its first refresh land: its errors count too.
        await page.wait_for_timeout(350)
        for item in await page.evaluate(OVERFLOW):
            problems.append(f"{path}: {item}")
        for item in await page.evaluate(INLINE_SCRIPT):
            problems.append(f"{path}: {item}")
        if accessibility:
            for item in await axe_violations(page):
                problems.append(f"{path}: {item}")
        statuses.update(await page.evaluate(STATUSES))
        if path in shots:
            await browser.shot(f"{prefix}-{shots[path]}")
        for href in await page.evaluate(LINKS):
            target, _ = urldefrag(href)
            parts = urlsplit(target)
            if not target or parts.scheme not in ("", "http", "https") or (parts.netloc and parts.netloc != urlsplit(browser.base).netloc):
                continue
            local = parts.path + (f"?{parts.query}" if parts.query else "")
            if not local.startswith("/"):
                continue
            if SKIP.search(parts.path):
                continue
            if FETCH_ONLY.search(parts.path):
                if local not in fetched:
                    fetched.add(local)
                    answer = await page.request.get(browser.url(local))
                    if answer.status >= 400:
                        problems.append(f"{path} links to {local}: HTTP {answer.status}")
                continue
            if local not in seen:
                seen.add(local)
                queue.append(local)
    problems += [f"JavaScript error: {e}" for e in browser.page_errors]
    problems += [f"console error: {e}" for e in browser.console_errors]
    problems += [f"HTTP error: {e}" for e in browser.bad_responses]
    return {"visited": visited, "problems": problems, "statuses": statuses}


def main_pages(site: dict[str, Any]) -> dict[str, str]:
    p = f"/projects/{site['project']}"
    return {
        "/projects": "projects", p: "project-overview", f"{p}/files": "files", f"{p}/files/data": "files-folder",
        f"{p}/files/README.md": "file-view", f"{p}/sessions": "sessions", f"{p}/sessions/{site['running_session']}": "session",
        f"{p}/sessions/{site['stopped_session']}": "session-stopped", f"{p}/jobs": "jobs", f"{p}/applications": "applications",
        f"{p}/models": "models", f"{p}/models/{site['model']}": "model", f"{p}/collaborators": "collaborators",
        f"{p}/settings": "settings", f"/projects/{site['cloned']}": "project-from-git",
        f"/projects/{site['cloned']}/experiments": "experiments",
        f"/projects/{site['cloned']}/experiments/{site['experiment']}": "experiment-runs",
        f"/projects/{site['cloned']}/experiments/{site['experiment']}/runs/{site['run']}": "experiment-run",
        "/experiments": "experiments-all", "/registry": "registry", f"/registry/{site['registered']}": "registered-model",
        "/teams": "teams", "/teams/data-science": "team", "/admin/quotas": "admin-quotas", "/admin/usage": "admin-usage",
        "/admin/diagnostics": "admin-diagnostics", "/admin/resources": "admin-resources",
    }


async def test_every_page_on_a_realistic_site_at_desktop_and_phone_widths(
        client: TestClient, make_user: Any, tmp_path: Path) -> None:
    alice: Api = await make_user("alice", admin=True)
    bob: Api = await make_user("bob")
    site = await build_site(client, alice, bob, tmp_path)
    shots = main_pages(site)
    expected = {
        "ENGINE_RUNNING", "ENGINE_STOPPED", "ENGINE_SUCCEEDED", "ENGINE_FAILED", "ENGINE_TIMEDOUT",
        "APPLICATION_RUNNING", "APPLICATION_FAILED", "deployed", "built", "build failed", "failure", "never run",
        "EXPERIMENT_RUN_FINISHED", "EXPERIMENT_RUN_RUNNING",
    }
    for viewport, prefix, accessibility in ((DESKTOP, "desktop", True), (PHONE, "phone", False)):
        async with browser_for(client, viewport) as browser:
            await browser.sign_in("alice")
            result = await crawl(browser, client, accessibility=accessibility, shots=shots, prefix=prefix)
        print(f"{viewport['width']} px: {len(result['visited'])} pages visited, {len(result['problems'])} problem(s)")
        report = "\n".join(result["problems"])
        assert not result["problems"], f"{len(result['problems'])} problem(s) at {viewport['width']} px:\n{report}"
        # The crawl reached each kind of page, and each workload state.
        visited = set(result["visited"])
        assert set(shots) <= visited, set(shots) - visited
        assert len(visited) > 40, result["visited"]
        assert expected <= result["statuses"], expected - result["statuses"]
        # Symlinks out of the project are never offered; the one inside is.
        assert not any(v.endswith("/files/escape") for v in visited)
        assert any(v.endswith("/files/link-to-src") for v in visited)
