"""Experiment pages in headless Chromium: runs logged by the real mlflow client show as a table
with params and metrics as columns (sorted, filtered), side by side, one run's metric charts and
artifacts; the registry lists what was registered and deploys a version. On a phone too."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from tests.e2e.conftest import PHONE, Browser
from tests.conftest import run_mlflow_client, tracking_uri

SCRIPT = textwrap.dedent("""
    import json, tempfile
    from pathlib import Path

    import mlflow
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    mlflow.set_experiment("churn")
    ids = []
    for c, name in ((0.1, "small C"), (1.0, "medium C"), (10.0, "large C")):
        with mlflow.start_run(run_name=name) as run:
            mlflow.log_params({"C": c, "solver": "lbfgs"})
            for step in range(20):
                mlflow.log_metric("loss", (1 + c) / (step + 1), step=step)
            mlflow.log_metric("accuracy", 0.5 + c / 40)
            ids.append(run.info.run_id)
    with mlflow.start_run(run_id=ids[1]):
        folder = Path(tempfile.mkdtemp())
        (folder / "plots" / "2026 Q4").mkdir(parents=True)
        (folder / "plots" / "2026 Q4" / "roc curve.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>")
        (folder / "empty.txt").write_text("")
        mlflow.log_artifacts(str(folder))
        X = np.array([[0.0, 1.0], [1.0, 0.0], [0.1, 0.9], [0.9, 0.2]])
        mlflow.sklearn.log_model(LogisticRegression().fit(X, [0, 1, 0, 1]), name="model")
    print("RESULT " + json.dumps({"ids": ids}))
""")


async def test_experiment_pages_table_charts_artifacts_and_registry(browser: Browser, client: TestClient, make_user: Any,
                                                                    workload_python: Path) -> None:
    from playwright.async_api import expect

    alice = await make_user("alice")
    _, project = await alice.post("/api/v2/projects", json={"name": "churn study"})
    pid = project["id"]
    out = await run_mlflow_client(workload_python, tracking_uri(alice, pid), alice.key, SCRIPT)
    small, medium, large = out["ids"]
    page = browser.page
    await browser.sign_in("alice")

    # The project's experiments, then the runs table: params and metrics as columns.
    await page.goto(browser.url(f"/projects/{pid}"))
    await page.click("nav.project-tabs >> text=Experiments")
    await page.click("#experiment-list >> text=churn")
    table = page.locator("#run-table")
    await expect(table.locator("thead")).to_contain_text("C")
    await expect(table.locator("thead")).to_contain_text("accuracy")
    await expect(table.locator("tbody tr")).to_have_count(3)
    await expect(table.locator(f"tr[data-run='{large}'] .status")).to_have_text("Finished")
    # Sort by accuracy (a click: descending), then again (ascending).
    await table.locator("thead a", has_text="accuracy").click()
    await expect(table.locator("tbody tr").first).to_have_attribute("data-run", large)
    await table.locator("thead a", has_text="accuracy").click()
    await expect(table.locator("tbody tr").first).to_have_attribute("data-run", small)
    # Filter with MLflow's syntax; a bad filter says what is wrong.
    await page.fill("#run-filter input[name=filter]", "metrics.accuracy > 0.52 and params.C != '10.0'")
    await page.click("#run-filter button[type=submit]")
    await expect(table.locator("tbody tr")).to_have_count(1)
    await expect(table.locator("tbody tr")).to_have_attribute("data-run", medium)
    browser.expected_errors.add((400, f"/projects/{pid}/experiments/{page.url.split('/experiments/')[1].split('?')[0]}"))
    await page.fill("#run-filter input[name=filter]", "metrics.accuracy >>> 1")
    await page.click("#run-filter button[type=submit]")
    await expect(page.locator(".flash.error")).to_contain_text("filter")
    await browser.shot("experiment-runs-bad-filter")
    await page.click("#run-filter >> text=Clear")
    await expect(table.locator("tbody tr")).to_have_count(3)
    await browser.shot("experiment-runs")

    # Compare two runs side by side, with the loss of each drawn.
    await page.check(f"tr[data-run='{small}'] input[type=checkbox]")
    await page.check(f"tr[data-run='{large}'] input[type=checkbox]")
    await page.click("#compare-runs")
    await expect(page.locator("#compare-table")).to_contain_text("small C")
    await expect(page.locator("#compare-table tr.differs")).to_contain_text("C")
    await page.click("#compare-table >> text=loss")
    await expect(page.locator(".chart[data-chart='compare'] canvas").first).to_be_visible()
    await browser.shot("experiment-compare")

    # One run: its charts, and its artifacts browsed folder by folder; a file downloads.
    await page.goto(browser.url(f"/projects/{pid}/experiments"))
    await page.click("#experiment-list >> text=churn")
    await page.click(f"tr[data-run='{medium}'] >> text=medium C")
    await expect(page.locator("#run-params")).to_contain_text("lbfgs")
    await expect(page.locator(".chart[data-key='loss'] canvas").first).to_be_visible()
    await page.click("#artifact-list >> text=plots/")
    await page.click("#artifact-list >> text=2026 Q4/")
    async with page.expect_download() as download_info:
        await page.click("#artifact-list >> text=roc curve.svg")
    download = await download_info.value
    assert download.suggested_filename == "roc curve.svg"
    assert "<script>" in Path(await download.path()).read_text()  # downloaded as it is, never run
    await page.click("#artifact-list >> text=↑ up")
    await expect(page.locator("#artifact-list")).to_contain_text("2026 Q4/")
    await browser.shot("experiment-run")

    # Register the run's logged model, then deploy version 1 into the project.
    await page.goto(browser.url(f"/projects/{pid}/experiments"))
    await page.click("#experiment-list >> text=churn")
    await page.click(f"tr[data-run='{medium}'] >> text=medium C")
    await page.fill("#register-form input[name=model_name]", "churn classifier")
    await page.click("#register-form button[type=submit]")
    await expect(page.locator("h1")).to_have_text("churn classifier")
    await expect(page.locator("#model-versions tbody tr")).to_have_count(1)
    await expect(page.locator("#model-versions")).to_contain_text("medium C")
    await browser.shot("registered-model")
    await page.goto(browser.url("/registry"))
    await expect(page.locator("#registered-models")).to_contain_text("churn classifier")

    # On a phone: the runs table scrolls inside its card, the page does not.
    await page.set_viewport_size(PHONE)
    await page.goto(browser.url(f"/projects/{pid}/experiments"))
    await page.click("#experiment-list >> text=churn")
    await browser.assert_fits_phone("the runs page", shot="experiment-runs-phone")
    await page.goto(browser.url(f"/projects/{pid}/experiments/{page.url.split('/experiments/')[1]}/runs/{medium}"))
    await browser.assert_fits_phone("the run page", shot="experiment-run-phone")
    browser.assert_clean()
