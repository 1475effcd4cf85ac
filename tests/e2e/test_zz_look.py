import asyncio
from pathlib import Path
from tests.conftest import wait_build
from tests.e2e.conftest import browser_for, PHONE
from tests.e2e.realistic import build_site
from cml_appliance.web.keys import PROJECTS

async def test_look(client, make_user, tmp_path):
    alice = await make_user("alice", admin=True)
    bob = await make_user("bob")
    site = await build_site(client, alice, bob, tmp_path)
    pid, mid = site["project"], site["model"]
    _, builds = await alice.get(f"/api/v2/projects/{pid}/models/{mid}/builds")
    bid = builds["model_builds"][0]["id"]
    for name, vp in (("desktop", {"width": 1366, "height": 900}), ("phone", PHONE)):
        async with browser_for(client, vp) as b:
            await b.sign_in("alice")
            for label, path in (("model-build", f"/projects/{pid}/models/{mid}?build={bid}#build-output"),
                                ("admin-builds", "/admin/builds"), ("apps", f"/projects/{pid}/applications"),
                                ("overview-git", f"/projects/{site['cloned']}")):
                await b.page.goto(b.url(path))
                await asyncio.sleep(1.0)
                await b.page.screenshot(path=f"/tmp/shots/{name}-{label}.png", full_page=True)
            await b.page.goto(b.url(f"/projects/{pid}/applications"))
            link = b.page.locator("a:has-text('/apps/')").first
            print("APPLINK", await link.get_attribute("href"))
            b.assert_clean()
