"""The data scientist's day in headless Chromium: a JupyterLab session opened from its page, a
notebook that trains a scikit-learn model and logs it with mlflow, the run in the appliance's UI
with its chart and in ListExperimentRuns, mlflow.register_model, a deployment of that version
answering on /model; and a notebook that cannot read the appliance's cookies or pages."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.e2e.conftest import Browser, browser_for, screenshots_dir

NOTEBOOK_CODE = """import mlflow, numpy as np
from sklearn.linear_model import LogisticRegression
X = np.array([[0.0, 1.0], [1.0, 0.0], [0.1, 0.9], [0.9, 0.2]]); y = [0, 1, 0, 1]
mlflow.set_experiment("notebook"); run = mlflow.start_run(run_name="from a notebook")
model = LogisticRegression().fit(X, y)
_ = [mlflow.log_metric("loss", 1 / (i + 1), step=i) for i in range(10)]
info = mlflow.sklearn.log_model(model, name="model"); mlflow.end_run()
mv = mlflow.register_model(info.model_uri, "notebook model")
print("registered", mv.version, run.info.run_id)"""


@pytest.fixture
async def reachable_client(aiohttp_client: Any, settings: Any, workload_python: Path,
                           monkeypatch: pytest.MonkeyPatch) -> TestClient:
    """An appliance listening on the port its public URL names (so MLFLOW_TRACKING_URI reaches
    it from the notebook), with the workloads' Python (JupyterLab, mlflow, scikit-learn) first
    on PATH before it starts."""
    from cml_appliance.app import create_app

    monkeypatch.setenv("PATH", f"{workload_python.parent}:{os.environ.get('PATH', '')}")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(dataclasses.replace(settings, host="127.0.0.1", port=port), allow_local_git=True)
    return await aiohttp_client(app, server_kwargs={"port": port})


@pytest.fixture
async def lab_browser(reachable_client: TestClient) -> AsyncIterator[Browser]:
    async with browser_for(reachable_client, viewport={"width": 1366, "height": 900}) as b:
        yield b


async def test_a_notebook_trains_logs_registers_and_deploys(lab_browser: Browser, reachable_client: TestClient) -> None:
    from playwright.async_api import expect

    from tests.conftest import user_maker, wait_build
    from tests.integration.test_models import call_until_served

    alice = await user_maker(reachable_client)("alice")
    _, project = await alice.post("/api/v2/projects", json={"name": "notebook work"})
    pid = project["id"]
    browser, page = lab_browser, lab_browser.page
    await browser.sign_in("alice")

    # Start a JupyterLab session from the sessions page; its page offers the editor.
    await page.goto(browser.url(f"/projects/{pid}/sessions"))
    await page.select_option("select[name=runtime_identifier]", "host/jupyterlab")
    await page.click("form#start-session button[type=submit]")
    await expect(page.locator("#session-status")).to_have_text("Running", timeout=30_000)
    await expect(page.locator("#session-summary")).to_contain_text("JupyterLab")
    async with page.context.expect_page() as opened:
        await page.click("#open-editor")
    lab = await opened.value
    lab.on("pageerror", lambda exc: browser.page_errors.append(f"{lab.url}: {exc}"))
    await lab.wait_for_load_state()
    assert "/editors/" in lab.url and f":{reachable_client.server.port}/" not in lab.url  # another origin

    # A notebook: train, log, register.
    await lab.locator(".jp-LauncherCard[data-category='Notebook']").first.click(timeout=60_000)
    # The kernel first: a cell run before it is connected is not run.
    await expect(lab.locator(".jp-StatusBar-Item", has_text="Idle").first).to_be_visible(timeout=60_000)
    cell = lab.locator(".jp-Notebook .jp-Cell .cm-content").first
    await cell.click(timeout=30_000)
    await lab.keyboard.insert_text(NOTEBOOK_CODE)
    await lab.keyboard.press("Shift+Enter")
    output = lab.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stdout']").first
    await expect(output).to_contain_text("registered 1", timeout=120_000)
    # Multiprocessing works in the sandbox (its own /dev/shm): no joblib warning.
    stderr = await lab.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").all_inner_texts()
    assert "joblib" not in "".join(stderr), stderr
    run_id = (await output.inner_text()).split()[-1]
    await lab.screenshot(path=str(screenshots_dir() / "jupyterlab-notebook.png"))

    # What code on the editor's origin can do with the appliance: nothing. No cookie of the
    # appliance is readable, and the UI's pages and API answer nothing it may read.
    cookies = await lab.evaluate("document.cookie")
    assert "cml_" not in cookies, cookies
    ui = browser.url("")
    reached = await lab.evaluate(f"""async () => {{
        const out = [];
        for (const path of ["/projects", "/api/v2/projects", "/settings/api-keys"]) {{
            try {{ const r = await fetch("{ui}" + path, {{credentials: "include"}}); out.push(path + " read " + r.status); }}
            catch (e) {{ out.push(path + " blocked"); }}
        }}
        return out;
    }}""")
    assert all(line.endswith("blocked") for line in reached), reached
    await lab.close()

    # The run in the appliance: in CML's API and on its page, with its chart.
    _, experiments = await alice.get(f"/api/v2/projects/{pid}/experiments")
    experiment = next(e for e in experiments["experiments"] if e["name"] == "notebook")
    _, runs = await alice.get(f"/api/v2/projects/{pid}/experiments/{experiment['id']}/runs")
    assert [r["id"] for r in runs["experiment_runs"]] == [run_id]
    await page.goto(browser.url(f"/projects/{pid}/experiments/{experiment['id']}/runs/{run_id}"))
    await expect(page.locator(".chart[data-key='loss'] canvas").first).to_be_visible()
    await browser.shot("notebook-run")

    # The registered version, deployed from the registry page, answers on /model.
    await page.goto(browser.url("/registry"))
    await page.click("#registered-models >> text=notebook model")
    await page.fill(".deploy-form input[name=name]", "notebook model")
    await page.click(".deploy-form button[type=submit]")
    await expect(page.locator("h1")).to_have_text("notebook model")
    await browser.shot("notebook-model-deploying")
    _, models = await alice.get(f"/api/v2/projects/{pid}/models")
    (model,) = models["models"]
    build = await wait_build(alice, pid, model["id"], deployed=True, timeout=240)
    assert build["status"] == "built", build
    started = time.monotonic()
    answer = await call_until_served(alice, model["access_key"], {"inputs": [[0.0, 1.0], [1.0, 0.0]]}, timeout=120)
    assert answer["response"] == [0, 1], (answer, time.monotonic() - started)
    await asyncio.sleep(0)
    browser.assert_clean()
