"""Operations: health, readiness, metrics, request ids, the error shape for unknown routes."""

from __future__ import annotations

from aiohttp.test_utils import TestClient

from tests.conftest import Api, assert_error


async def test_health_and_readiness(client: TestClient) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200 and (await resp.json())["status"] == "ok"
    resp = await client.get("/readyz")
    body = await resp.json()
    assert resp.status == 200 and body["status"] == "ready" and body["database"] == "ok", body
    # How local workloads are isolated is said, never left to guess.
    assert body["local_sandbox"] == "bubblewrap" or body["local_sandbox"].startswith("none: "), body


async def test_readiness_fails_when_the_database_is_gone(client: TestClient) -> None:
    from cml_appliance.web.keys import POOL

    pool = client.app[POOL]
    pool.terminate()  # close() would wait for the live-status listener's connection
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["status"] == "unavailable"


async def test_metrics_count_requests_by_route_and_status(client: TestClient, alice: Api) -> None:
    await alice.get("/api/v2/projects")
    await alice.get("/api/v2/projects/none-such")
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.content_type == "text/plain"
    text = await resp.text()
    assert 'cml_http_requests_total{method="GET",route="api_list_projects",status="200"} 1.0' in text
    assert 'cml_http_requests_total{method="GET",route="api_get_project",status="404"} 1.0' in text
    assert "cml_http_request_duration_seconds_bucket" in text
    assert "cml_db_pool_connections" in text and "cml_db_pool_in_use_connections" in text


async def test_request_id_is_echoed_or_made(client: TestClient) -> None:
    resp = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert resp.headers["X-Request-ID"] == "abc-123"
    resp = await client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
    assert resp.headers["X-Request-ID"] != "bad id with spaces" and len(resp.headers["X-Request-ID"]) == 32
    resp = await client.get("/api/v2/projects")
    assert resp.status == 401 and resp.headers["X-Request-ID"]


async def test_unknown_routes_and_methods_answer_with_the_error_shape(alice: Api) -> None:
    status, body = await alice.get("/api/v2/nothing-here")
    assert_error(status, body, 404)
    status, body = await alice.call("PUT", "/api/v2/projects")
    assert_error(status, body, 405)
    # Without a key an unknown route is still just unknown; a known one asks for the key.
    resp = await alice.client.get("/api/v2/nothing-here")
    assert_error(resp.status, await resp.json(), 404)
    resp = await alice.client.get("/api/v2/runtimes")
    assert_error(resp.status, await resp.json(), 401)


async def test_pages_ask_to_sign_in(client: TestClient, alice: Api) -> None:
    resp = await client.get("/login")
    assert resp.status == 200 and "Sign in" in await resp.text()
    resp = await client.get("/projects", allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"].startswith("/login?next=/projects")
